"""``KnowledgeBase.prepare``: one decoding pass over the stored samples feeds the feature
candidate stage and the artefact statistics, with the same result as building them apart."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from earmark.attribution import KnowledgeBase, index_cache_path, open_knowledge_base
from earmark.correlate.code import build_feature_candidates, stored_samples
from earmark.demo_build import DemoCorpus
from earmark.errors import StoreError
from earmark.extract import analyze_file
from earmark.index.artefacts import ArtefactStats, build_artefact_stats
from earmark.index.compact_functions import (
    INT_REFERENCES,
    NUMERIC_COLUMNS,
    TEXT_REFERENCES,
    CompactBuilder,
    CompactFunctions,
)
from earmark.index.feature_candidates import (
    FeatureCandidateIndex,
    StoredFunctionIds,
    TextKeys,
    _flat_feature_keys,
    feature_key_rows,
    feature_keys,
    stage_rows,
)
from earmark.ingest import IngestGroup, LabelTemplate, ingest_groups, ingest_paths
from earmark.kb_rows import RowSpool
from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures, SampleFeatures
from earmark.store.sql import FreezeCodec, open_store


def _ingest(kb: KnowledgeBase, corpus: DemoCorpus) -> None:
    for binary in corpus.select(role="kb"):
        template = LabelTemplate(actor=binary.actor, family=binary.family, source="test")
        ingest_paths(kb.store, [binary.path], template)
    for binary in corpus.select(role="goodware"):
        ingest_paths(kb.store, [binary.path], LabelTemplate(goodware=True, source="test"))


def _count_decodes(kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Stored features read (decoded here, or sent to a build process to decode)."""
    decoded: Counter[str] = Counter()
    load_blob, load = kb.store.load_features_blob, kb.store.load_features

    def counting_blob(sha256: str) -> bytes:
        decoded[sha256] += 1
        return load_blob(sha256)

    def counting(sha256: str, *, instructions: bool = True) -> SampleFeatures:
        decoded[sha256] += 1
        return load(sha256, instructions=instructions)

    monkeypatch.setattr(kb.store, "load_features_blob", counting_blob)
    monkeypatch.setattr(kb.store, "load_features", counting)
    return decoded


def assert_same_stage(a: FeatureCandidateIndex, b: FeatureCandidateIndex) -> None:
    assert np.array_equal(a.keys, b.keys)
    assert np.array_equal(a.postings, b.postings)
    for name in (*NUMERIC_COLUMNS, "minhash", "robust_minhash", "source_codes"):
        assert np.array_equal(getattr(a.stored, name), getattr(b.stored, name)), name
    for name in INT_REFERENCES:
        assert np.array_equal(a.stored.int_references[name].values,
                              b.stored.int_references[name].values)  # fmt: skip
    for name in TEXT_REFERENCES:
        assert np.array_equal(a.stored.text_references[name].ids,
                              b.stored.text_references[name].ids)  # fmt: skip
    assert [a.stored.function(i) for i in range(len(a))] == [
        b.stored.function(i) for i in range(len(b))
    ]


def assert_same_stats(a: ArtefactStats, b: ArtefactStats) -> None:
    for name in ("keys", "owner_count", "goodware_count", "weight", "listed_offsets",
                 "listed_owner", "listed_sample", "sample_ids", "rare_strings"):  # fmt: skip
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.revision, a.owner_names, a.total_owners) == (b.revision, b.owner_names,
                                                            b.total_owners)  # fmt: skip
    assert dict(a.libraries) == dict(b.libraries)


@pytest.mark.parametrize(("database", "jobs"), [("file", 1), ("memory", 1), ("file", 2)])
def test_prepare_decodes_each_sample_once_and_builds_what_separate_passes_build(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str, jobs: int
) -> None:
    """Also with the samples decoded in 2 build processes (``jobs=2``): the same stage and
    statistics as building each apart in this process."""
    url = str(tmp_path / "kb.db") if database == "file" else ":memory:"
    with open_knowledge_base(url) as kb:
        _ingest(kb, corpus)
        decoded = _count_decodes(kb, monkeypatch)
        kb.prepare(jobs=jobs)
        samples = kb.samples()
        assert len(samples) >= 4 and any(record.goodware for record in samples.values())
        assert set(decoded) == {record.sha256 for record in samples.values()}
        assert set(decoded.values()) == {1}
        stage, stats = kb.feature_candidates(), kb.artefact_stats()
        assert stage is not None and len(stage) > 0 and len(stats.keys) > 0
        assert sum(decoded.values()) == len(samples)  # nothing decoded after prepare

        index = kb.index()
        apart = build_feature_candidates(kb.store, samples, index.min_instructions)
        assert apart is not None
        assert_same_stage(stage, apart)
        # Sweeping for common keys after every sample files the same postings.
        swept = FeatureCandidateIndex.build(
            ((r.sample_id, f.functions) for r, f in stored_samples(kb.store, samples)),
            index.min_instructions,
            first_sweep=1,
        )
        assert np.array_equal(swept.keys, apart.keys)
        assert np.array_equal(swept.postings, apart.postings)
        assert_same_stats(
            stats, build_artefact_stats(stored_samples(kb.store, samples), index.revision)
        )


@pytest.mark.parametrize("database", ["file", "memory"])
def test_prepare_after_an_ingest_rebuilds_both_from_one_pass(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str
) -> None:
    """Beside a SQLite KB the rows of the samples decoded before are read from the row cache
    and only the new sample is decoded; without a cache directory every sample is."""
    held_back = corpus.binary("delta", "O2")
    with open_knowledge_base(str(tmp_path / "kb.db") if database == "file" else ":memory:") as kb:
        _ingest(kb, corpus)
        kb.prepare()
        before = kb.feature_candidates()
        assert before is not None
        ingest_paths(kb.store, [held_back.path], LabelTemplate(actor="delta", source="test"))
        decoded = _count_decodes(kb, monkeypatch)
        kb.prepare()
        samples = kb.samples()
        new = {r.sha256 for r in samples.values() if "delta" in r.actors}
        assert set(decoded.values()) == {1}
        assert set(decoded) == (new if database == "file" else {r.sha256 for r in samples.values()})
        after = kb.feature_candidates()
        assert after is not None and len(after) > len(before)
        assert kb.artefact_stats().revision == kb.index().revision
        apart = build_feature_candidates(kb.store, samples, kb.index().min_instructions)
        assert apart is not None
        assert_same_stage(after, apart)
        assert_same_stats(
            kb.artefact_stats(),
            build_artefact_stats(stored_samples(kb.store, samples), kb.index().revision),
        )


@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 2**64 - 1), st.integers(0, 2**40)),
        max_size=40,
    )
)
def test_stored_function_ids_map_like_a_dict_filled_in_table_order(
    rows: list[tuple[int, int, int]],
) -> None:
    """Rows in function id order; a (sample, address) stored twice keeps its last id."""
    expected = {(sample, address): identifier for sample, address, identifier in rows}
    mapping = StoredFunctionIds(
        np.array([row[0] for row in rows], dtype=np.int64),
        np.array([row[1] for row in rows], dtype=np.uint64),
        np.array([row[2] for row in rows], dtype=np.int64),
    )
    for key, identifier in expected.items():
        assert mapping.get(key, -1) == identifier
    assert mapping.get((6, 0), -1) == -1
    assert len(mapping) == len(rows)


_SLOTS = st.lists(st.integers(0, 2**32 - 1), min_size=MINHASH_PERMUTATIONS,
                  max_size=MINHASH_PERMUTATIONS)  # fmt: skip
# Around each column's bounds: inside, at and just past them.
_REFERENCES = st.lists(
    st.sampled_from([0, 1, -1, 2**32, 2**63, 2**64 - 1, 2**64, -(2**64) + 1, -(2**64)]),
    max_size=4,
).map(tuple)


@given(
    minhash=st.one_of(st.just(()), _SLOTS.map(tuple), st.just((2**32,) * MINHASH_PERMUTATIONS)),
    robust=st.one_of(st.just(()), _SLOTS.map(tuple), st.just((-1,) * MINHASH_PERMUTATIONS)),
    calls=_REFERENCES,
    constants=_REFERENCES,
    immediates=_REFERENCES,
)
def test_compact_rows_give_back_every_function_in_or_out_of_the_columns(
    minhash: tuple[int, ...],
    robust: tuple[int, ...],
    calls: tuple[int, ...],
    constants: tuple[int, ...],
    immediates: tuple[int, ...],
) -> None:
    """A value a column cannot hold keeps the function as an object (``irregular``)."""
    function = FunctionFeatures(
        address=0x401000, size=40, block_count=3, edge_count=2, instruction_count=12,
        exact_hash=7, minhash=minhash, normalized=("push reg",), calls=calls,
        called_imports=("kernel32!Sleep",), strings=("caf\u00e9",), constants=constants,
        name="f", source="call", robust_minhash=robust, immediates=immediates,
    )  # fmt: skip
    builder = CompactBuilder()
    builder.add(1, 5, function)
    stored = builder.finish()
    assert stored.function(0) == replace(function, normalized=(), name=None)
    fits = all(0 <= v < 2**32 for v in (*minhash, *robust)) and all(
        -(2**64) < v < 2**64 for v in (*calls, *constants, *immediates)
    )
    assert (0 in stored.irregular) == (not fits)


def test_feature_keys_of_many_functions_equal_those_of_each_alone(corpus: DemoCorpus) -> None:
    functions = list(analyze_file(corpus.binary("alpha-v3", "O2").path).functions)
    assert len(functions) > 10
    # Without a robust MinHash, and with one of empty slots only: no band keys.
    functions[1] = replace(functions[1], robust_minhash=())
    functions[2] = replace(functions[2], robust_minhash=(0xFFFFFFFF,) * MINHASH_PERMUTATIONS)
    rows = feature_key_rows(functions)
    assert rows == [feature_keys(function) for function in functions]
    # Text keys remembered across calls (as over a build's samples) are the same keys.
    known = TextKeys()
    assert feature_key_rows(functions[:5], known) + feature_key_rows(functions, known)[5:] == rows
    # The build's flat form: the same rows end to end, with their lengths.
    flat, counts = _flat_feature_keys(functions, known)
    assert flat.tolist() == [key for row in rows for key in row]
    assert counts.tolist() == [len(row) for row in rows]
    empty_flat, empty_counts = _flat_feature_keys([], known)
    assert len(empty_flat) == 0 and len(empty_counts) == 0
    bare = [
        replace(f, robust_minhash=(), constants=(), strings=(), called_imports=())
        for f in functions[:3]
    ]
    assert _flat_feature_keys(bare, known)[1].tolist() == [0, 0, 0]
    assert rows[2] == feature_keys(replace(functions[2], robust_minhash=()))
    banded = [
        row
        for row, function in zip(rows, functions, strict=True)
        if set(function.robust_minhash) - {0xFFFFFFFF}
    ]
    assert len(banded) > 10 and min(len(row) for row in banded) >= MINHASH_PERMUTATIONS // 4


def _columns_of(stored: CompactFunctions) -> dict[str, list[object]]:
    arrays = {name: getattr(stored, name) for name in ("sample_id", "function_id", "address",
              "size", "block_count", "edge_count", "instruction_count", "exact_hash", "minhash",
              "minhash_length", "robust_minhash", "robust_length", "source_codes")}  # fmt: skip
    for name, ints in stored.int_references.items():
        arrays |= {f"{name}.values": ints.values, f"{name}.negative": ints.negative,
                   f"{name}.offsets": ints.offsets}  # fmt: skip
    for name, texts in stored.text_references.items():
        arrays |= {f"{name}.blob": texts.blob, f"{name}.starts": texts.starts,
                   f"{name}.ids": texts.ids, f"{name}.offsets": texts.offsets}  # fmt: skip
    return {name: [array.dtype.str, array.tolist()] for name, array in arrays.items()}


def test_compact_rows_added_by_sample_equal_those_added_one_by_one(corpus: DemoCorpus) -> None:
    """Whole samples converted at once give the columns of the function-by-function path,
    with negative and past-int64 references, empty signatures and an irregular function."""
    functions = list(analyze_file(corpus.binary("alpha-v3", "O2").path).functions)
    odd = [
        replace(functions[0], constants=(-5, 2**63 + 1), minhash=(), strings=("caf\u00e9",)),
        replace(functions[1], immediates=(-(2**64) + 1,), robust_minhash=()),
        replace(functions[2], calls=(2**64,)),  # does not fit: kept as an object
    ]
    signed = replace(functions[3], constants=(-1, 7), immediates=(-(2**63),))  # int64 path
    samples = [(1, functions), (2, [*functions[:4], *odd[:2]]), (3, odd), (4, [signed])]
    batched, reference = CompactBuilder(), CompactBuilder()
    positions = []
    for sample_id, members in samples:
        for function_id, function in enumerate(members):
            positions.append(batched.add(sample_id, function_id, function))
            reference._add_one(sample_id, function_id, function)
    fast, slow = batched.finish(), reference.finish()
    assert positions == list(range(len(fast)))
    assert _columns_of(fast) == _columns_of(slow)
    assert fast.source_names == slow.source_names and fast.irregular == slow.irregular
    assert list(fast.irregular) == [len(functions) + 6 + 2]
    whole = CompactBuilder()
    for sample_id, members in samples:
        whole.add_sample(sample_id, list(range(len(members))), members)
    assert _columns_of(whole.finish()) == _columns_of(fast)


def test_stage_rows_made_in_another_process_build_the_same_stage(corpus: DemoCorpus) -> None:
    """Rows pickled as a build process sends them: a sample whose values fit the columns and
    one that does not (a constant past 2**64 - 1 sends its functions as objects)."""
    functions = list(analyze_file(corpus.binary("alpha-v3", "O2").path).functions)
    odd = [replace(functions[0], constants=(2**64,)), *functions[1:]]
    samples = [(1, functions), (2, odd)]
    known = TextKeys()
    rows = [(sample, pickle.loads(pickle.dumps(stage_rows(f, 4, known)))) for sample, f in samples]
    assert rows[0][1].block is not None and rows[1][1].block is None
    assert len(rows[1][1].functions) == len(rows[1][1]) > 10
    built = FeatureCandidateIndex.build_from_rows(rows)
    assert_same_stage(built, FeatureCandidateIndex.build(samples, 4))
    assert built.stored.irregular  # the odd function, kept whole


class _DyingCodec(FreezeCodec):
    """Decodes as the default codec, except that a build process decoding without
    instruction tokens dies at once (as one killed by the system would)."""

    def from_bytes(self, data: bytes, *, instructions: bool = True) -> SampleFeatures:
        if not instructions and multiprocessing.parent_process() is not None:
            os._exit(9)
        return super().from_bytes(data, instructions=instructions)


def test_a_build_process_that_dies_is_a_store_error_and_the_next_build_succeeds(
    corpus: DemoCorpus, tmp_path: Path
) -> None:
    database = tmp_path / "kb.db"
    with open_knowledge_base(str(database)) as kb:
        _ingest(kb, corpus)
    with open_store(str(database), codec=_DyingCodec()) as store:
        dying = KnowledgeBase(store, index_cache_path(str(database)))
        with pytest.raises(StoreError, match="died"):
            dying.prepare(jobs=2)
        assert dying.feature_candidates() is not None  # built in this process instead
    with open_knowledge_base(str(database)) as kb:
        kb.prepare(jobs=2)
        stage = kb.feature_candidates()
        assert stage is not None and len(stage) > 0
        assert kb.artefact_stats().revision == kb.index().revision


@pytest.mark.parametrize("jobs", [1, 2])
def test_rows_spooled_by_ingest_build_what_decoding_builds(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    """Samples ingested through the spool are not decoded by the next build, which is the
    same as a build that decodes every sample; samples stored before are decoded."""
    held_back = corpus.binary("delta", "O2")
    with open_knowledge_base(":memory:") as kb:  # no cache directory: the spool
        _ingest(kb, corpus)  # stored before: no spool
        spool = kb.row_spool()
        summary = ingest_paths(
            kb.store, [held_back.path], LabelTemplate(actor="delta", source="test"), jobs=jobs
        )
        assert summary.ingested == 1 and len(spool) == 0  # ingest_paths took no spool
        again = ingest_groups(
            kb.store,
            [IngestGroup((str(corpus.select(role="kb")[0].path),), LabelTemplate())],
            jobs=jobs,
            rows=spool,
        )
        assert again.skipped == 1 and len(spool) == 0  # stored already: nothing spooled
    with open_knowledge_base(":memory:") as kb:
        for binary in corpus.select(role="kb"):
            template = LabelTemplate(actor=binary.actor, family=binary.family, source="test")
            ingest_groups(kb.store, [IngestGroup((str(binary.path),), template)],
                          jobs=jobs, rows=kb.row_spool())  # fmt: skip
        spooled = {record.sha256 for record in kb.samples().values()}
        assert len(kb.row_spool()) == len(spooled) > 2
        for binary in corpus.select(role="goodware"):  # after the spool: decoded by the build
            ingest_paths(kb.store, [binary.path], LabelTemplate(goodware=True, source="test"))
        decoded = _count_decodes(kb, monkeypatch)
        kb.prepare(jobs=jobs)
        assert len(kb.row_spool()) == 0  # emptied by the build
        samples = kb.samples()
        assert set(decoded) == {r.sha256 for r in samples.values()} - spooled != set()
        stage, stats = kb.feature_candidates(), kb.artefact_stats()
        assert stage is not None
        apart = build_feature_candidates(kb.store, samples, kb.index().min_instructions)
        assert apart is not None
        assert_same_stage(stage, apart)
        assert_same_stats(
            stats, build_artefact_stats(stored_samples(kb.store, samples), kb.index().revision)
        )


def test_a_full_spool_keeps_no_more_rows_and_the_build_decodes_the_rest(
    corpus: DemoCorpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_knowledge_base(":memory:") as kb:
        spool = kb.row_spool()
        assert isinstance(spool, RowSpool)
        monkeypatch.setattr(spool, "max_samples", 2)
        groups = [
            IngestGroup((str(b.path),), LabelTemplate(actor=b.actor, source="test"))
            for b in corpus.select(role="kb")
        ]
        ingest_groups(kb.store, groups, rows=spool)
        assert len(spool) == 2 and not spool.has_room()
        decoded = _count_decodes(kb, monkeypatch)
        kb.prepare()
        assert len(decoded) == len(kb.samples()) - 2
        stage = kb.feature_candidates()
        apart = build_feature_candidates(kb.store, kb.samples(), kb.index().min_instructions)
        assert stage is not None and apart is not None
        assert_same_stage(stage, apart)
