"""``KnowledgeBase.prepare(jobs>1)`` beside a SQLite file builds the function index in a forked
process while this one builds the feature stage and the artefact statistics: the same index as
a build in this process, built here instead when that process fails, and never saved for a
revision the store has moved past."""

from __future__ import annotations

import hashlib
import multiprocessing
import multiprocessing.context
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from earmark import knowledge_base
from earmark.attribution import open_knowledge_base
from earmark.demo_build import DemoCorpus
from earmark.index import FunctionIndex, saved_index_revision
from earmark.index.artefacts import ArtefactStats
from earmark.index.feature_candidates import FeatureCandidateIndex
from earmark.ingest import LabelTemplate, ingest_groups, ingest_paths
from test_prepare import assert_same_stage, assert_same_stats
from test_row_cache import _groups


def _ingest(database: Path, corpus: DemoCorpus) -> None:
    with open_knowledge_base(str(database)) as kb:
        ingest_groups(kb.store, _groups(corpus), rows=kb.row_spool())


def _builds_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Revisions of the function indexes built in this process (a forked process counts in
    its own copy of the list)."""
    built: list[int] = []
    build = FunctionIndex.build.__func__  # type: ignore[attr-defined]

    def counting(cls: type[FunctionIndex], table, revision, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append(revision)
        return build(cls, table, revision, *args, **kwargs)

    monkeypatch.setattr(FunctionIndex, "build", classmethod(counting))
    return built


def assert_same_index(a: FunctionIndex, b: FunctionIndex) -> None:
    assert (a.revision, a.min_instructions, len(a)) == (b.revision, b.min_instructions, len(b))
    for name in ("signatures", "exact_hash", "sample_ids"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    for name in ("band_orders", "function_id", "sample_position"):
        assert np.array_equal(getattr(a, name).data, getattr(b, name).data), name
    assert a.rarity is not None and b.rarity is not None
    arrays_a, arrays_b = a.rarity.arrays(), b.rarity.arrays()
    assert arrays_a.keys() == arrays_b.keys()
    for name, values in arrays_a.items():
        assert np.array_equal(values, arrays_b[name]), name
    assert (a.rarity.family_names, a.rarity.actor_names, a.rarity.total_owners) == (
        b.rarity.family_names,
        b.rarity.actor_names,
        b.rarity.total_owners,
    )


def _built_in_this_process(
    database: Path,
) -> tuple[FunctionIndex, FeatureCandidateIndex | None, ArtefactStats]:
    """Index, stage and statistics of a copy of the KB built with ``jobs=1``."""
    copy = database.with_name("copy.db")
    shutil.copy(database, copy)
    with open_knowledge_base(str(copy)) as kb:
        kb.prepare(jobs=1)
        return kb.index(), kb.feature_candidates(), kb.artefact_stats()


def test_the_index_is_built_aside_and_is_the_index_a_build_here_gives(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "kb.db"
    _ingest(database, corpus)
    index, stage, stats = _built_in_this_process(database)
    built = _builds_here(monkeypatch)
    with open_knowledge_base(str(database)) as kb:
        kb.prepare(jobs=2)
        revision = kb.store.revision()
        assert built == []  # the other process built it
        assert saved_index_revision(Path(f"{database}.index")) == revision
        assert_same_index(kb.index(), index)
        aside_stage = kb.feature_candidates()
        assert aside_stage is not None and stage is not None
        assert_same_stage(aside_stage, stage)
        assert_same_stats(kb.artefact_stats(), stats)
        kb.prepare(jobs=2)  # all at hand: nothing built again, in either process
        assert built == []


def test_a_later_ingest_is_indexed_aside_again(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "kb.db"
    _ingest(database, corpus)
    built = _builds_here(monkeypatch)
    with open_knowledge_base(str(database)) as kb:
        kb.prepare(jobs=2)
        first = kb.store.revision()
        held_back = corpus.binary("delta", "O2")
        ingest_paths(kb.store, [held_back.path], LabelTemplate(actor="delta", source="t"))
        kb.prepare(jobs=2)
        assert kb.store.revision() > first and kb.index().revision == kb.store.revision()
        assert built == []
        samples = kb.samples()
        digest = hashlib.sha256(held_back.path.read_bytes()).hexdigest()
        assert any(record.sha256 == digest for record in samples.values())
        here = FunctionIndex.build(kb.store.load_function_table(), kb.index().revision, samples)
        assert_same_index(kb.index(), here)


def test_when_the_process_fails_the_index_is_built_here(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "kb.db"
    _ingest(database, corpus)
    index, _, _ = _built_in_this_process(database)

    def failing(*_args: object) -> None:
        os._exit(1)

    monkeypatch.setattr(knowledge_base, "_index_process", failing)
    built = _builds_here(monkeypatch)
    with open_knowledge_base(str(database)) as kb:
        kb.prepare(jobs=2)
        assert built == [kb.store.revision()]
        assert_same_index(kb.index(), index)


@pytest.mark.parametrize("jobs", [1, 2])
def test_no_process_for_one_job_or_a_kb_without_a_cache_path(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    database = tmp_path / "kb.db"
    _ingest(database, corpus)
    forks: list[str | None] = []
    get_context = multiprocessing.get_context

    def recording(method: str | None = None) -> multiprocessing.context.BaseContext:
        forks.append(method)
        return get_context(method)

    monkeypatch.setattr(multiprocessing, "get_context", recording)
    with open_knowledge_base(str(database) if jobs == 1 else ":memory:") as kb:
        if jobs == 2:
            for binary in corpus.select(role="kb"):
                ingest_paths(kb.store, [binary.path], LabelTemplate(family=binary.family))
        kb.prepare(jobs=jobs)
        assert kb.index().revision == kb.store.revision()
    assert "fork" not in forks
    shutil.rmtree(f"{database}.index", ignore_errors=True)
    with open_knowledge_base(str(database)) as kb:  # the recording sees a process asked for
        kb.prepare(jobs=2)
    assert "fork" in forks


def test_nothing_is_saved_for_a_revision_the_store_has_moved_past(
    corpus: DemoCorpus, tmp_path: Path
) -> None:
    database = tmp_path / "kb.db"
    _ingest(database, corpus)
    path = tmp_path / "elsewhere.index"
    with open_knowledge_base(str(database)) as kb:
        revision, samples = kb.store.revision(), kb.samples()
        url = kb.store.url
    assert not knowledge_base._save_function_index(url, path, revision - 1, samples)
    assert not path.exists()
    assert knowledge_base._save_function_index(url, path, revision, samples)
    assert saved_index_revision(path) == revision
