"""Function index: exact and near-duplicate lookup, LSH recall against theory, persistence."""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import earmark.index
from earmark.index import (
    MIN_INSTRUCTIONS,
    FunctionIndex,
    IndexCacheError,
    QueryFunctions,
    candidate_probability,
    function_index,
    s_curve_threshold,
)
from earmark.index.function_index import MAX_ROWS_PER_BUCKET
from earmark.index.lsh import (
    BAND_COUNT,
    count_agreeing_slots,
    estimate_jaccard_from_agreement,
    expand_ranges,
    locate_keys,
    pair_budget_runs,
    reduce_signatures,
)
from earmark.index.packed import PackedColumns, PackedUInts, byte_width
from earmark.model.kb import FunctionTable
from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures

_PRIME = 4_294_967_291
_COEFFICIENTS = np.random.default_rng(12345).integers(1, _PRIME, size=(2, MINHASH_PERMUTATIONS))


def minhash_of(elements: np.ndarray) -> np.ndarray:
    """Real MinHash (universal hashing mod a prime) of a set of integers, as the extractor does."""
    values = elements.astype(np.uint64).reshape(1, -1)
    a = _COEFFICIENTS[0].astype(np.uint64).reshape(-1, 1)
    b = _COEFFICIENTS[1].astype(np.uint64).reshape(-1, 1)
    return ((a * values + b) % np.uint64(_PRIME)).min(axis=1).astype(np.uint32)


def set_pair(rng: np.random.Generator, jaccard: float, union: int = 240) -> tuple[np.ndarray, ...]:
    """Two integer sets whose Jaccard index is exactly round(jaccard * union) / union."""
    elements = rng.choice(1 << 31, size=union, replace=False)
    shared = round(jaccard * union)
    only = (union - shared) // 2
    first = elements[: shared + only]
    second = np.concatenate((elements[:shared], elements[shared + only : shared + 2 * only]))
    return first, second


def make_table(
    minhash: np.ndarray,
    sample_id: np.ndarray | None = None,
    instruction_count: np.ndarray | None = None,
    exact_hash: np.ndarray | None = None,
) -> FunctionTable:
    rows = minhash.shape[0]
    rng = np.random.default_rng(rows)
    return FunctionTable(
        function_id=np.arange(1000, 1000 + rows, dtype=np.int64),
        sample_id=np.zeros(rows, dtype=np.int64) if sample_id is None else sample_id,
        address=np.arange(rows, dtype=np.uint64) * 16 + 0x401000,
        size=np.full(rows, 80, dtype=np.uint32),
        instruction_count=np.full(rows, 40, dtype=np.uint32)
        if instruction_count is None
        else instruction_count,
        exact_hash=rng.integers(0, 1 << 63, size=rows, dtype=np.uint64)
        if exact_hash is None
        else exact_hash,
        minhash=minhash.astype(np.uint32),
    )


def random_minhash(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.integers(0, 1 << 32, size=(rows, MINHASH_PERMUTATIONS), dtype=np.uint32)


def queries_for(minhash: np.ndarray, exact_hash: np.ndarray | None = None) -> QueryFunctions:
    rows = minhash.shape[0]
    return QueryFunctions(
        exact_hash=np.full(rows, 3, dtype=np.uint64) if exact_hash is None else exact_hash,
        minhash=minhash.astype(np.uint32),
        instruction_count=np.full(rows, 40, dtype=np.uint32),
    )


def test_public_api_is_exactly_all() -> None:
    public = {name for name in dir(earmark.index) if not name.startswith("_")}
    # Submodules appear as attributes once anything imports them; they are not API names.
    modules = {info.name for info in pkgutil.iter_modules(earmark.index.__path__)}
    assert public - modules == set(earmark.index.__all__)


def test_exact_duplicates_are_found_and_marked_exact() -> None:
    rng = np.random.default_rng(1)
    table = make_table(random_minhash(rng, 5000))
    index = FunctionIndex.build(table, revision=1)
    picked = np.array([7, 1234, 4999])
    matches = index.query(queries_for(table.minhash[picked], table.exact_hash[picked]))
    for position, row in enumerate(picked):
        found = matches.for_query(position)
        assert found.function_id[0] == table.function_id[row]
        assert bool(found.exact[0])
        assert found.similarity[0] == 1.0
        assert found.sample_id[0] == table.sample_id[row]


def test_near_duplicates_found_and_unrelated_not() -> None:
    rng = np.random.default_rng(2)
    stored_sets = [rng.choice(1 << 31, size=200, replace=False) for _ in range(300)]
    table = make_table(np.stack([minhash_of(s) for s in stored_sets]))
    index = FunctionIndex.build(table, revision=1)
    # Near duplicate: 90 % of the elements kept, a few new ones (Jaccard ~ 0.82).
    near = np.concatenate((stored_sets[42][:180], rng.choice(1 << 31, size=20) + (1 << 31)))
    unrelated = rng.choice(1 << 31, size=200, replace=False) + (1 << 32)
    matches = index.query(queries_for(np.stack([minhash_of(near), minhash_of(unrelated)])))
    near_matches = matches.for_query(0)
    assert near_matches.function_id.tolist() == [table.function_id[42]]
    assert 0.65 <= float(near_matches.similarity[0]) <= 0.98
    assert not bool(near_matches.exact[0])
    assert len(matches.for_query(1)) == 0


def test_query_accepts_function_features() -> None:
    rng = np.random.default_rng(3)
    table = make_table(random_minhash(rng, 100))
    index = FunctionIndex.build(table, revision=1)
    feature = FunctionFeatures(
        address=0x401000,
        size=80,
        block_count=3,
        edge_count=2,
        instruction_count=40,
        exact_hash=int(table.exact_hash[5]),
        minhash=tuple(int(v) for v in table.minhash[5]),
        normalized=(),
        calls=(),
        called_imports=(),
        strings=(),
        constants=(),
        name=None,
        source="symbol",
    )
    matches = index.query([feature])
    assert matches.function_id.tolist() == [int(table.function_id[5])]
    assert matches.exact.tolist() == [True]


@pytest.mark.parametrize("jaccard", [0.3, 0.5, 0.6, 0.8])
def test_lsh_candidate_recall_follows_the_s_curve(jaccard: float) -> None:
    """Candidate recall at min_similarity 0 vs 1 - (1 - p^4)^16 (p with b-bit agreement)."""
    rng = np.random.default_rng(int(jaccard * 100))
    pairs = 400
    stored, queried = zip(*(set_pair(rng, jaccard) for _ in range(pairs)), strict=True)
    table = make_table(np.stack([minhash_of(s) for s in stored]))
    index = FunctionIndex.build(table, revision=1)
    matches = index.query(queries_for(np.stack([minhash_of(s) for s in queried])), 0.0, 1000)
    found = {(int(q), int(f)) for q, f in zip(matches.query, matches.function_id, strict=True)}
    recall = sum((i, int(table.function_id[i])) in found for i in range(pairs)) / pairs
    expected = candidate_probability(jaccard)
    tolerance = 4 * np.sqrt(expected * (1 - expected) / pairs) + 0.02
    assert abs(recall - expected) <= tolerance, (recall, expected)


def test_s_curve_threshold_is_near_one_half() -> None:
    assert s_curve_threshold() == pytest.approx(0.5, abs=0.01)
    assert candidate_probability(0.2) < 0.05 < 0.95 < candidate_probability(0.8)


@settings(max_examples=25, deadline=None)
@given(jaccard=st.floats(0.1, 0.95), seed=st.integers(0, 2**32 - 1))
def test_bbit_estimate_is_close_to_true_jaccard(jaccard: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    first, second = set_pair(rng, jaccard)
    true = len(np.intersect1d(first, second)) / len(np.union1d(first, second))
    stored = reduce_signatures(minhash_of(first).reshape(1, -1))
    query = reduce_signatures(minhash_of(second).reshape(1, -1))
    row = np.zeros(1, dtype=np.int64)
    estimate = float(
        estimate_jaccard_from_agreement(count_agreeing_slots(stored, row, query, row))[0]
    )
    # 5 sigma of the 64-permutation estimator (sigma <= 0.0627 with 8-bit values).
    assert abs(estimate - true) <= 5 * 0.0627


def test_bbit_estimate_error_measured() -> None:
    """8-bit values add little error: std of (estimate - J) at J=0.5 stays near 0.0625."""
    rng = np.random.default_rng(9)
    errors = []
    for _ in range(1500):
        first, second = set_pair(rng, 0.5)
        stored = reduce_signatures(minhash_of(first).reshape(1, -1))
        query = reduce_signatures(minhash_of(second).reshape(1, -1))
        row = np.zeros(1, dtype=np.int64)
        agreeing = count_agreeing_slots(stored, row, query, row)
        errors.append(float(estimate_jaccard_from_agreement(agreeing)[0]) - 0.5)
    assert abs(float(np.mean(errors))) < 0.01  # unbiased after removing chance agreement
    assert float(np.std(errors)) < 0.07


def test_min_similarity_and_top_k_order() -> None:
    rng = np.random.default_rng(4)
    base = random_minhash(rng, 1)[0]
    variants = []
    for keep in (64, 60, 52, 44, 36):  # slots kept equal to the base
        variant = base.copy()
        variant[keep:] = rng.integers(0, 1 << 32, size=64 - keep, dtype=np.uint32)
        variants.append(variant)
    table = make_table(np.stack(variants))
    index = FunctionIndex.build(table, revision=1)
    matches = index.query(queries_for(base.reshape(1, -1)), min_similarity=0.6, top_k=3)
    assert matches.function_id.tolist() == [1000, 1001, 1002]
    assert np.all(np.diff(matches.similarity) <= 0)
    assert float(matches.similarity[-1]) >= 0.6


def test_minimum_size_filter_on_both_sides() -> None:
    rng = np.random.default_rng(5)
    minhash = random_minhash(rng, 4)
    counts = np.array([MIN_INSTRUCTIONS - 1, MIN_INSTRUCTIONS, 3, 200], dtype=np.uint32)
    index = FunctionIndex.build(make_table(minhash, instruction_count=counts), revision=1)
    assert len(index) == 2
    assert sorted(index.function_id.tolist()) == [1001, 1003]
    small_query = QueryFunctions(
        exact_hash=np.zeros(2, dtype=np.uint64),
        minhash=minhash[[1, 3]],
        instruction_count=np.array([MIN_INSTRUCTIONS - 1, 50], dtype=np.uint32),
    )
    matches = index.query(small_query)
    assert matches.skipped_small == 1
    assert matches.query.tolist() == [1]
    assert matches.function_id.tolist() == [1003]


def test_full_buckets_are_cut_and_counted() -> None:
    rng = np.random.default_rng(6)
    common = random_minhash(rng, 1)
    table = make_table(np.repeat(common, MAX_ROWS_PER_BUCKET + 50, axis=0))
    index = FunctionIndex.build(table, revision=1)
    matches = index.query(queries_for(common), top_k=10_000)
    assert matches.truncated_buckets == 16
    assert len(matches) == MAX_ROWS_PER_BUCKET


def test_matching_in_passes_gives_the_matches_of_one_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Queries sharing big buckets (runtime-like code) and near-duplicates, matched with a pair
    budget so small that every query is its own pass: the same matches, in the same order."""
    rng = np.random.default_rng(8)
    common = random_minhash(rng, 3)
    stored = [np.repeat(common, 40, axis=0), random_minhash(rng, 300)]
    variants = random_minhash(rng, 60)
    variants[:, :48] = stored[1][:60, :48]  # three quarters of the slots shared
    table = make_table(np.concatenate(stored))
    index = FunctionIndex.build(table, revision=1)
    query = queries_for(np.concatenate((common, variants, random_minhash(rng, 20))))
    whole = index.query(query, min_similarity=0.3, top_k=7)
    assert len(whole) == 3 * 7 + 60 and whole.truncated_buckets == 0
    monkeypatch.setattr(function_index, "MAX_PAIRS_PER_PASS", 1)
    passes = index.query(query, min_similarity=0.3, top_k=7)
    for name in ("query", "row", "function_id", "sample_id", "similarity", "exact"):
        assert np.array_equal(getattr(whole, name), getattr(passes, name)), name


def test_pair_budget_runs_cover_every_query_once() -> None:
    pairs = np.array([5, 0, 7, 3, 20, 1, 1, 0], dtype=np.int64)
    runs = pair_budget_runs(pairs, 10)
    assert runs == [(0, 2), (2, 4), (4, 5), (5, 8)]
    assert pair_budget_runs(np.zeros(0, dtype=np.int64), 10) == []


def test_empty_index_and_empty_query() -> None:
    rng = np.random.default_rng(7)
    empty = FunctionIndex.build(make_table(random_minhash(rng, 0)), revision=1)
    assert len(empty) == 0
    assert len(empty.query(queries_for(random_minhash(rng, 3)))) == 0
    index = FunctionIndex.build(make_table(random_minhash(rng, 10)), revision=1)
    assert len(index.query(queries_for(random_minhash(rng, 0)))) == 0


def test_expand_ranges_cuts_long_ranges() -> None:
    owners, positions, cut = expand_ranges(
        np.array([5, 0, 9], dtype=np.int64), np.array([8, 0, 20], dtype=np.int64), limit=4
    )
    assert owners.tolist() == [0, 0, 0, 2, 2, 2, 2]
    assert positions.tolist() == [5, 6, 7, 9, 10, 11, 12]
    assert cut == 1


def test_persistence_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    table = make_table(random_minhash(rng, 3000), sample_id=np.arange(3000, dtype=np.int64) // 100)
    index = FunctionIndex.build(table, revision=17, samples={})
    path = tmp_path / "function-index"
    index.save(path)
    query = queries_for(table.minhash[:50], table.exact_hash[:50])
    for memory_map in (False, True):
        loaded = FunctionIndex.load(path, revision=17, memory_map=memory_map)
        assert loaded is not None and loaded.rarity is not None and index.rarity is not None
        np.testing.assert_array_equal(loaded.signatures, index.signatures)
        np.testing.assert_array_equal(loaded.band_orders.data, index.band_orders.data)
        np.testing.assert_array_equal(loaded.rarity.profile.data, index.rarity.profile.data)
        np.testing.assert_array_equal(loaded.rarity.weight, index.rarity.weight)
        expected, got = index.query(query), loaded.query(query)
        np.testing.assert_array_equal(got.function_id, expected.function_id)
        np.testing.assert_array_equal(got.similarity, expected.similarity)
    assert FunctionIndex.load(path, revision=18) is None  # stale cache
    assert FunctionIndex.load(tmp_path / "missing", revision=17) is None


def test_damaged_cache_raises_typed_error_and_is_rebuilt(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    table = make_table(random_minhash(rng, 500))
    path = tmp_path / "function-index"
    FunctionIndex.build(table, revision=3, samples={}).save(path)
    (path / "band_orders.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(IndexCacheError):
        FunctionIndex.load(path, revision=3)
    rebuilt = FunctionIndex.load_or_build(path, 3, table, samples={})
    assert len(rebuilt) == 500
    reloaded = FunctionIndex.load(path, revision=3)
    assert reloaded is not None and len(reloaded) == 500


def test_out_of_range_permutation_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    path = tmp_path / "function-index"
    FunctionIndex.build(make_table(random_minhash(rng, 100)), revision=1).save(path)
    orders = np.load(path / "band_orders.npy")
    assert orders.shape == (15, 100, 1)  # row numbers 0..99 need one byte
    orders[0, 0] = 200
    np.save(path / "band_orders.npy", orders)
    with pytest.raises(IndexCacheError):
        FunctionIndex.load(path, revision=1)


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("sample_position", lambda a: np.full_like(a, 7)),  # past the 4 samples
        ("rarity_profile", lambda a: np.full_like(a, 250)),  # past the few profiles
        ("function_id", lambda a: np.zeros((a.shape[0], 9), dtype=np.uint8)),  # 9-byte ints
        ("rarity_family_examples", lambda a: np.full_like(a, 100)),  # names that do not exist
    ],
)
def test_damaged_packed_columns_are_refused(
    tmp_path: Path, name: str, damage: Callable[[np.ndarray], np.ndarray]
) -> None:
    rng = np.random.default_rng(13)
    table = make_table(random_minhash(rng, 200), sample_id=np.arange(200, dtype=np.int64) // 50)
    path = tmp_path / "function-index"
    FunctionIndex.build(table, revision=1, samples={}).save(path)
    assert FunctionIndex.load(path, revision=1) is not None
    np.save(path / f"{name}.npy", damage(np.load(path / f"{name}.npy")))
    with pytest.raises(IndexCacheError):
        FunctionIndex.load(path, revision=1)


def test_index_memory_per_function() -> None:
    rng = np.random.default_rng(12)
    table = make_table(
        random_minhash(rng, 2000), sample_id=np.arange(2000, dtype=np.int64) // 500 + 70_000
    )
    index = FunctionIndex.build(table, revision=1)
    # Rows 0..1999 and ids 1000..2999 need 2 bytes; four sample positions need 1.
    assert index.lookup_nbytes / len(index) == 64 + 15 * 2
    assert index.band_orders.width == index.function_id.width == 2
    assert index.sample_position.width == 1
    assert index.sample_ids.tolist() == [70_000, 70_001, 70_002, 70_003]
    assert index.nbytes == len(index) * (64 + 15 * 2 + 8 + 2 + 1) + 4 * 8


def test_packed_columns_widen_to_the_stored_values() -> None:
    values = np.array([0, 1, 255, 256, 65_535, 1 << 24, (1 << 40) + 7], dtype=np.int64)
    for width in range(6, 9):
        packed = PackedUInts.pack(values, width)
        assert packed.width == width
        assert packed.unpack().tolist() == values.tolist()
        assert packed[np.array([6, 0, 3])].tolist() == [(1 << 40) + 7, 0, 256]
        assert packed[4] == 65_535
        assert packed.maximum() == (1 << 40) + 7
    assert PackedUInts.pack(values[:3]).width == 1
    assert PackedUInts.pack(values[:5]).width == 2
    assert PackedUInts.pack(values[:6]).width == 4  # 2^24 needs a fourth byte
    assert PackedUInts.pack(np.zeros(0, dtype=np.int64)).maximum() == -1
    with pytest.raises(ValueError):
        PackedUInts.pack(values, width=4)
    with pytest.raises(ValueError):
        PackedUInts.pack(np.array([-1, 2]))


@given(st.lists(st.integers(0, (1 << 63) - 1), min_size=1, max_size=40), st.data())
def test_packed_reads_equal_for_every_width(values: list[int], data: st.DataObject) -> None:
    """Widths numpy has a dtype for are read through a view, the others widened: same values,
    also for a column sliced out of a ``PackedColumns`` block."""
    array = np.array(values, dtype=np.int64)
    picks = np.array(
        data.draw(st.lists(st.integers(0, len(values) - 1), max_size=10)), dtype=np.int64
    )
    for width in range(byte_width(max(values)), 9):
        packed = PackedUInts.pack(array, width)
        column = PackedColumns.pack([array, array[::-1].copy()], width).column(0)
        for column_view in (packed, column):
            assert column_view.tolist() == values
            assert column_view[picks].tolist() == array[picks].tolist()
            assert column_view[len(values) - 1] == values[-1]
            assert column_view[1:3].tolist() == values[1:3]


@given(
    st.lists(st.integers(0, (1 << 32) - 1) | st.sampled_from([0, 7, (1 << 32) - 1]), max_size=60),
    st.lists(st.integers(0, (1 << 32) - 1) | st.sampled_from([0, 7, (1 << 32) - 1]), max_size=9),
)
def test_band_bounds_equal_searchsorted(keys: list[int], targets: list[int]) -> None:
    """``locate_keys`` through a permutation (plain or packed) or over sorted rows gives
    numpy's lower and upper bounds of the sorted band."""
    matrix = np.zeros((len(keys), BAND_COUNT), dtype=np.uint32)
    matrix[:, 3] = keys
    wanted = np.array(targets, dtype=np.uint32)
    ordered = np.sort(matrix[:, 3])
    expected = (
        np.searchsorted(ordered, wanted, side="left").tolist(),
        np.searchsorted(ordered, wanted, side="right").tolist(),
    )
    order = np.argsort(matrix[:, 3], kind="stable").astype(np.uint32)
    for permutation in (order, PackedUInts.pack(order.astype(np.int64))):
        low, high = locate_keys(matrix, 3, permutation, wanted)
        assert (low.tolist(), high.tolist()) == expected
    matrix[:, 3] = ordered
    low, high = locate_keys(matrix, 3, None, wanted)
    assert (low.tolist(), high.tolist()) == expected


def test_agreeing_slots_count_equal_bytes() -> None:
    """The word-wise count equals comparing slot by slot, on contiguous signatures and on a
    strided view (counted byte by byte)."""
    rng = np.random.default_rng(21)
    stored = rng.integers(0, 4, size=(300, MINHASH_PERMUTATIONS), dtype=np.uint8)
    queries = rng.integers(0, 4, size=(40, MINHASH_PERMUTATIONS), dtype=np.uint8)
    queries[:5] = stored[:5]
    stored[7] = np.uint8(255) - queries[7]  # no slot agrees
    rows = rng.integers(0, len(stored), 5000).astype(np.int64)
    query_rows = rng.integers(0, len(queries), 5000).astype(np.int64)
    rows[:8], query_rows[:8] = np.arange(8), np.arange(8)
    expected = (stored[rows] == queries[query_rows]).sum(axis=1)
    assert count_agreeing_slots(stored, rows, queries, query_rows).tolist() == expected.tolist()
    assert set(expected[:5].tolist()) == {64} and expected[7] == 0
    strided = np.repeat(stored, 2, axis=1)[:, ::2]
    assert count_agreeing_slots(strided, rows, queries, query_rows).tolist() == expected.tolist()


@given(st.lists(st.integers(0, (1 << 63) - 1), max_size=40))
def test_packed_round_trip(values: list[int]) -> None:
    packed = PackedUInts.pack(np.array(values, dtype=np.int64))
    assert packed.tolist() == values
    assert np.asarray(packed).tolist() == values
    assert packed.width == byte_width(max(values, default=0))
