"""The on-disk cache of the feature candidate stage: exact round trip, staleness, damage."""

from __future__ import annotations

import mmap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from earmark.errors import IndexCacheError
from earmark.extract import analyze_file
from earmark.index import feature_candidates
from earmark.index.feature_cache import load_feature_candidates, save_feature_candidates
from earmark.index.feature_candidates import FEATURE_MATCH_SIMILARITY, FeatureCandidateIndex
from earmark.index.similarity import function_similarity
from earmark.model.sample import FunctionFeatures
from fixtures.build import FixtureBuilder

MIN_INSTRUCTIONS = 10
REVISION = 7


def _functions(builder: FixtureBuilder, opt: str) -> list[FunctionFeatures]:
    return list(analyze_file(builder.build("fx_codec.c", "gcc64", opt).stripped).functions)


def _odd_references(function: FunctionFeatures) -> FunctionFeatures:
    """Values the flattening must carry exactly: negative and 64-bit constants, non-ASCII
    text with a NUL, an empty string."""
    return replace(
        function,
        constants=(-1, -(1 << 63), (1 << 64) - 1, 0),
        strings=("caf\u00e9\u4e2d\x00", ""),
    )


def _index(builder: FixtureBuilder) -> tuple[FeatureCandidateIndex, list[FunctionFeatures]]:
    pool = _functions(builder, "O0")
    first = next(i for i, f in enumerate(pool) if f.instruction_count >= MIN_INSTRUCTIONS)
    pool[:first] = []  # stored position 0 is the function with odd references
    pool[0] = _odd_references(pool[0])
    index = FeatureCandidateIndex.build(
        [(3, pool[: len(pool) // 2]), (5, pool[len(pool) // 2 :])],
        MIN_INSTRUCTIONS,
        {(3, pool[0].address): 42},
    )
    return index, _functions(builder, "O2")


def _saved_and_loaded(
    builder: FixtureBuilder, tmp_path: Path
) -> tuple[FeatureCandidateIndex, list[FunctionFeatures], Path, FeatureCandidateIndex | None]:
    """The fixture stage, its queries, the cache directory it was saved to, and the stage
    loaded back from there."""
    index, queries = _index(builder)
    path = tmp_path / "kb.features"
    assert save_feature_candidates(index, path, REVISION, MIN_INSTRUCTIONS)
    return index, queries, path, load_feature_candidates(path, REVISION, MIN_INSTRUCTIONS)


def test_round_trip_is_exact(builder: FixtureBuilder, tmp_path: Path) -> None:
    index, queries, _, loaded = _saved_and_loaded(builder, tmp_path)
    assert loaded is not None
    assert len(loaded) == len(index) > 0
    assert np.array_equal(loaded.keys, index.keys)
    assert np.array_equal(loaded.postings, index.postings)
    assert dict(loaded.stored.sample_ranges) == dict(index.stored.sample_ranges)
    assert [loaded.stored.function(i) for i in range(len(index))] == [
        index.stored.function(i) for i in range(len(index))
    ]
    assert loaded.stored.function(0).strings == ("caf\u00e9\u4e2d\x00", "")
    assert int(loaded.stored.function_id[0]) == 42
    found = loaded.find(queries, MIN_INSTRUCTIONS)
    assert found  # the fixture's -O2 build finds -O0 copies (test_similarity)
    assert found == index.find(queries, MIN_INSTRUCTIONS)


def test_batch_verification_scores_as_function_similarity(builder: FixtureBuilder) -> None:
    """``find`` verifies its candidates in one batch; each match carries, bit for bit, the
    score ``function_similarity`` gives the pair, and only pairs at the threshold pass."""
    index, queries = _index(builder)
    found = index.find(queries, MIN_INSTRUCTIONS)
    assert found
    for match in found:
        assert match.similarity == function_similarity(queries[match.query], match.function)
        assert match.similarity >= FEATURE_MATCH_SIMILARITY
        position = _position(index, match.sample_id, match.function.address)
        assert match.function == index.stored.function(position)
        assert match.function_id == int(index.stored.function_id[position])


def test_matching_in_passes_finds_what_one_pass_finds(
    builder: FixtureBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``find`` gathers (key, posting) pairs in runs of whole query functions; a budget so
    small that each function is its own run gives the same matches."""
    index, queries = _index(builder)
    whole = index.find(queries, MIN_INSTRUCTIONS)
    assert whole
    monkeypatch.setattr(feature_candidates, "MAX_KEY_PAIRS_PER_PASS", 1)
    assert index.find(queries, MIN_INSTRUCTIONS) == whole
    assert index.find([], MIN_INSTRUCTIONS) == []
    assert index.find(queries, 10**6) == []  # every function under the minimum size


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux smaps")
def test_loaded_stage_reads_minhash_rows_without_mapping_them(
    builder: FixtureBuilder, tmp_path: Path
) -> None:
    index, queries, path, loaded = _saved_and_loaded(builder, tmp_path)
    assert loaded is not None
    loaded.release_pages()
    assert loaded.find(queries, MIN_INSTRUCTIONS) == index.find(queries, MIN_INSTRUCTIONS)
    for name in ("minhash", "robust_minhash"):
        assert _resident_kib(path / f"{name}.npy") == 0
        positions = np.arange(len(index))[::-1].copy()
        assert np.array_equal(
            loaded.stored.signature_rows(name, positions), getattr(index.stored, name)[positions]
        )


def _position(index: FeatureCandidateIndex, sample_id: int, address: int) -> int:
    start, stop = index.stored.sample_ranges[sample_id]
    return start + int(np.flatnonzero(index.stored.address[start:stop] == address)[0])


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of files under ``path`` (Linux smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                inside = len(fields) > 5 and fields[5].startswith(str(path))
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux smaps")
def test_released_pages_leave_the_resident_set_and_read_back_the_same(
    builder: FixtureBuilder, tmp_path: Path
) -> None:
    index, queries, path, loaded = _saved_and_loaded(builder, tmp_path)
    assert loaded is not None and loaded.mappings  # every non-empty array is a file mapping
    found = loaded.find(queries, MIN_INSTRUCTIONS)
    # Touch every page of every mapped file, as a few dozen queries do on a real KB.
    assert sum(len(mapping[:: mmap.PAGESIZE]) for mapping in loaded.mappings) > 0
    before = _resident_kib(path)
    assert before > 0
    loaded.release_pages()
    assert _resident_kib(path) < before
    assert loaded.find(queries, MIN_INSTRUCTIONS) == found  # pages are read back from the file
    assert index.mappings == ()  # a stage built in memory has nothing to release
    index.release_pages()


def test_other_revision_or_parameters_is_a_miss(builder: FixtureBuilder, tmp_path: Path) -> None:
    index, _ = _index(builder)
    path = tmp_path / "kb.features"
    assert load_feature_candidates(path, REVISION, MIN_INSTRUCTIONS) is None  # absent
    save_feature_candidates(index, path, REVISION, MIN_INSTRUCTIONS)
    assert load_feature_candidates(path, REVISION + 1, MIN_INSTRUCTIONS) is None
    assert load_feature_candidates(path, REVISION, MIN_INSTRUCTIONS + 1) is None


@pytest.mark.parametrize(
    ("array", "damage"),
    [
        ("postings", lambda a: a + 1_000_000),
        ("keys", lambda a: a[::-1].copy()),
        ("strings_offsets", lambda a: a[:-1].copy()),
        ("minhash", lambda a: a.astype(np.uint64)),
        ("calls_negative", lambda a: a[1:].copy()),
        ("strings_ids", lambda a: a + 1_000_000),
        ("strings_blob", lambda a: np.full_like(a, 0xFF)),
        ("calls_offsets", lambda a: a[::-1].copy()),
    ],
)
def test_damaged_cache_is_refused(
    builder: FixtureBuilder, tmp_path: Path, array: str, damage: object
) -> None:
    index, _ = _index(builder)
    path = tmp_path / "kb.features"
    save_feature_candidates(index, path, REVISION, MIN_INSTRUCTIONS)
    target = path / f"{array}.npy"
    assert callable(damage)
    np.save(target, damage(np.load(target)), allow_pickle=False)
    with pytest.raises(IndexCacheError):
        load_feature_candidates(path, REVISION, MIN_INSTRUCTIONS)


def test_truncated_file_is_refused(builder: FixtureBuilder, tmp_path: Path) -> None:
    index, _ = _index(builder)
    path = tmp_path / "kb.features"
    save_feature_candidates(index, path, REVISION, MIN_INSTRUCTIONS)
    target = path / "robust_minhash.npy"
    target.write_bytes(target.read_bytes()[:200])
    with pytest.raises(IndexCacheError):
        load_feature_candidates(path, REVISION, MIN_INSTRUCTIONS)


def test_values_the_arrays_cannot_carry_are_not_saved(
    builder: FixtureBuilder, tmp_path: Path
) -> None:
    pool = [f for f in _functions(builder, "O0") if f.instruction_count >= MIN_INSTRUCTIONS]
    pool[0] = replace(pool[0], immediates=(1 << 70,))
    index = FeatureCandidateIndex.build([(1, pool)], MIN_INSTRUCTIONS)
    path = tmp_path / "kb.features"
    assert not save_feature_candidates(index, path, REVISION, MIN_INSTRUCTIONS)
    assert not path.exists()
