"""MinHash LSH banding over b-bit signatures, with every step vectorised in numpy.

Storage trick (the reason the index stays near 128 bytes per function): each of the 64 MinHash
values is cut to its low 8 bits (b-bit MinHash, Li & König 2010), so a signature is 64 bytes.
Four consecutive 8-bit values are exactly one uint32, so the band keys of the 16 bands x 4 rows
scheme are a free ``view`` of the signature matrix: no key arrays are stored, only one row
permutation per band (sorted by that band's key), and lookups are a vectorised binary search
that reads keys through the permutation. Low bits are used because a MinHash value is a
minimum, so its high bits lean towards zero while its low bits stay uniform.

Why not datasketch's ``MinHashLSH``: it keeps a Python dict per band (hundreds of bytes per
function) and answers one query at a time; we need 10^7 functions and 10^3-function batches.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from earmark.index.packed import PackedUInts
from earmark.model.sample import MINHASH_PERMUTATIONS

# Bits kept per MinHash value. 8 bits: a b-bit collision between unrelated values has
# probability 2^-8, which the estimator removes; measured extra error on the Jaccard estimate
# is small (docs/index.md: standard deviation 0.0627 vs 0.0625 at J=0.5, 64 permutations).
SIGNATURE_BITS: Final = 8

# 16 bands x 4 rows uses all 64 values; S-curve threshold (1/16)^(1/4) = 0.50, the similarity
# we want to start finding (docs/index.md has the measured recall per Jaccard level).
ROWS_PER_BAND: Final = 4
BAND_COUNT: Final = MINHASH_PERMUTATIONS // ROWS_PER_BAND

_CHANCE_AGREEMENT: Final = 1.0 / (1 << SIGNATURE_BITS)

UInt8Matrix = npt.NDArray[np.uint8]
UInt32Array = npt.NDArray[np.uint32]
Int64Array = npt.NDArray[np.int64]


def s_curve_threshold(bands: int = BAND_COUNT, rows: int = ROWS_PER_BAND) -> float:
    """Jaccard at which the chance of sharing at least one band is steepest: (1/b)^(1/r)."""
    return float((1.0 / bands) ** (1.0 / rows))


def candidate_probability(
    jaccard: float, bands: int = BAND_COUNT, rows: int = ROWS_PER_BAND
) -> float:
    """Chance that two functions of this Jaccard share at least one band key.

    With b-bit values a slot agrees with probability J + (1 - J) / 2^b, not J.
    """
    slot = jaccard + (1.0 - jaccard) * _CHANCE_AGREEMENT
    return float(1.0 - (1.0 - slot**rows) ** bands)


def reduce_signatures(minhash: npt.NDArray[np.uint32]) -> UInt8Matrix:
    """(N, 64) uint32 MinHash signatures -> (N, 64) uint8 b-bit signatures (low byte)."""
    values = np.asarray(minhash)
    if values.ndim != 2 or values.shape[1] != MINHASH_PERMUTATIONS:
        raise ValueError(f"expected (N, {MINHASH_PERMUTATIONS}) signatures, got {values.shape}")
    return np.ascontiguousarray((values & 0xFF).astype(np.uint8))


def band_keys(signatures: UInt8Matrix) -> UInt32Array:
    """(N, BAND_COUNT) uint32 band keys: a view, four 8-bit values per key, no copy."""
    return np.ascontiguousarray(signatures).view(np.uint32)


def estimate_jaccard_from_agreement(
    agreeing_slots: npt.NDArray[np.integer],
) -> npt.NDArray[np.float32]:
    """Jaccard estimate from the number of equal b-bit slots, chance agreement removed."""
    fraction = agreeing_slots.astype(np.float32) / MINHASH_PERMUTATIONS
    corrected = (fraction - _CHANCE_AGREEMENT) / (1.0 - _CHANCE_AGREEMENT)
    return np.clip(corrected, 0.0, 1.0).astype(np.float32)


_BYTE_LOW_BITS: Final = np.uint64(0x0101010101010101)


def _as_words(signatures: UInt8Matrix) -> npt.NDArray[np.uint64] | None:
    """(N, 64) uint8 signatures as (N, 8) uint64 words (a view), or None when the rows are not
    contiguous 64-byte blocks."""
    if signatures.ndim != 2 or signatures.shape[1] != MINHASH_PERMUTATIONS:
        return None
    if not signatures.flags.c_contiguous:
        return None
    words: npt.NDArray[np.uint64] = signatures.view(np.uint64)
    return words


def count_agreeing_slots(
    stored: UInt8Matrix, rows: Int64Array, queries: UInt8Matrix, query_rows: Int64Array
) -> npt.NDArray[np.int64]:
    """For each pair (rows[i], query_rows[i]): how many of the 64 b-bit slots are equal.

    Eight slots per uint64 word: XOR the words, fold each byte's bits onto its lowest bit,
    and add the eight flags with one multiplication (the top byte of ``flags * 0x0101..01``).
    It counts what comparing byte by byte counts, ~1.7x faster: the index query verifies every
    candidate row this way (~23k pairs per PE bench (a) query, up to 96k)."""
    counts = np.empty(len(rows), dtype=np.int64)
    stored_words, query_words = _as_words(stored), _as_words(queries)
    # 2^16 pairs at a time keeps the (pairs, 64) temporaries near 4 MB (fits in L2/L3).
    step = 1 << 16
    for start in range(0, len(rows), step):
        stop = start + step
        if stored_words is None or query_words is None:
            equal = stored[rows[start:stop]] == queries[query_rows[start:stop]]
            counts[start:stop] = equal.sum(axis=1, dtype=np.int64)
            continue
        differing = stored_words[rows[start:stop]] ^ query_words[query_rows[start:stop]]
        differing |= differing >> np.uint64(4)
        differing |= differing >> np.uint64(2)
        differing |= differing >> np.uint64(1)
        differing &= _BYTE_LOW_BITS  # bit 0 of each byte: that slot differs
        differing *= _BYTE_LOW_BITS
        differing >>= np.uint64(56)  # differing slots of the word
        counts[start:stop] = MINHASH_PERMUTATIONS - differing.sum(axis=1, dtype=np.int64)
    return counts


def sort_band(keys: UInt32Array) -> UInt32Array:
    """Row permutation that sorts one band's keys (row ids as uint32)."""
    return np.argsort(keys, kind="stable").astype(np.uint32)


def locate_keys(
    keys: UInt32Array,
    band: int,
    order: UInt32Array | PackedUInts | None,
    targets: UInt32Array,
) -> tuple[Int64Array, Int64Array]:
    """Vectorised lower/upper bound of ``targets`` in one band's key order.

    ``keys`` is the (N, BAND_COUNT) key view; the band's sorted sequence is
    ``keys[order, band]`` (or ``keys[:, band]`` when the rows themselves are in key order,
    ``order is None``). numpy's ``searchsorted`` needs the sorted keys materialised (4 bytes
    per function per band); this search reads them through the permutation instead.
    """
    total = keys.shape[0]
    count = len(targets)
    if total == 0:
        return np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64)
    column = keys[:, band]
    # Both bounds as one lower-bound search: the upper bound of t is the lower bound of t + 1
    # (int64, so 2^32 - 1 + 1 does not wrap). Branchless halving (every target's range has the
    # same length, so no per-target "still open" mask): ~6 array operations per step rather
    # than ~16 for two masked bisections, on 2 x (query functions) entries per band.
    wanted = np.concatenate((targets, targets.astype(np.int64) + 1), dtype=np.int64)
    base = np.zeros(2 * count, dtype=np.int64)
    remaining = total
    while remaining > 1:
        half = remaining // 2
        probe = base + half
        rows = probe if order is None else order[probe]
        base = np.where(column[rows] < wanted, probe, base)
        remaining -= half
    rows = base if order is None else order[base]
    bounds = base + (column[rows] < wanted)
    return bounds[:count], bounds[count:]


def expand_ranges(
    starts: Int64Array, stops: Int64Array, limit: int
) -> tuple[Int64Array, Int64Array, int]:
    """All positions of the half-open ranges, each range cut to ``limit`` positions.

    Returns (range index of each position, position, number of ranges that were cut).
    """
    lengths = np.maximum(stops - starts, 0)
    cut = int(np.count_nonzero(lengths > limit))
    lengths = np.minimum(lengths, limit)
    owners = np.repeat(np.arange(len(starts), dtype=np.int64), lengths)
    if len(owners) == 0:
        return owners, owners.copy(), cut
    first_of_range = np.cumsum(lengths) - lengths
    offsets = np.arange(len(owners), dtype=np.int64) - np.repeat(first_of_range, lengths)
    return owners, np.repeat(starts, lengths) + offsets, cut


def pair_budget_runs(pairs: npt.NDArray[np.int64], budget: int) -> list[tuple[int, int]]:
    """Consecutive runs ``(first, stop)`` of queries whose pair counts add up to at most
    ``budget`` (a query with more than ``budget`` pairs is a run of its own)."""
    runs: list[tuple[int, int]] = []
    first, total = 0, 0
    for position, count in enumerate(pairs.tolist()):
        if position > first and total + count > budget:
            runs.append((first, position))
            first, total = position, 0
        total += count
    if first < len(pairs):
        runs.append((first, len(pairs)))
    return runs


def first_per_group(groups: npt.NDArray[np.int64], count: int) -> npt.NDArray[np.bool_]:
    """Mask of the first ``count`` entries of each run of equal values in ``groups`` (entries
    grouped already, best first within a group)."""
    group_start = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    group_sizes = np.diff(np.r_[group_start, len(groups)])
    rank = np.arange(len(groups)) - np.repeat(group_start, group_sizes)
    kept: npt.NDArray[np.bool_] = rank < count
    return kept
