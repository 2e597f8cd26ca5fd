"""Second candidate stage: rare optimisation-robust features -> knowledge-base functions.

The MinHash LSH index (``function_index``) finds a function's copies at the same -O level; across
-O levels its instruction n-grams collapse (a gcc -O2 function reaches an estimated Jaccard of
~0.2 against its own -O0 build) and nothing passes the 0.5 floor. What survives is what a
function references and the skeleton of its computation (docs/function-similarity.md), so this
stage is an inverted index from such features to KB functions:
- bands of the robust MinHash (``FunctionFeatures.robust_minhash``, 2 slots per band: a pair
  with robust Jaccard 0.3 shares a band with probability 1 - (1 - 0.3^2)^32 = 0.95);
- distinctive constants (CRC polynomials, hash multipliers), referenced strings, called imports.
A key shared by many KB functions is not evidence of identity (``MAX_POSTINGS_PER_KEY``); the
rest are counted per (query, KB function) pair, the pairs sharing most keys are kept
(``CANDIDATES_PER_QUERY``) and verified with the richer ``function_similarity``.

The KB functions are kept as ``CompactFunctions``: numeric columns and MinHash rows in numpy
arrays, references in small tuples, no instruction tokens. ``correlate.code`` re-ranks LSH
matches from the same object, so a query never decodes a stored features file (decoding was
~0.2 s per matched sample and ~90 % of a query; docs/attribution.md, "Performance").
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from earmark.index.lsh import expand_ranges, reduce_signatures
from earmark.index.similarity import function_similarity
from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures

# Robust MinHash slots per band key. 2 rows x 32 bands: recall 0.95 at robust Jaccard 0.3 (what
# -O0 vs -O2 builds of one function share on the xcomp corpus), while bands of 4 rows found
# only 0.64 of the pairs at 0.5.
ROBUST_ROWS_PER_BAND: Final = 2
ROBUST_BANDS: Final = MINHASH_PERMUTATIONS // ROBUST_ROWS_PER_BAND

# A key held by more KB functions than this is common code or a common API (memcpy, a frequent
# robust band such as "load, add, store"): it cannot single out a function, and reading its
# posting list for every query would dominate the cost.
MAX_POSTINGS_PER_KEY: Final = 64

# KB functions verified per query function, those sharing most keys first. Verification is a
# full ``function_similarity``; 8 keeps a 2,000-function query under ~20k verifications.
CANDIDATES_PER_QUERY: Final = 8

# Fewest shared keys for a pair to be verified: one shared robust band alone is chance level
# for short robust streams.
MIN_SHARED_KEYS: Final = 3

# Verified similarity from which a feature candidate is reported. On the xcomp corpus true
# -O0/-O3 pairs score a median ~0.45 and random pairs ~0.15 (docs/function-similarity.md);
# 0.4 keeps most true pairs while a wrong pair also has to share 3 rare keys to get here.
FEATURE_MATCH_SIMILARITY: Final = 0.4

_BAND_MULTIPLIER: Final = np.uint64(0x9E3779B97F4A7C15)
_SLOT_MULTIPLIER: Final = np.uint64(0xC2B2AE3D27D4EB4F)
_EMPTY_SLOT: Final = 0xFFFFFFFF


def _text_key(kind: str, value: object) -> int:
    digest = hashlib.blake2b(f"{kind}\x00{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _robust_band_keys(function: FunctionFeatures) -> list[int]:
    if len(function.robust_minhash) != MINHASH_PERMUTATIONS:
        return []
    slots = np.asarray(function.robust_minhash, dtype=np.uint64)
    if bool((slots == _EMPTY_SLOT).all()):
        return []
    pairs = slots.reshape(ROBUST_BANDS, ROBUST_ROWS_PER_BAND)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the hash
        keys = (pairs[:, 0] * _SLOT_MULTIPLIER) ^ pairs[:, 1]
        keys = keys * _BAND_MULTIPLIER
        keys += np.arange(ROBUST_BANDS, dtype=np.uint64)
    return [int(key) for key in keys]


def feature_keys(function: FunctionFeatures) -> list[int]:
    """The 64-bit keys under which ``function`` is filed (and looked up)."""
    keys = _robust_band_keys(function)
    keys.extend(_text_key("constant", value) for value in function.constants)
    keys.extend(_text_key("string", value) for value in function.strings)
    keys.extend(_text_key("import", name.rsplit("!", 1)[-1]) for name in function.called_imports)
    return sorted(set(keys))


_UINT64_END: Final = 1 << 64
_UINT32_END: Final = 1 << 32
_INT64_END: Final = 1 << 63

# Per-function references kept as Python tuples: calls, called imports, strings, constants,
# immediates. Most are empty (the shared empty tuple costs nothing).
_References = tuple[
    tuple[int, ...], tuple[str, ...], tuple[str, ...], tuple[int, ...], tuple[int, ...]
]


def _fits_arrays(function: FunctionFeatures) -> bool:
    """Whether every numeric field fits its column (always true for extracted features; a
    hand-made file with odd values is kept as the object itself, so results never change)."""
    return (
        0 <= function.address < _UINT64_END
        and 0 <= function.exact_hash < _UINT64_END
        and all(
            0 <= value < _INT64_END
            for value in (
                function.size,
                function.block_count,
                function.edge_count,
                function.instruction_count,
            )
        )
        and len(function.minhash) in (0, MINHASH_PERMUTATIONS)
        and len(function.robust_minhash) in (0, MINHASH_PERMUTATIONS)
        and all(0 <= value < _UINT32_END for value in function.minhash)
        and all(0 <= value < _UINT32_END for value in function.robust_minhash)
    )


class _CompactBuilder:
    """Accumulates rows in ``array.array`` buffers (4 or 8 bytes per value) rather than
    lists of Python ints (~36 bytes each), so building over a large KB peaks near the size of
    the result, not ten times it."""

    def __init__(self) -> None:
        self.sample_id = array("q")
        self.function_id = array("q")
        self.numbers = array("Q")  # address, size, blocks, edges, instructions, exact hash
        self.minhash = array("I")
        self.robust = array("I")
        self.signature_length = array("q")  # minhash length, robust minhash length
        self.references: list[_References] = []
        self.sources: list[str] = []
        self.irregular: dict[int, FunctionFeatures] = {}

    def add(self, sample_id: int, function_id: int, function: FunctionFeatures) -> int:
        position = len(self.sample_id)
        self.sample_id.append(sample_id)
        self.function_id.append(function_id)
        regular = _fits_arrays(function)
        if regular:
            self.numbers.extend(
                (
                    function.address,
                    function.size,
                    function.block_count,
                    function.edge_count,
                    function.instruction_count,
                    function.exact_hash,
                )
            )
        else:
            self.irregular[position] = replace(function, normalized=(), name=None)
            self.numbers.extend(_EMPTY_NUMBERS)
        self.minhash.extend(function.minhash if regular and function.minhash else _EMPTY_ROW)
        self.robust.extend(
            function.robust_minhash if regular and function.robust_minhash else _EMPTY_ROW
        )
        self.signature_length.extend((len(function.minhash), len(function.robust_minhash)))
        self.references.append(
            (
                function.calls,
                function.called_imports,
                function.strings,
                function.constants,
                function.immediates,
            )
        )
        # Few distinct values ("call", "pdata", ...): one string object each, not one per row.
        self.sources.append(sys.intern(function.source))
        return position

    def finish(self) -> CompactFunctions:
        numbers = _column(self.numbers, np.uint64).reshape(-1, 6)
        lengths = _column(self.signature_length, np.int64).reshape(-1, 2)
        sample_ids = _column(self.sample_id, np.int64)
        return CompactFunctions(
            sample_id=sample_ids,
            function_id=_column(self.function_id, np.int64),
            address=numbers[:, 0].copy(),
            size=numbers[:, 1].astype(np.int64),
            block_count=numbers[:, 2].astype(np.int64),
            edge_count=numbers[:, 3].astype(np.int64),
            instruction_count=numbers[:, 4].astype(np.int64),
            exact_hash=numbers[:, 5].copy(),
            minhash=_column(self.minhash, np.uint32).reshape(-1, MINHASH_PERMUTATIONS),
            minhash_length=lengths[:, 0].copy(),
            robust_minhash=_column(self.robust, np.uint32).reshape(-1, MINHASH_PERMUTATIONS),
            robust_length=lengths[:, 1].copy(),
            references=tuple(self.references),
            sources=tuple(self.sources),
            irregular=dict(self.irregular),
            sample_ranges=sample_ranges(sample_ids),
        )


def sample_ranges(sample_ids: npt.NDArray[np.int64]) -> dict[int, tuple[int, int]]:
    """Each sample's (first position, last position + 1). Functions are added sample by
    sample, so each sample is one contiguous range."""
    ranges: dict[int, tuple[int, int]] = {}
    for position, sample_id in enumerate(sample_ids.tolist()):
        start, _ = ranges.get(sample_id, (position, position))
        ranges[sample_id] = (start, position + 1)
    return ranges


_EMPTY_NUMBERS: Final = (0,) * 6
_EMPTY_ROW: Final = (0,) * MINHASH_PERMUTATIONS

_Column = TypeVar("_Column", bound=np.generic)


def _column(values: array[int], dtype: type[_Column]) -> npt.NDArray[_Column]:
    """An owned numpy copy of an ``array.array`` (its C item size varies by platform)."""
    kind = "i" if values.typecode.islower() else "u"
    raw = np.frombuffer(values, dtype=f"{kind}{values.itemsize}") if len(values) else None
    if raw is None:
        return np.zeros(0, dtype=dtype)
    return raw.astype(dtype)


@dataclass(frozen=True)
class CompactFunctions:
    """KB functions without their instruction tokens: what ``function_similarity``, the
    re-ranking and evidence need, ~0.7 KB per function instead of ~10 KB decoded."""

    sample_id: npt.NDArray[np.int64]
    function_id: npt.NDArray[np.int64]  # store function id; -1 when unknown
    address: npt.NDArray[np.uint64]
    size: npt.NDArray[np.int64]
    block_count: npt.NDArray[np.int64]
    edge_count: npt.NDArray[np.int64]
    instruction_count: npt.NDArray[np.int64]
    exact_hash: npt.NDArray[np.uint64]
    minhash: npt.NDArray[np.uint32]  # (N, 64); zeros where minhash_length is 0
    minhash_length: npt.NDArray[np.int64]
    robust_minhash: npt.NDArray[np.uint32]
    robust_length: npt.NDArray[np.int64]
    references: tuple[_References, ...]
    sources: tuple[str, ...]
    irregular: Mapping[int, FunctionFeatures]  # rows whose values do not fit the columns
    sample_ranges: Mapping[int, tuple[int, int]]

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the numpy columns (the reference tuples come on top)."""
        return sum(
            int(getattr(self, name).nbytes)
            for name in (
                "sample_id", "function_id", "address", "size", "block_count", "edge_count",
                "instruction_count", "exact_hash", "minhash", "minhash_length",
                "robust_minhash", "robust_length",
            )
        )  # fmt: skip

    def function(self, position: int) -> FunctionFeatures:
        """The function at ``position``, with ``normalized`` empty and ``name`` None."""
        kept = self.irregular.get(position)
        if kept is not None:
            return kept
        calls, called_imports, strings, constants, immediates = self.references[position]
        minhash_length = int(self.minhash_length[position])
        robust_length = int(self.robust_length[position])
        return FunctionFeatures(
            address=int(self.address[position]),
            size=int(self.size[position]),
            block_count=int(self.block_count[position]),
            edge_count=int(self.edge_count[position]),
            instruction_count=int(self.instruction_count[position]),
            exact_hash=int(self.exact_hash[position]),
            minhash=tuple(self.minhash[position].tolist()) if minhash_length else (),
            normalized=(),
            calls=calls,
            called_imports=called_imports,
            strings=strings,
            constants=constants,
            name=None,
            source=self.sources[position],
            robust_minhash=tuple(self.robust_minhash[position].tolist()) if robust_length else (),
            immediates=immediates,
        )

    def locate(
        self, sample_id: int, exact_hash: int, signature: npt.NDArray[np.uint8]
    ) -> FunctionFeatures | None:
        """The sample's function with this exact hash and b-bit signature (the lowest address
        when several agree; any with the hash when none agrees); None when the sample has no
        such function. The same rule as reading the sample's features and searching them."""
        start, stop = self.sample_ranges.get(sample_id, (0, 0))
        if start == stop:
            return None
        if self.irregular and any(position in self.irregular for position in range(start, stop)):
            return _locate_in(
                [self.function(position) for position in range(start, stop)],
                exact_hash,
                signature,
            )
        if not 0 <= exact_hash < _UINT64_END:
            return None
        same_hash = start + np.flatnonzero(
            (self.exact_hash[start:stop] == np.uint64(exact_hash))
            & (self.minhash_length[start:stop] > 0)
        )
        if len(same_hash) == 0:
            return None
        signatures = reduce_signatures(self.minhash[same_hash])
        equal = same_hash[(signatures == signature).all(axis=1)]
        chosen = equal if len(equal) else same_hash
        # Lowest address; the first such row on ties, as ``min`` over the sample's order does.
        best = int(chosen[int(np.argmin(self.address[chosen]))])
        return self.function(best)


def _locate_in(
    functions: Sequence[FunctionFeatures], exact_hash: int, signature: npt.NDArray[np.uint8]
) -> FunctionFeatures | None:
    """``CompactFunctions.locate`` over function objects (also used on decoded samples)."""
    same_hash = [f for f in functions if f.exact_hash == exact_hash and len(f.minhash) > 0]
    if not same_hash:
        return None
    regular = [f for f in same_hash if len(f.minhash) == MINHASH_PERMUTATIONS]
    if len(regular) != len(same_hash):
        chosen = same_hash  # odd signature lengths cannot be compared; any with the hash
    else:
        signatures = reduce_signatures(np.array([f.minhash for f in regular], dtype=np.uint32))
        equal = np.flatnonzero((signatures == signature).all(axis=1))
        chosen = [regular[int(i)] for i in equal] or regular
    return min(chosen, key=lambda function: function.address)


def locate_function(
    functions: Sequence[FunctionFeatures], exact_hash: int, signature: npt.NDArray[np.uint8]
) -> FunctionFeatures | None:
    """The function of a decoded sample behind an index row (see ``CompactFunctions.locate``)."""
    return _locate_in(functions, exact_hash, signature)


@dataclass(frozen=True, slots=True)
class FeatureMatch:
    query: int  # position of the query function
    sample_id: int
    function: FunctionFeatures  # the KB function (``normalized`` empty, ``name`` None)
    shared_keys: int
    similarity: float  # verified ``function_similarity``
    function_id: int = -1  # store function id of the KB function; -1 when unknown


@dataclass(frozen=True)
class FeatureCandidateIndex:
    """Posting lists (key -> KB function) over the functions of the indexed samples."""

    keys: npt.NDArray[np.uint64]  # sorted; one entry per (key, function)
    postings: npt.NDArray[np.int64]  # position in ``stored`` for each entry
    # Every indexed sample's functions of >= min_instructions (with or without keys): the
    # posting targets and the re-ranking's view of the KB.
    stored: CompactFunctions

    @classmethod
    def build(
        cls,
        samples: Iterable[tuple[int, Sequence[FunctionFeatures]]],
        min_instructions: int,
        function_ids: Mapping[tuple[int, int], int] | None = None,
    ) -> FeatureCandidateIndex:
        """Index the functions of ``(sample_id, functions)`` with >= ``min_instructions``.

        ``samples`` is consumed one sample at a time, so a generator that decodes each stored
        sample keeps only one decoded sample alive. ``function_ids`` maps (sample id, address)
        to the store's function id."""
        builder = _CompactBuilder()
        keys = array("Q")
        owners = array("q")
        for sample_id, sample_functions in samples:
            for function in sample_functions:
                if function.instruction_count < min_instructions:
                    continue
                identifier = -1
                if function_ids is not None:
                    identifier = function_ids.get((sample_id, function.address), -1)
                position = builder.add(sample_id, identifier, function)
                function_keys = feature_keys(function)
                keys.extend(function_keys)
                owners.extend([position] * len(function_keys))
        key_array = _column(keys, np.uint64)
        owner_array = _column(owners, np.int64)
        del keys, owners
        order = np.argsort(key_array, kind="stable")
        key_array, owner_array = key_array[order], owner_array[order]
        # Drop keys too common to single out a function (see MAX_POSTINGS_PER_KEY).
        _, counts = np.unique(key_array, return_counts=True)
        keep = np.repeat(counts <= MAX_POSTINGS_PER_KEY, counts)
        return cls(keys=key_array[keep], postings=owner_array[keep], stored=builder.finish())

    def __len__(self) -> int:
        return len(self.stored)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.postings.nbytes) + self.stored.nbytes

    def find(
        self, queries: Sequence[FunctionFeatures], min_instructions: int
    ) -> list[FeatureMatch]:
        """Verified matches of each query function (>= ``min_instructions``), best first per
        query; only pairs sharing >= MIN_SHARED_KEYS keys are verified."""
        query_keys: list[int] = []
        query_owner: list[int] = []
        for position, function in enumerate(queries):
            if function.instruction_count < min_instructions:
                continue
            function_keys = feature_keys(function)
            query_keys.extend(function_keys)
            query_owner.extend([position] * len(function_keys))
        if not query_keys or len(self.keys) == 0:
            return []
        targets = np.array(query_keys, dtype=np.uint64)
        starts = np.searchsorted(self.keys, targets, side="left").astype(np.int64)
        stops = np.searchsorted(self.keys, targets, side="right").astype(np.int64)
        owners, positions, _ = expand_ranges(starts, stops, MAX_POSTINGS_PER_KEY)
        if len(owners) == 0:
            return []
        pair_query = np.array(query_owner, dtype=np.int64)[owners]
        pair_function = self.postings[positions]
        combined, shared = np.unique(
            pair_query * len(self.stored) + pair_function, return_counts=True
        )
        enough = shared >= MIN_SHARED_KEYS
        combined, shared = combined[enough], shared[enough]
        pair_query = combined // len(self.stored)
        pair_function = combined % len(self.stored)
        # Most shared keys first within each query; ties by KB position for determinism.
        order = np.lexsort((pair_function, -shared, pair_query))
        pair_query, pair_function, shared = pair_query[order], pair_function[order], shared[order]
        group_start = np.flatnonzero(np.r_[True, pair_query[1:] != pair_query[:-1]])
        group_sizes = np.diff(np.r_[group_start, len(pair_query)])
        rank = np.arange(len(pair_query)) - np.repeat(group_start, group_sizes)
        top = rank < CANDIDATES_PER_QUERY
        matches: list[FeatureMatch] = []
        for query, function_position, count in zip(
            pair_query[top].tolist(),
            pair_function[top].tolist(),
            shared[top].tolist(),
            strict=True,
        ):
            stored = self.stored.function(function_position)
            similarity = function_similarity(queries[query], stored)
            if similarity >= FEATURE_MATCH_SIMILARITY:
                matches.append(
                    FeatureMatch(
                        query=query,
                        sample_id=int(self.stored.sample_id[function_position]),
                        function=stored,
                        shared_keys=count,
                        similarity=similarity,
                        function_id=int(self.stored.function_id[function_position]),
                    )
                )
        matches.sort(key=lambda m: (m.query, -m.similarity, m.sample_id, m.function.address))
        return matches
