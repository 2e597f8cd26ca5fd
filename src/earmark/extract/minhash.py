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
from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from earmark.model.sample import MINHASH_PERMUTATIONS

# Shingle n-gram sizes. Measured in docs/function-recovery.md (xcomp zlib/zstd, gcc -O2 vs
# -O3 and gcc vs clang -O2, Recall@1 of MinHash-only search): 1..3-grams beat single sizes.
NGRAM_SIZES: Final = (1, 2, 3)

# Permutations are multiply-shift hashes h(x) = ((a*x + b) mod 2^64) >> 32 with odd a
# (Dietzfelbinger et al., a universal family): the mod 2^64 is free uint64 wrap-around, which
# measured ~8x faster in numpy than a prime modulus and gives the same Jaccard accuracy.

# Shingles processed per numpy batch: an (N x 64) uint64 matrix of 2^18 rows is 128 MiB,
# the most we want to hold at once while staying fast (larger batches gain nothing measurable).
SHINGLES_PER_BATCH: Final = 1 << 18

_NGRAM_MULTIPLIER: Final = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime, folds ids into n-grams
_MIX_MULTIPLIER: Final = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio mixing before truncation


def _permutation_coefficients() -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    a_values: list[int] = []
    b_values: list[int] = []
    for index in range(MINHASH_PERMUTATIONS):
        digest = hashlib.blake2b(f"earmark-minhash-{index}".encode(), digest_size=16).digest()
        a_values.append(int.from_bytes(digest[:8], "little") | 1)
        b_values.append(int.from_bytes(digest[8:], "little"))
    return (
        np.array(a_values, dtype=np.uint64).reshape(1, -1),
        np.array(b_values, dtype=np.uint64).reshape(1, -1),
    )


_COEFFICIENT_A, _COEFFICIENT_B = _permutation_coefficients()
_TOKEN_IDS: dict[str, int] = {}


def token_id(token: str) -> int:
    """Stable 32-bit id of one normalised token (memoised: the vocabulary is a few thousand)."""
    value = _TOKEN_IDS.get(token)
    if value is None:
        value = int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "little")
        _TOKEN_IDS[token] = value
    return value


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
                folded = folded * _NGRAM_MULTIPLIER ^ ids[shift : len(ids) - size + 1 + shift]
            parts.append(folded)
        if not parts:
            return np.zeros(0, dtype=np.uint32)
        mixed = np.concatenate(parts) * _MIX_MULTIPLIER
    return (mixed >> np.uint64(32)).astype(np.uint32)


def minhash_signatures(shingle_sets: Sequence[npt.NDArray[np.uint32]]) -> npt.NDArray[np.uint32]:
    """(len(shingle_sets), MINHASH_PERMUTATIONS) signatures; an empty set gives all 0xFFFFFFFF."""
    count = len(shingle_sets)
    result = np.full((count, MINHASH_PERMUTATIONS), 0xFFFFFFFF, dtype=np.uint32)
    start = 0
    while start < count:
        # Group consecutive functions until the batch holds SHINGLES_PER_BATCH shingles.
        stop = start
        total = 0
        while stop < count and (
            stop == start or total + len(shingle_sets[stop]) <= SHINGLES_PER_BATCH
        ):
            total += len(shingle_sets[stop])
            stop += 1
        group = [s for s in shingle_sets[start:stop]]
        lengths = np.array([len(s) for s in group], dtype=np.int64)
        non_empty = np.flatnonzero(lengths)
        if len(non_empty):
            values = np.concatenate([group[i] for i in non_empty]).astype(np.uint64)
            with np.errstate(over="ignore"):
                permuted = (values.reshape(-1, 1) * _COEFFICIENT_A + _COEFFICIENT_B) >> np.uint64(
                    32
                )
            offsets = np.concatenate(([0], np.cumsum(lengths[non_empty])[:-1]))
            minima = np.minimum.reduceat(permuted.astype(np.uint32), offsets, axis=0)
            result[start + non_empty] = minima
        start = stop
    return result


def minhash_signature(shingles: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """Signature of one shingle set (see ``minhash_signatures``)."""
    signature: npt.NDArray[np.uint32] = minhash_signatures([shingles])[0]
    return signature


def estimate_jaccard(first: Sequence[int], second: Sequence[int]) -> float:
    """Fraction of equal signature slots: an unbiased estimate of the sets' Jaccard index."""
    a = np.asarray(first, dtype=np.uint32)
    b = np.asarray(second, dtype=np.uint32)
    return float(np.count_nonzero(a == b)) / len(a)
