"""``function_similarity`` of many (query function, compact KB function) pairs at once.

Re-ranking scores every surviving index match (about 1,500 per query on the PE bench KB).
One ``function_similarity`` call costs ~40 µs in Python, and rebuilding the KB side as a
``FunctionFeatures`` another ~20 µs, so the batch reads the KB side straight from the
``CompactFunctions`` columns and scores all pairs with numpy:
- each distinct function is turned into columns once (MinHash rows, shape vector, and its
  reference sets as distinct token ids over a vocabulary shared by both sides);
- a set family's intersection sizes come from one ``intersect1d`` over (pair, token) keys.
The arithmetic is the scalar function's, operation for operation (same float64 sums in the same
order, the same float32 shape score via ``shape_scores``), so every pair scores bit-for-bit
what ``function_similarity`` gives; pairs whose values do not fit the columns (hand-made
features files) are scored by ``function_similarity`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from earmark.index.compact_functions import (
    CompactFunctions,
    IntColumn,
    TextColumn,
    fits_columns,
)
from earmark.index.lsh import expand_ranges
from earmark.index.similarity import (
    CODE_WEIGHT,
    CONSTANTS_WEIGHT,
    IMMEDIATES_WEIGHT,
    IMPORTS_WEIGHT,
    ROBUST_WEIGHT,
    SHAPE_WEIGHT,
    STRINGS_WEIGHT,
    function_similarity,
    shape_closeness,
    shape_scores,
)
from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures

# Pairs whose MinHash rows are compared per step: bounds the gathered (pairs, 64) uint32
# temporaries to 2 x 2 MB however many matches a query has (a 10,000-function query with 20
# matches each would otherwise gather 2 x 51 MB).
PAIR_CHUNK: Final = 8192

# The MinHash of an empty stream: every slot keeps its initial maximum (as in ``similarity``).
_EMPTY_SLOT: Final = 0xFFFFFFFF
_UINT64_MASK: Final = (1 << 64) - 1
_NO_LIMIT: Final = 1 << 62

Int64Array = npt.NDArray[np.int64]
Float64Array = npt.NDArray[np.float64]
# One set family of several functions: (offsets (rows + 1,), distinct token ids per row).
_Sets = tuple[Int64Array, Int64Array]


@dataclass(frozen=True)
class _Columns:
    """Distinct functions of one side as arrays (set families in ``similarity`` order)."""

    exact_hash: npt.NDArray[np.uint64]
    instruction_count: Int64Array
    minhash: npt.NDArray[np.uint32]  # (rows, 64)
    has_minhash: npt.NDArray[np.bool_]
    robust: npt.NDArray[np.uint32]
    has_robust: npt.NDArray[np.bool_]
    robust_empty: npt.NDArray[np.bool_]  # every robust slot is the empty-stream value
    shape: npt.NDArray[np.float32]  # (rows, 4) log2 counts, as ``similarity._shape_vector``
    sets: tuple[_Sets, ...]


def _log2_counts(counts: Int64Array) -> npt.NDArray[np.float32]:
    values: npt.NDArray[np.float32] = np.log2(counts.astype(np.float32) + 1.0)
    return values


def _signature_rows(
    rows: Sequence[tuple[int, ...]],
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.bool_]]:
    present = np.array([len(row) > 0 for row in rows], dtype=bool)
    matrix = np.full((len(rows), MINHASH_PERMUTATIONS), _EMPTY_SLOT, dtype=np.uint32)
    if present.any():
        matrix[present] = np.array([row for row in rows if row], dtype=np.uint32)
    return matrix, present


def _distinct_rows(owner: Int64Array, tokens: Int64Array, rows: int, vocabulary: int) -> _Sets:
    """Per row, its distinct tokens (a frozenset's members), as CSR."""
    keys = np.unique(owner * max(vocabulary, 1) + tokens)
    owners = keys // max(vocabulary, 1)
    counts = np.bincount(owners, minlength=rows)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return offsets, (keys % max(vocabulary, 1)).astype(np.int64)


_Item = TypeVar("_Item")


def _flatten(lists: Sequence[Sequence[_Item]]) -> tuple[Int64Array, list[_Item]]:
    """(owning row of each item, the items) of per-row lists."""
    owner = np.repeat(np.arange(len(lists), dtype=np.int64), [len(items) for items in lists])
    return owner, [item for items in lists for item in items]


def _int_sets(
    name: str,
    queries: Sequence[FunctionFeatures],
    column: IntColumn,
    positions: Int64Array,
) -> tuple[_Sets, _Sets]:
    """One integer family of both sides as distinct-token CSRs over one vocabulary. An integer
    is keyed by (value mod 2**64, sign), one-to-one on the range the columns hold
    (``fits_columns``), so equal integers get equal ids and unequal ones do not."""
    owner, spots, _ = expand_ranges(
        column.offsets[positions], column.offsets[positions + 1], _NO_LIMIT
    )
    query_owner, query_values = _flatten([getattr(f, name) for f in queries])
    masked = np.array([value & _UINT64_MASK for value in query_values], dtype=np.uint64)
    negative = np.array([value < 0 for value in query_values], dtype=bool)
    values = np.concatenate((masked, column.values[spots]))
    _, inverse = np.unique(values, return_inverse=True)
    ids = inverse.reshape(-1).astype(np.int64) * 2 + np.concatenate(
        (negative, column.negative[spots])
    )
    size = 2 * (int(inverse.max()) + 1) if len(inverse) else 1
    return (
        _distinct_rows(query_owner, ids[: len(masked)], len(queries), size),
        _distinct_rows(owner, ids[len(masked) :], len(positions), size),
    )


def _text_sets(
    name: str,
    normal: Callable[[str], str],
    queries: Sequence[FunctionFeatures],
    column: TextColumn,
    positions: Int64Array,
) -> tuple[_Sets, _Sets]:
    """One text family of both sides (texts as ``normal`` makes them) over one vocabulary."""
    owner, spots, _ = expand_ranges(
        column.offsets[positions], column.offsets[positions + 1], _NO_LIMIT
    )
    vocabulary: dict[str, int] = {}
    # Each distinct stored text is decoded and normalised once, not once per occurrence.
    distinct, inverse = np.unique(column.ids[spots], return_inverse=True)
    distinct_ids = np.array(
        [vocabulary.setdefault(normal(column.text(k)), len(vocabulary)) for k in distinct.tolist()],
        dtype=np.int64,
    )
    stored_ids = distinct_ids[inverse.reshape(-1)]
    query_owner, query_texts = _flatten([getattr(f, name) for f in queries])
    query_ids = np.array(
        [vocabulary.setdefault(normal(text), len(vocabulary)) for text in query_texts],
        dtype=np.int64,
    )
    return (
        _distinct_rows(query_owner, query_ids, len(queries), len(vocabulary)),
        _distinct_rows(owner, stored_ids, len(positions), len(vocabulary)),
    )


def _import_name(name: str) -> str:
    # As ``similarity._import_names``: "libc.so.6!memcpy" and "msvcrt.dll!memcpy" are one API.
    return name.rsplit("!", 1)[-1]


def _same_text(text: str) -> str:
    return text


def _query_columns(queries: Sequence[FunctionFeatures], sets: tuple[_Sets, ...]) -> _Columns:
    minhash, has_minhash = _signature_rows([f.minhash for f in queries])
    robust, has_robust = _signature_rows([f.robust_minhash for f in queries])
    counts = np.array(
        [
            (f.instruction_count, f.block_count, f.edge_count, len(f.calls) + len(f.called_imports))
            for f in queries
        ],
        dtype=np.int64,
    ).reshape(len(queries), 4)
    return _Columns(
        exact_hash=np.array([f.exact_hash for f in queries], dtype=np.uint64),
        instruction_count=counts[:, 0].copy(),
        minhash=minhash,
        has_minhash=has_minhash,
        robust=robust,
        has_robust=has_robust,
        robust_empty=(robust == _EMPTY_SLOT).all(axis=1),
        shape=_log2_counts(counts),
        sets=sets,
    )


def _row_lengths(offsets: Int64Array, positions: Int64Array) -> Int64Array:
    lengths: Int64Array = offsets[positions + 1] - offsets[positions]
    return lengths


def _stored_columns(
    stored: CompactFunctions, positions: Int64Array, sets: tuple[_Sets, ...]
) -> _Columns:
    instruction_count = stored.instruction_count[positions]
    references = _row_lengths(stored.int_references["calls"].offsets, positions) + _row_lengths(
        stored.text_references["called_imports"].offsets, positions
    )
    counts = np.stack(
        (
            instruction_count,
            stored.block_count[positions],
            stored.edge_count[positions],
            references,
        ),
        axis=1,
    )
    robust = stored.signature_rows("robust_minhash", positions)
    return _Columns(
        exact_hash=stored.exact_hash[positions],
        instruction_count=instruction_count,
        minhash=stored.signature_rows("minhash", positions),
        has_minhash=stored.minhash_length[positions] > 0,
        robust=robust,
        has_robust=stored.robust_length[positions] > 0,
        robust_empty=(robust == _EMPTY_SLOT).all(axis=1),
        shape=_log2_counts(counts),
        sets=sets,
    )


def _agreeing_slots(
    first: npt.NDArray[np.uint32],
    first_rows: Int64Array,
    second: npt.NDArray[np.uint32],
    second_rows: Int64Array,
) -> Int64Array:
    """Equal MinHash slots of each pair (first[first_rows[i]], second[second_rows[i]])."""
    counts = np.empty(len(first_rows), dtype=np.int64)
    for start in range(0, len(first_rows), PAIR_CHUNK):
        stop = start + PAIR_CHUNK
        equal = first[first_rows[start:stop]] == second[second_rows[start:stop]]
        counts[start:stop] = equal.sum(axis=1, dtype=np.int64)
    return counts


def _set_jaccard(
    first: _Sets, first_rows: Int64Array, second: _Sets, second_rows: Int64Array
) -> tuple[Float64Array, npt.NDArray[np.bool_]]:
    """Jaccard of each pair's two token sets, and whether either set is non-empty."""
    pairs = len(first_rows)
    (first_offsets, first_ids), (second_offsets, second_ids) = first, second
    first_pair, first_spots, _ = expand_ranges(
        first_offsets[first_rows], first_offsets[first_rows + 1], _NO_LIMIT
    )
    second_pair, second_spots, _ = expand_ranges(
        second_offsets[second_rows], second_offsets[second_rows + 1], _NO_LIMIT
    )
    span = int(max(first_ids.max(initial=0), second_ids.max(initial=0))) + 1
    # Keys are unique on each side (each row's tokens are distinct), so a key on both sides is
    # one shared token of that pair.
    shared = np.intersect1d(
        first_pair * span + first_ids[first_spots],
        second_pair * span + second_ids[second_spots],
        assume_unique=True,
    )
    intersection = np.bincount(shared // span, minlength=pairs)
    union = (
        _row_lengths(first_offsets, first_rows)
        + _row_lengths(second_offsets, second_rows)
        - intersection
    )
    present = union > 0
    jaccard = np.divide(intersection, union, out=np.zeros(pairs, dtype=np.float64), where=present)
    return jaccard, present


def _score_pairs(
    query: _Columns, query_rows: Int64Array, stored: _Columns, stored_rows: Int64Array
) -> Float64Array:
    """``function_similarity``'s arithmetic over arrays of pairs (see its body, step by step)."""
    exact = (query.exact_hash[query_rows] == stored.exact_hash[stored_rows]) & (
        query.instruction_count[query_rows] == stored.instruction_count[stored_rows]
    )
    both_minhash = query.has_minhash[query_rows] & stored.has_minhash[stored_rows]
    agreeing = _agreeing_slots(query.minhash, query_rows, stored.minhash, stored_rows)
    code = np.where(exact, 1.0, np.where(both_minhash, agreeing / MINHASH_PERMUTATIONS, 0.0))
    closeness = shape_closeness(query.shape[query_rows], stored.shape[stored_rows])
    shape = shape_scores(closeness).astype(np.float64)
    total = CODE_WEIGHT * code + SHAPE_WEIGHT * shape
    weights = np.full(len(query_rows), CODE_WEIGHT + SHAPE_WEIGHT, dtype=np.float64)
    robust_present = (query.has_robust[query_rows] & stored.has_robust[stored_rows]) & ~(
        query.robust_empty[query_rows] & stored.robust_empty[stored_rows]
    )
    robust = _agreeing_slots(query.robust, query_rows, stored.robust, stored_rows)
    total = np.where(robust_present, total + ROBUST_WEIGHT * (robust / MINHASH_PERMUTATIONS), total)
    weights = np.where(robust_present, weights + ROBUST_WEIGHT, weights)
    family_weights = (IMMEDIATES_WEIGHT, CONSTANTS_WEIGHT, STRINGS_WEIGHT, IMPORTS_WEIGHT)
    families = zip(family_weights, query.sets, stored.sets, strict=True)
    for weight, query_sets, stored_sets in families:
        jaccard, present = _set_jaccard(query_sets, query_rows, stored_sets, stored_rows)
        total = np.where(present, total + weight * jaccard, total)
        weights = np.where(present, weights + weight, weights)
    scores: Float64Array = total / weights
    return scores


def stored_pair_similarity(
    queries: Sequence[FunctionFeatures],
    query_positions: Int64Array,
    stored: CompactFunctions,
    stored_positions: Int64Array,
) -> Float64Array:
    """``function_similarity(queries[query_positions[i]], stored.function(stored_positions[i]))``
    for every i, equal bit for bit."""
    scores = np.zeros(len(query_positions), dtype=np.float64)
    if len(query_positions) == 0:
        return scores
    query_distinct, query_rows = np.unique(query_positions, return_inverse=True)
    stored_distinct, stored_rows = np.unique(stored_positions, return_inverse=True)
    query_rows, stored_rows = query_rows.reshape(-1), stored_rows.reshape(-1)
    functions = [queries[position] for position in query_distinct.tolist()]
    query_regular = np.array([fits_columns(f) for f in functions], dtype=bool)
    stored_regular = (
        np.array(
            [position not in stored.irregular for position in stored_distinct.tolist()], dtype=bool
        )
        if stored.irregular
        else np.ones(len(stored_distinct), dtype=bool)
    )
    batched = query_regular[query_rows] & stored_regular[stored_rows]
    for pair in np.flatnonzero(~batched).tolist():
        scores[pair] = function_similarity(
            functions[query_rows[pair]], stored.function(int(stored_distinct[stored_rows[pair]]))
        )
    if not batched.any():
        return scores
    # Only regular functions become columns; rows are renumbered among them.
    regular_functions = [functions[k] for k in np.flatnonzero(query_regular).tolist()]
    query_renumber = np.cumsum(query_regular) - 1
    stored_renumber = np.cumsum(stored_regular) - 1
    positions = stored_distinct[stored_regular]
    families = [
        _int_sets(name, regular_functions, stored.int_references[name], positions)
        for name in ("immediates", "constants")
    ]
    families += [
        _text_sets(name, normal, regular_functions, stored.text_references[name], positions)
        for name, normal in (("strings", _same_text), ("called_imports", _import_name))
    ]
    # ``similarity._SET_FAMILIES`` order: immediates, constants, strings, imports.
    query_side = _query_columns(regular_functions, tuple(query for query, _ in families))
    stored_side = _stored_columns(stored, positions, tuple(kept for _, kept in families))
    scores[batched] = _score_pairs(
        query_side,
        query_renumber[query_rows[batched]],
        stored_side,
        stored_renumber[stored_rows[batched]],
    )
    return scores
