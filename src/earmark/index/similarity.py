"""Pairwise function similarity for re-ranking index matches and for ``earmark compare``.

The index finds candidates by MinHash over instruction n-grams alone, which is fast but blind
to what survives a change of compiler or -O level (DESIGN.md §5). ``function_similarity`` is a
weighted mean of feature families (docs/function-similarity.md has the measurements):
- ``code``: MinHash Jaccard of the normalised instruction n-grams (1.0 for an equal exact hash);
- ``robust``: MinHash Jaccard of the optimisation-robust stream (register moves, spills and frame
  set-up dropped; ``FunctionFeatures.robust_minhash``), what -O0 and -O3 builds still share;
- ``immediates``: small immediate operands (shift counts, compare bounds, masks);
- ``constants``, ``strings``, ``imports``: distinctive constants, referenced strings and
  called import names;
- ``shape``: log2 of instructions, blocks, edges and calls, compared within a factor of 8.
A set family counts only when one side has it, so two functions with no strings are neither
helped nor hurt by strings; one side having strings the other lacks is evidence against the
pair. The robust family counts when both sides carry the signature (features format >= 1.1).

``similarity_matrix`` is the batch form: MinHash agreement and shape in numpy broadcasts, the
set features as dense intersections over a shared vocabulary, in row chunks so memory stays
bounded for samples with thousands of functions.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures, SampleFeatures

# Weights of the feature families. Learnt on zlib alone (gcc and clang, O0:O3, O1:O3, O2:Os and
# gcc-O2:clang-O2; coordinate search maximising mean Recall@1 in the 1+100 setting) and reported
# on zstd and brotli, which were never used for tuning (docs/function-similarity.md). They sum to
# 1: an exact stream match with agreeing references scores 1.0.
CODE_WEIGHT: Final = 0.42
ROBUST_WEIGHT: Final = 0.21
IMMEDIATES_WEIGHT: Final = 0.105
CONSTANTS_WEIGHT: Final = 0.03
STRINGS_WEIGHT: Final = 0.10
IMPORTS_WEIGHT: Final = 0.05
# Shape components (instructions, blocks, edges, calls): the learnt search gave edges nothing
# once blocks are counted, and calls little (inlining changes them between -O levels).
SHAPE_COMPONENT_WEIGHTS: Final = (0.05, 0.025, 0.0, 0.01)
SHAPE_WEIGHT: Final = sum(SHAPE_COMPONENT_WEIGHTS)

# Two counts whose log2 differ by this much are considered unrelated in shape (a factor of 8:
# -O0 vs -O3 of one function rarely differs by more than 3x in instructions, measured on the
# xcomp corpus's zlib functions).
SHAPE_LOG2_RANGE: Final = 3.0

# Query rows handled per chunk in ``similarity_matrix`` (bounds the broadcast temporaries to
# chunk x candidates x 64 bytes of MinHash comparisons: 64 x 5,000 x 64 = 20 MB).
MATRIX_CHUNK_ROWS: Final = 64

# The MinHash of an empty stream: every slot keeps its initial maximum.
_EMPTY_SLOT: Final = 0xFFFFFFFF

FloatMatrix = npt.NDArray[np.float32]
_SHAPE_COMPONENTS: Final = np.asarray(SHAPE_COMPONENT_WEIGHTS, dtype=np.float32) / np.float32(
    SHAPE_WEIGHT
)


def _jaccard(first: frozenset[object], second: frozenset[object]) -> float | None:
    if not first and not second:
        return None
    return len(first & second) / len(first | second)


def _shape_vector(function: FunctionFeatures) -> npt.NDArray[np.float32]:
    counts = (
        function.instruction_count,
        function.block_count,
        function.edge_count,
        len(function.calls) + len(function.called_imports),
    )
    vector: npt.NDArray[np.float32] = np.log2(np.asarray(counts, dtype=np.float32) + 1.0)
    return vector


def shape_closeness(
    first: npt.NDArray[np.float32], second: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Per shape component (last axis), 1 for equal log2 counts down to 0 a factor of 8 apart."""
    distance = np.abs(first - second) / SHAPE_LOG2_RANGE
    closeness: npt.NDArray[np.float32] = np.clip(1.0 - distance, 0.0, 1.0)
    return closeness


def shape_scores(closeness: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Weighted mean of the shape components (last axis) of one pair or of many.

    Written out rather than ``closeness @ _SHAPE_COMPONENTS``: float32 products summed in order
    in float64, then rounded to float32, is what the one-pair ``@`` computes (numpy hands a
    float32 dot to BLAS ``sdot``, which accumulates in double), while a matrix ``@`` sums in
    float32 and differs in the last bit for about one pair in five. One formula keeps a pair
    scored alone and in a batch (``pair_similarity``) bit-for-bit equal.
    """
    products = closeness * _SHAPE_COMPONENTS
    total = products[..., 0].astype(np.float64)
    for component in range(1, len(SHAPE_COMPONENT_WEIGHTS)):
        total = total + products[..., component]
    return total.astype(np.float32)


def _shape_similarity(first: npt.NDArray[np.float32], second: npt.NDArray[np.float32]) -> float:
    # ``shape_scores`` of one pair, its float64 sum in Python floats (four numpy calls fewer).
    products = (shape_closeness(first, second) * _SHAPE_COMPONENTS).tolist()
    total = products[0]
    for product in products[1:]:
        total += product
    return float(np.float32(total))


def _agreeing(first: tuple[int, ...], second: tuple[int, ...]) -> int:
    """Equal slots of two signatures (``map`` compares in C: a generator took ~3 µs a pair)."""
    if len(first) != len(second):
        raise ValueError(f"signatures of {len(first)} and {len(second)} slots cannot be compared")
    return sum(map(operator.eq, first, second))


def minhash_jaccard(first: FunctionFeatures, second: FunctionFeatures) -> float:
    """Estimated Jaccard of the normalised instruction shingles (full 32-bit MinHash slots)."""
    if not first.minhash or not second.minhash:
        return 0.0
    return _agreeing(first.minhash, second.minhash) / len(first.minhash)


def robust_jaccard(first: FunctionFeatures, second: FunctionFeatures) -> float | None:
    """Estimated Jaccard of the optimisation-robust streams; None when a side predates the
    signature (format < 1.1) or both streams are empty."""
    if not first.robust_minhash or not second.robust_minhash:
        return None
    if first.robust_minhash[0] == second.robust_minhash[0] == _EMPTY_SLOT and all(
        value == _EMPTY_SLOT for value in (*first.robust_minhash, *second.robust_minhash)
    ):
        return None
    return _agreeing(first.robust_minhash, second.robust_minhash) / len(first.robust_minhash)


def _import_names(function: FunctionFeatures) -> frozenset[object]:
    # "libc.so.6!memcpy" and "msvcrt.dll!memcpy" are the same API for similarity purposes.
    return frozenset(name.rsplit("!", 1)[-1] for name in function.called_imports)


# Set-valued families: (weight, extractor).
_SET_FAMILIES: Final[tuple[tuple[float, Callable[[FunctionFeatures], frozenset[object]]], ...]] = (
    (IMMEDIATES_WEIGHT, lambda f: frozenset(f.immediates)),
    (CONSTANTS_WEIGHT, lambda f: frozenset(f.constants)),
    (STRINGS_WEIGHT, lambda f: frozenset(f.strings)),
    (IMPORTS_WEIGHT, _import_names),
)


def function_similarity(a: FunctionFeatures, b: FunctionFeatures) -> float:
    """Similarity of two functions in 0..1 (1: same normalised code, same references)."""
    if a.exact_hash == b.exact_hash and a.instruction_count == b.instruction_count:
        code = 1.0
    else:
        code = minhash_jaccard(a, b)
    shape = _shape_similarity(_shape_vector(a), _shape_vector(b))
    total = CODE_WEIGHT * code + SHAPE_WEIGHT * shape
    weights = CODE_WEIGHT + SHAPE_WEIGHT
    robust = robust_jaccard(a, b)
    if robust is not None:
        total += ROBUST_WEIGHT * robust
        weights += ROBUST_WEIGHT
    for weight, extract in _SET_FAMILIES:
        value = _jaccard(extract(a), extract(b))
        if value is not None:
            total += weight * value
            weights += weight
    return total / weights


class _SetFeature:
    """One set-valued feature of many functions as a dense 0/1 matrix over a shared vocabulary."""

    def __init__(self, rows: Sequence[frozenset[object]], vocabulary: dict[object, int]) -> None:
        self.sizes = np.array([len(row) for row in rows], dtype=np.float32)
        self.matrix = np.zeros((len(rows), max(len(vocabulary), 1)), dtype=np.float32)
        for position, row in enumerate(rows):
            for item in row:
                self.matrix[position, vocabulary[item]] = 1.0


def _set_features(
    queries: Sequence[FunctionFeatures], candidates: Sequence[FunctionFeatures]
) -> list[tuple[float, _SetFeature, _SetFeature]]:
    features = []
    for weight, extract in _SET_FAMILIES:
        query_sets = [extract(f) for f in queries]
        candidate_sets = [extract(f) for f in candidates]
        vocabulary: dict[object, int] = {}
        for row in (*query_sets, *candidate_sets):
            for item in row:
                vocabulary.setdefault(item, len(vocabulary))
        features.append(
            (weight, _SetFeature(query_sets, vocabulary), _SetFeature(candidate_sets, vocabulary))
        )
    return features


def _signature_matrix(
    functions: Sequence[FunctionFeatures], robust: bool
) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.bool_]]:
    """(N, 64) signatures and whether each row has one (robust: format >= 1.1 and non-empty)."""
    rows = [f.robust_minhash if robust else f.minhash for f in functions]
    present = np.array([len(row) == MINHASH_PERMUTATIONS for row in rows], dtype=bool)
    matrix = np.full((len(rows), MINHASH_PERMUTATIONS), _EMPTY_SLOT, dtype=np.uint32)
    if present.any():
        matrix[present] = np.array([row for row in rows if len(row) == MINHASH_PERMUTATIONS])
    return matrix, present


def similarity_matrix(
    queries: Sequence[FunctionFeatures], candidates: Sequence[FunctionFeatures]
) -> FloatMatrix:
    """``function_similarity`` of every (query, candidate) pair as a (Q, C) float32 matrix."""
    result = np.zeros((len(queries), len(candidates)), dtype=np.float32)
    if not queries or not candidates:
        return result
    query_minhash, query_has_minhash = _signature_matrix(queries, robust=False)
    candidate_minhash, candidate_has_minhash = _signature_matrix(candidates, robust=False)
    query_robust, query_has_robust = _signature_matrix(queries, robust=True)
    candidate_robust, candidate_has_robust = _signature_matrix(candidates, robust=True)
    query_robust_empty = (query_robust == _EMPTY_SLOT).all(axis=1)
    candidate_robust_empty = (candidate_robust == _EMPTY_SLOT).all(axis=1)
    query_exact = np.array([f.exact_hash for f in queries], dtype=np.uint64)
    candidate_exact = np.array([f.exact_hash for f in candidates], dtype=np.uint64)
    query_length = np.array([f.instruction_count for f in queries], dtype=np.int64)
    candidate_length = np.array([f.instruction_count for f in candidates], dtype=np.int64)
    query_shape = np.stack([_shape_vector(f) for f in queries])
    candidate_shape = np.stack([_shape_vector(f) for f in candidates])
    set_features = _set_features(queries, candidates)
    for start in range(0, len(queries), MATRIX_CHUNK_ROWS):
        rows = slice(start, start + MATRIX_CHUNK_ROWS)
        agreeing = (query_minhash[rows, None, :] == candidate_minhash[None, :, :]).sum(axis=2)
        code = agreeing.astype(np.float32) / MINHASH_PERMUTATIONS
        code *= query_has_minhash[rows, None] & candidate_has_minhash[None, :]
        exact = (query_exact[rows, None] == candidate_exact[None, :]) & (
            query_length[rows, None] == candidate_length[None, :]
        )
        code[exact] = 1.0
        distance = np.abs(query_shape[rows, None, :] - candidate_shape[None, :, :])
        shape = np.clip(1.0 - distance / SHAPE_LOG2_RANGE, 0.0, 1.0) @ _SHAPE_COMPONENTS
        total = CODE_WEIGHT * code + SHAPE_WEIGHT * shape
        weights = np.full(code.shape, CODE_WEIGHT + SHAPE_WEIGHT, dtype=np.float32)
        robust_agreeing = (query_robust[rows, None, :] == candidate_robust[None, :, :]).sum(axis=2)
        robust_present = (query_has_robust[rows, None] & candidate_has_robust[None, :]) & ~(
            query_robust_empty[rows, None] & candidate_robust_empty[None, :]
        )
        total += ROBUST_WEIGHT * robust_present * (robust_agreeing / MINHASH_PERMUTATIONS)
        weights += ROBUST_WEIGHT * robust_present
        for weight, query_set, candidate_set in set_features:
            intersection = query_set.matrix[rows] @ candidate_set.matrix.T
            union = query_set.sizes[rows, None] + candidate_set.sizes[None, :] - intersection
            present = union > 0
            jaccard = np.divide(intersection, union, out=np.zeros_like(union), where=present)
            total += weight * jaccard
            weights += weight * present
        result[rows] = total / weights
    return result


# Similarity from which two functions of different samples are reported as shared by
# `compare` on their own. At 0.8 the combined score needs near-identical code *and* agreeing
# references; unrelated functions of the demo corpus stay below 0.6.
SHARED_SIMILARITY: Final = 0.8
# Lower bar for a pair next to an already matched pair in both call graphs (BinDiff-style
# propagation): the neighbourhood is independent evidence that the two are the same function.
PROPAGATED_SIMILARITY: Final = 0.5
# Functions smaller than this are not reported as shared (the index's minimum size: tiny
# wrappers are identical across unrelated code).
SHARED_MIN_INSTRUCTIONS: Final = 10


@dataclass(frozen=True, slots=True)
class FunctionPair:
    address_a: int
    address_b: int
    similarity: float
    matched_by: Literal["similarity", "call-graph"]


@dataclass(frozen=True, slots=True)
class FunctionComparison:
    # per function of A (in A's order): (address in B, similarity) best first
    candidates: tuple[tuple[tuple[int, float], ...], ...]
    pairs: tuple[FunctionPair, ...]  # one-to-one shared functions, most similar first


def _neighbourhood(functions: Sequence[FunctionFeatures]) -> list[set[int]]:
    """Callers and callees of each function, as positions."""
    position = {function.address: i for i, function in enumerate(functions)}
    neighbours: list[set[int]] = [set() for _ in functions]
    for i, function in enumerate(functions):
        for callee in function.calls:
            j = position.get(callee)
            if j is not None and j != i:
                neighbours[i].add(j)
                neighbours[j].add(i)
    return neighbours


def compare_functions(a: SampleFeatures, b: SampleFeatures, top_k: int = 5) -> FunctionComparison:
    """Best candidates in B for every function of A, and one-to-one shared pairs: greedy on
    similarity >= SHARED_SIMILARITY, then propagated along both call graphs at a lower bar."""
    matrix = similarity_matrix(a.functions, b.functions)
    candidates: list[tuple[tuple[int, float], ...]] = []
    for row in matrix:
        # Ties broken by B's address so the answer is deterministic.
        order = sorted(range(len(row)), key=lambda j: (-row[j], b.functions[j].address))[:top_k]
        candidates.append(tuple((b.functions[j].address, float(row[j])) for j in order))
    large_a = np.array([f.instruction_count >= SHARED_MIN_INSTRUCTIONS for f in a.functions])
    large_b = np.array([f.instruction_count >= SHARED_MIN_INSTRUCTIONS for f in b.functions])
    eligible = matrix * (large_a[:, None] & large_b[None, :]) if matrix.size else matrix
    used_a: set[int] = set()
    used_b: set[int] = set()
    pairs: list[tuple[int, int, float, Literal["similarity", "call-graph"]]] = []

    def take(rows: npt.NDArray[np.int64], columns: npt.NDArray[np.int64], how: Any) -> list[int]:
        chosen = []
        values = eligible[rows, columns]
        for k in sorted(range(len(rows)), key=lambda k: (-values[k], rows[k], columns[k])):
            i, j = int(rows[k]), int(columns[k])
            if i in used_a or j in used_b:
                continue
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j, float(matrix[i, j]), how))
            chosen.append(len(pairs) - 1)
        return chosen

    rows, columns = np.nonzero(eligible >= SHARED_SIMILARITY)
    queue = take(rows.astype(np.int64), columns.astype(np.int64), "similarity")
    neighbours_a, neighbours_b = _neighbourhood(a.functions), _neighbourhood(b.functions)
    while queue:
        i, j, _, _ = pairs[queue.pop()]
        near_a = np.array(sorted(neighbours_a[i] - used_a), dtype=np.int64)
        near_b = np.array(sorted(neighbours_b[j] - used_b), dtype=np.int64)
        if len(near_a) == 0 or len(near_b) == 0:
            continue
        block = eligible[np.ix_(near_a, near_b)]
        local_rows, local_columns = np.nonzero(block >= PROPAGATED_SIMILARITY)
        queue.extend(take(near_a[local_rows], near_b[local_columns], "call-graph"))
    ordered = sorted(pairs, key=lambda p: (-p[2], a.functions[p[0]].address))
    return FunctionComparison(
        candidates=tuple(candidates),
        pairs=tuple(
            FunctionPair(a.functions[i].address, b.functions[j].address, value, how)
            for i, j, value, how in ordered
        ),
    )
