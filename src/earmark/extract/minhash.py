"""Exact and MinHash signatures over normalised instruction streams.

All hashes here are stable across runs, machines and Python versions (blake2b and fixed
integer arithmetic, never Python's salted ``hash()``), because signatures are stored in the
knowledge base and compared with signatures computed years later.

MinHash: each token gets a stable 32-bit id; each n-gram of ids is folded into one 32-bit
shingle hash; the signature is, for each of MINHASH_PERMUTATIONS universal hash functions
``h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32``, the minimum over the function's
shingles. Computed for a
whole batch of functions with one numpy expression per chunk (datasketch does the same maths
per object; batching is what makes it cheap for 10^4 functions per sample).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from earmark.model.sample import MINHASH_PERMUTATIONS

# Shingle n-gram sizes, measured in docs/function-recovery.md ("MinHash parameters (measured)",
# bench/minhash_parameters.py): 1-grams alone rank best across -O levels (held-out R@1 0.668 vs
# 0.558) but put 1 % of unrelated pairs above the index's 0.5 match floor, 33x the 0.03 % of
# 1..3-grams. The index needs that precision; ranking across -O levels is the job of the
# re-ranking similarity (index/similarity.py), which scores 0.758 there.
NGRAM_SIZES: Final = (1, 2, 3)

# Permutations are multiply-shift hashes h(x) = ((a*x + b) mod 2^64) >> 32 with odd a
# (Dietzfelbinger et al., a universal family): the mod 2^64 is free uint64 wrap-around, which
# measured ~8x faster in numpy than a prime modulus and gives the same Jaccard accuracy.

# Shingles processed per numpy batch. The (N x 64) uint64 matrix of a batch should stay in
# the CPU caches. Measured on 16k corpus functions (1.1M tokens), whole batched signature:
# 2^10..2^13 rows within noise (0.97-1.05 s), 2^14 1.5 s, 2^16 2.3 s, 2^18 (128 MiB) 4.0 s.
SHINGLES_PER_BATCH: Final = 1 << 11

NGRAM_MULTIPLIER: Final = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, folds ids into n-grams
MIX_MULTIPLIER: Final = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio mixing before truncation


def permutation_coefficients(
    count: int = MINHASH_PERMUTATIONS,
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """The (a, b) of the first ``count`` permutations, each shaped (1, count); a prefix of a
    longer list is the shorter list, so parameter studies can vary ``count``."""
    a_values: list[int] = []
    b_values: list[int] = []
    for index in range(count):
        digest = hashlib.blake2b(f"earmark-minhash-{index}".encode(), digest_size=16).digest()
        a_values.append(int.from_bytes(digest[:8], "little") | 1)
        b_values.append(int.from_bytes(digest[8:], "little"))
    return (
        np.array(a_values, dtype=np.uint64).reshape(1, -1),
        np.array(b_values, dtype=np.uint64).reshape(1, -1),
    )


_COEFFICIENT_A, _COEFFICIENT_B = permutation_coefficients()
_TOKEN_IDS: dict[str, int] = {}


def token_id(token: str) -> int:
    """Stable 32-bit id of one normalised token (memoised: the vocabulary is a few thousand)."""
    value = _TOKEN_IDS.get(token)
    if value is None:
        value = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "little")
        _TOKEN_IDS[token] = value
    return value


def drop_token_ids() -> None:
    """Forget the memoised token ids (they are recomputed, identically, on demand)."""
    _TOKEN_IDS.clear()


def exact_hash(tokens: Sequence[str]) -> int:
    """Unsigned 64-bit hash of the whole normalised stream (position-independent by design)."""
    digest = hashlib.blake2b("\n".join(tokens).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def shingle_hashes(tokens: Sequence[str]) -> npt.NDArray[np.uint32]:
    """32-bit hashes of all n-grams (NGRAM_SIZES) of the stream; duplicates are kept."""
    ids = np.fromiter((token_id(t) for t in tokens), dtype=np.uint64, count=len(tokens))
    parts: list[npt.NDArray[np.uint64]] = []
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        for size in NGRAM_SIZES:
            if len(ids) < size:
                break
            folded = ids[: len(ids) - size + 1] ^ np.uint64(size)
            for shift in range(1, size):
                folded = folded * NGRAM_MULTIPLIER ^ ids[shift : len(ids) - size + 1 + shift]
            parts.append(folded)
        if not parts:
            return np.zeros(0, dtype=np.uint32)
        mixed = np.concatenate(parts) * MIX_MULTIPLIER
    return (mixed >> np.uint64(32)).astype(np.uint32)


def minhash_signatures(shingle_sets: Sequence[npt.NDArray[np.uint32]]) -> npt.NDArray[np.uint32]:
    """(len(shingle_sets), MINHASH_PERMUTATIONS) signatures; an empty set gives all 0xFFFFFFFF."""
    lengths = np.fromiter((len(s) for s in shingle_sets), dtype=np.int64, count=len(shingle_sets))
    if not len(shingle_sets) or not lengths.sum():
        return grouped_signatures(np.zeros(0, dtype=np.uint32), lengths)
    return grouped_signatures(np.concatenate(shingle_sets).astype(np.uint32), lengths)


def grouped_signatures(
    shingles: npt.NDArray[np.uint32],
    lengths: npt.NDArray[np.int64],
    coefficients: tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]] | None = None,
) -> npt.NDArray[np.uint32]:
    """Signatures of consecutive groups of ``shingles`` (group i has ``lengths[i]`` values).

    ``coefficients`` (from ``permutation_coefficients(n)``) default to earmark's own
    ``MINHASH_PERMUTATIONS``; bench/minhash_parameters.py passes other counts."""
    coefficient_a, coefficient_b = (
        (_COEFFICIENT_A, _COEFFICIENT_B) if coefficients is None else coefficients
    )
    count = len(lengths)
    result = np.full((count, coefficient_a.shape[1]), 0xFFFFFFFF, dtype=np.uint32)
    group_starts = np.concatenate(([0], np.cumsum(lengths)))
    start = 0
    while start < count:
        # Group consecutive functions until the batch holds SHINGLES_PER_BATCH shingles.
        stop = int(
            np.searchsorted(group_starts, group_starts[start] + SHINGLES_PER_BATCH, side="right")
        )
        stop = min(max(stop - 1, start + 1), count)
        batch_lengths = lengths[start:stop]
        non_empty = np.flatnonzero(batch_lengths)
        if len(non_empty):
            values = shingles[group_starts[start] : group_starts[stop]].astype(np.uint64)
            with np.errstate(over="ignore"):
                permuted = values.reshape(-1, 1) * coefficient_a
                permuted += coefficient_b
                permuted >>= np.uint64(32)
            offsets = np.concatenate(([0], np.cumsum(batch_lengths[non_empty])[:-1]))
            # Minima of the shifted 64-bit values, narrowed after the reduction: the same
            # numbers as narrowing first, one pass over the big matrix fewer.
            minima = np.minimum.reduceat(permuted, offsets, axis=0)
            result[start + non_empty] = minima.astype(np.uint32)
        start = stop
    return result


def stream_minhash_signatures(
    streams: Sequence[Sequence[str]],
) -> npt.NDArray[np.uint32]:
    """Signatures of many token streams at once; equal to hashing each stream's shingles.

    Token ids of all streams are laid end to end and each n-gram size is folded over the whole
    array in one numpy pass; n-grams that would cross from one stream into the next are
    dropped. Per-function numpy calls cost more than the arithmetic for the typical 50-token
    function, so this is what makes features cheap for 10^4 functions.
    """
    count = len(streams)
    if count == 0:
        return np.full((0, MINHASH_PERMUTATIONS), 0xFFFFFFFF, dtype=np.uint32)
    lengths = np.fromiter((len(s) for s in streams), dtype=np.int64, count=count)
    total = int(lengths.sum())
    # New tokens get their ids first; then the lookups run as C-level map() over the
    # chained streams (a Python generator here measured half of the whole function's time).
    for token in set(itertools.chain.from_iterable(streams)).difference(_TOKEN_IDS):
        token_id(token)
    ids = np.fromiter(
        map(_TOKEN_IDS.__getitem__, itertools.chain.from_iterable(streams)),
        dtype=np.uint64,
        count=total,
    )
    return id_minhash_signatures(ids, lengths)


def id_minhash_signatures(
    ids: npt.NDArray[np.uint64], lengths: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint32]:
    """``stream_minhash_signatures`` of streams given as their token ids (``token_id``), laid
    end to end: stream i is the next ``lengths[i]`` ids. The compiled feature pass hands ids
    over directly, so no token is looked up per occurrence."""
    count = len(lengths)
    if count == 0:
        return np.full((0, MINHASH_PERMUTATIONS), 0xFFFFFFFF, dtype=np.uint32)
    total = len(ids)
    ends = np.cumsum(lengths)
    owner = np.repeat(np.arange(count, dtype=np.int64), lengths)
    parts: list[npt.NDArray[np.uint64]] = []
    owners: list[npt.NDArray[np.int64]] = []
    with np.errstate(over="ignore"):
        for size in NGRAM_SIZES:
            if total < size:
                break
            folded = ids[: total - size + 1] ^ np.uint64(size)
            for shift in range(1, size):
                folded = folded * NGRAM_MULTIPLIER ^ ids[shift : total - size + 1 + shift]
            first_owner = owner[: total - size + 1]
            inside = np.arange(total - size + 1, dtype=np.int64) + size <= ends[first_owner]
            parts.append(folded[inside])
            owners.append(first_owner[inside])
    if not parts:
        return np.full((count, MINHASH_PERMUTATIONS), 0xFFFFFFFF, dtype=np.uint32)
    with np.errstate(over="ignore"):
        mixed = np.concatenate(parts) * MIX_MULTIPLIER
    shingles = (mixed >> np.uint64(32)).astype(np.uint32)
    # A function's repeated shingles cannot change its minima: sorting (stream, shingle) keys
    # groups them by stream and lets duplicates go before the 64-permutation product, which
    # is the costly step (real code repeats ~40 % of its 1- and 2-grams).
    keys = (np.concatenate(owners).astype(np.uint64) << np.uint64(32)) | shingles
    keys.sort()  # sort + neighbour test: measured 5x faster than np.unique's hash path here
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
    per_stream = np.bincount((keys >> np.uint64(32)).astype(np.int64), minlength=count)
    unique_shingles = (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return grouped_signatures(unique_shingles, per_stream.astype(np.int64))


def compiled_id_signatures(
    minhash_ids: Callable[..., bytes], ids: bytes, lengths: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint32]:
    """``id_minhash_signatures`` by the compiled ``_native.minhash_ids`` (``ids`` as uint64
    bytes): the same integer arithmetic in one pass per function, without the numpy
    temporaries of the (shingles x permutations) product; measured 0.13 -> 0.07 s for the
    token signatures of pillow _imaging. Tests compare the two."""
    raw = minhash_ids(
        ids,
        lengths.astype(np.int64).tobytes(),
        NGRAM_SIZES,
        int(NGRAM_MULTIPLIER),
        int(MIX_MULTIPLIER),
        _COEFFICIENT_A.tobytes(),
        _COEFFICIENT_B.tobytes(),
    )
    return np.frombuffer(raw, dtype=np.uint32).reshape(len(lengths), MINHASH_PERMUTATIONS)


def minhash_signature(shingles: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """Signature of one shingle set (see ``minhash_signatures``)."""
    signature: npt.NDArray[np.uint32] = minhash_signatures([shingles])[0]
    return signature


def estimate_jaccard(first: Sequence[int], second: Sequence[int]) -> float:
    """Fraction of equal signature slots: an unbiased estimate of the sets' Jaccard index."""
    a = np.asarray(first, dtype=np.uint32)
    b = np.asarray(second, dtype=np.uint32)
    return float(np.count_nonzero(a == b)) / len(a)
