"""Pairwise function similarity for re-ranking index matches and for ``earmark compare``.

The index finds candidates by MinHash over instruction n-grams alone, which is fast but blind
to what a function *references*: two unrelated 300-instruction functions full of loads and
shifts can reach an estimated Jaccard of 0.5. ``function_similarity`` adds the features that
change least between compilers and -O levels (DESIGN.md §5): distinctive constants, referenced
strings, called imports, and the shape of the function (instructions, blocks, edges, calls) on a
log scale. Each feature family counts only when one side has it, so two functions with no
strings are neither helped nor hurt by strings; one side having strings the other lacks is
evidence against the pair.

``similarity_matrix`` is the batch form: MinHash agreement and shape in numpy broadcasts, the
set features as sparse-free dense intersections over a shared vocabulary, in row chunks so memory
stays bounded for samples with thousands of functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures, SampleFeatures

# Weight of each feature family in the combined score. The instruction stream carries most of
# the information at one -O level; references carry what survives across -O levels. Chosen so
# that an exact stream match with agreeing references scores 1.0, and a 0.5 stream estimate with
# disagreeing references (the zlib-vs-packet-framing false pair of the demo corpus) scores < 0.4.
CODE_WEIGHT: Final = 0.45
CONSTANTS_WEIGHT: Final = 0.15
STRINGS_WEIGHT: Final = 0.15
IMPORTS_WEIGHT: Final = 0.10
SHAPE_WEIGHT: Final = 0.15

# Two counts whose log2 differ by this much are considered unrelated in shape (a factor of 8:
# -O0 vs -O3 of one function rarely differs by more than 3x in instructions, measured on the
# xcomp corpus's zlib functions).
SHAPE_LOG2_RANGE: Final = 3.0

# Query rows handled per chunk in ``similarity_matrix`` (bounds the broadcast temporaries to
# chunk x candidates x 64 bytes of MinHash comparisons: 64 x 5,000 x 64 = 20 MB).
MATRIX_CHUNK_ROWS: Final = 64

FloatMatrix = npt.NDArray[np.float32]


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


def _shape_similarity(first: npt.NDArray[np.float32], second: npt.NDArray[np.float32]) -> float:
    distance = np.abs(first - second) / SHAPE_LOG2_RANGE
    return float(np.mean(np.clip(1.0 - distance, 0.0, 1.0)))


def minhash_jaccard(first: FunctionFeatures, second: FunctionFeatures) -> float:
    """Estimated Jaccard of the normalised instruction shingles (full 32-bit MinHash slots)."""
    if not first.minhash or not second.minhash:
        return 0.0
    agreeing = sum(1 for a, b in zip(first.minhash, second.minhash, strict=True) if a == b)
    return agreeing / len(first.minhash)


def function_similarity(a: FunctionFeatures, b: FunctionFeatures) -> float:
    """Similarity of two functions in 0..1 (1: same normalised code, same references)."""
    if a.exact_hash == b.exact_hash and a.instruction_count == b.instruction_count:
        code = 1.0
    else:
        code = minhash_jaccard(a, b)
    shape = _shape_similarity(_shape_vector(a), _shape_vector(b))
    total = CODE_WEIGHT * code + SHAPE_WEIGHT * shape
    weights = CODE_WEIGHT + SHAPE_WEIGHT
    for weight, first, second in (
        (CONSTANTS_WEIGHT, frozenset(a.constants), frozenset(b.constants)),
        (STRINGS_WEIGHT, frozenset(a.strings), frozenset(b.strings)),
        (IMPORTS_WEIGHT, frozenset(_import_names(a)), frozenset(_import_names(b))),
    ):
        value = _jaccard(first, second)
        if value is not None:
            total += weight * value
            weights += weight
    return total / weights


def _import_names(function: FunctionFeatures) -> list[str]:
    # "libc.so.6!memcpy" and "msvcrt.dll!memcpy" are the same API for similarity purposes.
    return [name.rsplit("!", 1)[-1] for name in function.called_imports]


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
    extractors = (
        (CONSTANTS_WEIGHT, lambda f: frozenset(f.constants)),
        (STRINGS_WEIGHT, lambda f: frozenset(f.strings)),
        (IMPORTS_WEIGHT, lambda f: frozenset(_import_names(f))),
    )
    features = []
    for weight, extract in extractors:
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


def similarity_matrix(
    queries: Sequence[FunctionFeatures], candidates: Sequence[FunctionFeatures]
) -> FloatMatrix:
    """``function_similarity`` of every (query, candidate) pair as a (Q, C) float32 matrix."""
    result = np.zeros((len(queries), len(candidates)), dtype=np.float32)
    if not queries or not candidates:
        return result
    query_minhash = np.array([f.minhash for f in queries], dtype=np.uint32).reshape(
        len(queries), MINHASH_PERMUTATIONS
    )
    candidate_minhash = np.array([f.minhash for f in candidates], dtype=np.uint32).reshape(
        len(candidates), MINHASH_PERMUTATIONS
    )
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
        exact = (query_exact[rows, None] == candidate_exact[None, :]) & (
            query_length[rows, None] == candidate_length[None, :]
        )
        code[exact] = 1.0
        distance = np.abs(query_shape[rows, None, :] - candidate_shape[None, :, :])
        shape = np.clip(1.0 - distance / SHAPE_LOG2_RANGE, 0.0, 1.0).mean(axis=2)
        total = CODE_WEIGHT * code + SHAPE_WEIGHT * shape
        weights = np.full(code.shape, CODE_WEIGHT + SHAPE_WEIGHT, dtype=np.float32)
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


def compare_functions(
    a: SampleFeatures, b: SampleFeatures, top_k: int = 5
) -> FunctionComparison:
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
