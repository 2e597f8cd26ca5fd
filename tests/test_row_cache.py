"""The row cache beside a SQLite KB (``<db>.rows/``, ``kb_rows.RowCache``): later builds read
the rows of every sample stored before instead of decoding it, build what decoding builds,
and never trust a file that does not match the stored sample."""

from __future__ import annotations

import os
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from earmark.attribution import KnowledgeBase, open_knowledge_base
from earmark.correlate.code import build_feature_candidates, stored_samples
from earmark.demo_build import DemoCorpus
from earmark.index import FunctionIndex
from earmark.index.artefacts import build_artefact_stats
from earmark.index.feature_candidates import TextKeys
from earmark.ingest import IngestGroup, LabelTemplate, ingest_groups, ingest_paths
from earmark.intel.warninglists import CACHE_DIR_ENV_VAR
from earmark.kb_rows import (
    ABANDONED_WRITE_SECONDS,
    ROW_FORMAT_VERSION,
    RowCache,
    origin_of,
    rows_of,
    write_rows_file,
)
from earmark.model.sample import SampleFeatures
from earmark.store.sql import FreezeCodec
from test_prepare import assert_same_stage, assert_same_stats


def _groups(corpus: DemoCorpus) -> list[IngestGroup]:
    groups = [
        IngestGroup((str(b.path),), LabelTemplate(actor=b.actor, family=b.family, source="t"))
        for b in corpus.select(role="kb")
    ]
    goodware = tuple(str(b.path) for b in corpus.select(role="goodware"))
    return [*groups, IngestGroup(goodware, LabelTemplate(goodware=True, source="t"))]


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> Counter[int]:
    """Stored features decoded in this process, by blob length (builds here run jobs=1)."""
    decoded: Counter[int] = Counter()
    decode = FreezeCodec.from_bytes

    def counting(self: FreezeCodec, blob: bytes, *, instructions: bool = True) -> SampleFeatures:
        decoded[len(blob)] += 1
        return decode(self, blob, instructions=instructions)

    monkeypatch.setattr(FreezeCodec, "from_bytes", counting)
    return decoded


def _assert_built_as_decoding_builds(kb: KnowledgeBase) -> None:
    samples = kb.samples()
    stage = kb.feature_candidates()
    apart = build_feature_candidates(kb.store, samples, kb.index().min_instructions)
    assert stage is not None and apart is not None and len(stage) > 0
    assert_same_stage(stage, apart)
    expected = build_artefact_stats(stored_samples(kb.store, samples), kb.index().revision)
    assert_same_stats(kb.artefact_stats(), expected)


def _drop_built_caches(database: Path) -> None:
    """Forces the next ``prepare`` to build the stage and statistics of the same revision."""
    for suffix in (".index", ".features", ".artefacts"):
        path = Path(f"{database}{suffix}")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _cached(database: Path) -> dict[str, Path]:
    return {path.stem: path for path in Path(f"{database}.rows").glob("*.rows")}


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_later_build_reads_every_earlier_sample_from_the_cache(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    database = tmp_path / "kb.db"
    with open_knowledge_base(str(database)) as kb:
        kb_groups = _groups(corpus)
        ingest_groups(kb.store, kb_groups[:-1], jobs=jobs, rows=kb.row_spool())
        ingest_paths(kb.store, list(kb_groups[-1].paths), LabelTemplate(goodware=True))
        assert isinstance(kb.row_spool(), RowCache)
        written_by_ingest = set(_cached(database))
        # With workers, each wrote its sample's file and this process renamed it: none left.
        assert not list(Path(f"{database}.rows").glob(".rows-*"))
        kb.prepare(jobs=jobs)  # decodes the goodware (no rows from ingest) and caches them
        samples = {record.sha256 for record in kb.samples().values()}
        assert written_by_ingest and written_by_ingest < samples == set(_cached(database))
        _assert_built_as_decoding_builds(kb)
    held_back = corpus.binary("delta", "O2")
    with open_knowledge_base(str(database)) as kb:  # a new process would start like this
        ingest_paths(kb.store, [held_back.path], LabelTemplate(actor="delta"))
        decoded = _count_decodes(monkeypatch)
        kb.prepare()
        assert sum(decoded.values()) == 1  # the new sample only: the rest read, origin-checked
        _assert_built_as_decoding_builds(kb)
        assert set(_cached(database)) == {r.sha256 for r in kb.samples().values()}


def test_a_server_kb_keeps_its_rows_in_the_installation_cache(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    """A PostgreSQL KB has no folder beside it: its rows go under $EARMARK_CACHE_DIR, and a
    later process (which builds its stage and statistics in memory) decodes nothing."""
    monkeypatch.setenv(CACHE_DIR_ENV_VAR, str(tmp_path / "cache"))
    with open_knowledge_base(postgres_url) as kb:
        assert isinstance(kb.row_spool(), RowCache)
        ingest_groups(kb.store, _groups(corpus), rows=kb.row_spool())
        kb.prepare()
        _assert_built_as_decoding_builds(kb)
    (directory,) = (tmp_path / "cache" / "rows").iterdir()
    with open_knowledge_base(postgres_url) as kb:  # a query process on the server KB
        decoded = _count_decodes(monkeypatch)
        assert kb.feature_candidates() is not None and kb.artefact_stats() is not None
        assert sum(decoded.values()) == 0  # both from one pass over the cached rows
        _assert_built_as_decoding_builds(kb)
        assert {path.stem for path in directory.glob("*.rows")} == {
            record.sha256 for record in kb.samples().values()
        }


def test_damaged_foreign_and_outdated_files_are_decoded_again_and_replaced(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = tmp_path / "kb.db"
    with open_knowledge_base(str(database)) as kb:
        ingest_groups(kb.store, _groups(corpus), rows=kb.row_spool())
        kb.prepare()
    files = sorted(_cached(database).values())
    assert len(files) == 4
    damaged, truncated, foreign, outdated = files
    shutil.copyfile(truncated, foreign)  # another sample's rows under this one's name
    body = bytearray(damaged.read_bytes())
    body[-1] ^= 0xFF
    damaged.write_bytes(bytes(body))
    truncated.write_bytes(truncated.read_bytes()[:40])
    header = bytearray(outdated.read_bytes())
    struct.pack_into("<H", header, 8, ROW_FORMAT_VERSION + 1)
    outdated.write_bytes(bytes(header))
    _drop_built_caches(database)
    with open_knowledge_base(str(database)) as kb:
        decoded = _count_decodes(monkeypatch)
        kb.prepare()
        assert sum(decoded.values()) == 4
        _assert_built_as_decoding_builds(kb)
    _drop_built_caches(database)
    with open_knowledge_base(str(database)) as kb:  # rewritten: nothing decoded any more
        decoded = _count_decodes(monkeypatch)
        kb.prepare()
        assert sum(decoded.values()) == 0
        _assert_built_as_decoding_builds(kb)


def test_files_of_samples_the_kb_does_not_hold_are_deleted_by_the_next_build(
    corpus: DemoCorpus, tmp_path: Path
) -> None:
    """A KB deleted and created again at the same path leaves the old KB's files behind."""
    database = tmp_path / "kb.db"
    with open_knowledge_base(str(database)) as kb:
        ingest_groups(kb.store, _groups(corpus), rows=kb.row_spool())
        kb.prepare()
    cached = _cached(database)
    stray = Path(f"{database}.rows") / f"{'e' * 64}.rows"
    shutil.copyfile(next(iter(cached.values())), stray)
    abandoned, fresh = (Path(f"{database}.rows") / f".rows-{name}" for name in ("old", "new"))
    abandoned.write_bytes(b"half a write")
    fresh.write_bytes(b"a write under way")
    hour_ago = time.time() - ABANDONED_WRITE_SECONDS - 60
    os.utime(abandoned, (hour_ago, hour_ago))
    _drop_built_caches(database)
    with open_knowledge_base(str(database)) as kb:
        kb.prepare()
        assert not stray.exists() and not abandoned.exists() and fresh.exists()
        assert set(_cached(database)) == set(cached) == {r.sha256 for r in kb.samples().values()}


def test_caches_of_a_kb_created_again_at_the_same_path_are_not_served(
    corpus: DemoCorpus, tmp_path: Path
) -> None:
    """A KB deleted and created again counts its revisions from the start again: at an equal
    revision the index, stage and statistics left beside it are another KB's."""
    database = tmp_path / "kb.db"
    first, second = corpus.select(role="kb")[0], corpus.select(role="kb")[-1]
    assert first.family != second.family
    with open_knowledge_base(str(database)) as kb:
        ingest_paths(kb.store, [first.path], LabelTemplate(actor="first", family="first"))
        kb.prepare()
        revision, indexed = kb.index().revision, len(kb.index())
    for leftover in tmp_path.glob("kb.db*"):
        if leftover.is_file() and leftover.name != "kb.db.owner":
            leftover.unlink()  # the database (and its WAL), not the caches beside it
    with open_knowledge_base(str(database)) as kb:
        ingest_paths(kb.store, [second.path], LabelTemplate(actor="second", family="second"))
        assert kb.store.revision() == revision  # the case: the old caches' revision again
        kb.prepare()
        assert len(kb.index()) != indexed
        _assert_built_as_decoding_builds(kb)
        assert kb.artefact_stats().owner_names == ("second",)
    with open_knowledge_base(str(database)) as kb:  # its own caches are served again
        assert FunctionIndex.load(Path(f"{database}.index"), revision) is not None
        assert len(kb.index()) != indexed


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_rows_path_that_cannot_be_written_costs_only_the_decoding(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    database = tmp_path / "kb.db"
    Path(f"{database}.rows").write_text("not a directory")
    with open_knowledge_base(str(database)) as kb:
        summary = ingest_groups(kb.store, _groups(corpus), rows=kb.row_spool(), jobs=jobs)
        assert summary.failed == 0
        decoded = _count_decodes(monkeypatch)
        kb.prepare()
        assert sum(decoded.values()) == len(kb.samples())
        _assert_built_as_decoding_builds(kb)


def test_rows_of_an_irregular_sample_or_past_the_limit_are_not_kept(
    corpus: DemoCorpus, tmp_path: Path
) -> None:
    """Rows that the columns cannot hold are not written (every build decodes that sample),
    and no more than ``max_samples`` files are written."""
    binaries = corpus.select(role="kb")
    codec = FreezeCodec()
    blobs = [codec.to_bytes(_features(b.path)) for b in binaries[:3]]
    made = [rows_of(codec.from_bytes(blob), 5, TextKeys()) for blob in blobs]
    cache = RowCache(tmp_path / "rows", 5, max_samples=2)
    irregular = made[0].stage.__class__(
        addresses=made[0].stage.addresses,
        sources=made[0].stage.sources,
        block=None,
        functions=(),
        keys=made[0].stage.keys,
        key_counts=made[0].stage.key_counts,
    )
    cache.keep("a" * 64, made[0].__class__(irregular, made[0].artefacts, 1), origin_of(blobs[0]))
    assert not (tmp_path / "rows" / f"{'a' * 64}.rows").exists()
    for name, rows, blob in zip("bcd", made, blobs, strict=True):
        cache.add(name * 64, rows, blob)
    assert sorted(p.name[0] for p in (tmp_path / "rows").glob("*.rows")) == ["b", "c"]
    again = RowCache(tmp_path / "rows", 5, max_samples=2)
    assert not again.has_room()
    read = again.get("b" * 64, origin_of(blobs[0]))
    assert read is not None and read.stage.block is not None and made[0].stage.block is not None
    assert np.array_equal(read.stage.block.minhash, made[0].stage.block.minhash)
    assert read.artefacts == made[0].artefacts and read.stage.addresses == made[0].stage.addresses
    assert again.get("b" * 64, origin_of(blobs[1])) is None  # made from other bytes
    assert again.get("b" * 64) is None  # not written by this object: the origin is needed
    assert RowCache(tmp_path / "rows", 6, max_samples=2).get("b" * 64, origin_of(blobs[0])) is None


def test_a_file_written_for_the_cache_is_adopted_once_its_sample_is_stored(
    corpus: DemoCorpus, tmp_path: Path
) -> None:
    """What an ingest worker writes (``write_rows_file``) becomes the sample's file when the
    writing process adopts it, reads back as the rows it was made from, and is deleted
    instead when the cache has no room."""
    codec = FreezeCodec()
    binaries = corpus.select(role="kb")
    blobs = [codec.to_bytes(_features(b.path)) for b in binaries[:2]]
    made = [rows_of(codec.from_bytes(blob), 5, TextKeys()) for blob in blobs]
    directory = tmp_path / "rows"
    cache = RowCache(directory, 5, max_samples=1)
    written = write_rows_file(directory, made[0], origin_of(blobs[0]), 5)
    assert written is not None and Path(written.path).name.startswith(".rows-")
    assert cache.get("b" * 64) is None
    cache.adopt("b" * 64, written)
    assert not Path(written.path).exists() and "b" * 64 in cache
    read = RowCache(directory, 5, max_samples=1).get("b" * 64, origin_of(blobs[0]))
    assert read is not None and read.stage.block is not None and made[0].stage.block is not None
    assert np.array_equal(read.stage.block.minhash, made[0].stage.block.minhash)
    assert read.artefacts == made[0].artefacts and read.stage.addresses == made[0].stage.addresses
    second = write_rows_file(directory, made[1], origin_of(blobs[1]), 5)
    assert second is not None
    cache.adopt("c" * 64, second)  # full: deleted, not kept
    assert not Path(second.path).exists() and "c" * 64 not in cache
    assert sorted(p.name for p in directory.iterdir()) == [f"{'b' * 64}.rows"]
    assert write_rows_file(tmp_path / "rows.db", made[0], origin_of(blobs[0]), 5) is not None
    (tmp_path / "file").write_text("not a directory")
    assert write_rows_file(tmp_path / "file", made[0], origin_of(blobs[0]), 5) is None


def _features(path: Path) -> SampleFeatures:
    from earmark.extract import analyze_file

    return analyze_file(path)
