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

The KB functions are kept as ``CompactFunctions`` (``index.compact_functions``): numeric
columns, MinHash rows and flattened references in numpy arrays, no instruction tokens.
``correlate.code`` re-ranks LSH matches from the same object, so a query never decodes a stored
features file (decoding was ~0.2 s per matched sample and ~90 % of a query; docs/attribution.md,
"Performance").
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Final

import numpy as np
import numpy.typing as npt

from earmark.index.compact_functions import (
    CompactBuilder,
    CompactFunctions,
    locate_function,
    sample_ranges,
)
from earmark.index.compact_rows import ColumnBlock, regular_columns
from earmark.index.key_postings import FIRST_SWEEP_ENTRIES, PostingsBuilder
from earmark.index.lsh import expand_ranges, first_per_group, pair_budget_runs
from earmark.index.pair_similarity import stored_pair_similarity
from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures

__all__ = [
    "CANDIDATES_PER_QUERY",
    "FEATURE_MATCH_SIMILARITY",
    "MAX_POSTINGS_PER_KEY",
    "MIN_SHARED_KEYS",
    "ROBUST_ROWS_PER_BAND",
    "CompactFunctions",
    "FeatureCandidateIndex",
    "FeatureMatch",
    "StageRows",
    "StoredFunctionIds",
    "TextKeys",
    "feature_key_rows",
    "feature_keys",
    "locate_function",
    "sample_ranges",
    "stage_rows",
]

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

# (key, posting) pairs gathered per pass of ``find``: ~80 bytes each with their temporaries
# (dedup, sort), so 2^16 keep a pass near 5 MB. Results do not depend on it.
MAX_KEY_PAIRS_PER_PASS: Final = 1 << 16

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


def _robust_band_keys(
    functions: Sequence[FunctionFeatures],
) -> tuple[npt.NDArray[np.uint64], list[int]]:
    """The robust band keys (one row of ROBUST_BANDS each) of the functions that have them
    (a full robust MinHash, not every slot empty) and their positions, in one numpy pass over
    all of them: numpy calls per function cost ~14 µs each, 0.5 s of the stage build on the
    PE bench KB."""
    full = [
        position
        for position, function in enumerate(functions)
        if len(function.robust_minhash) == MINHASH_PERMUTATIONS
    ]
    if not full:
        return np.zeros((0, ROBUST_BANDS), np.uint64), []
    slots = np.array([functions[position].robust_minhash for position in full], dtype=np.uint64)
    banded = ~(slots == _EMPTY_SLOT).all(axis=1)
    pairs = slots[banded].reshape(-1, ROBUST_BANDS, ROBUST_ROWS_PER_BAND)
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the hash
        keys = (pairs[:, :, 0] * _SLOT_MULTIPLIER) ^ pairs[:, :, 1]
        keys = keys * _BAND_MULTIPLIER
        keys += np.arange(ROBUST_BANDS, dtype=np.uint64)
    positions = [position for position, kept in zip(full, banded.tolist(), strict=True) if kept]
    return keys, positions


def _robust_band_key_rows(functions: Sequence[FunctionFeatures]) -> list[list[int]]:
    """The robust band keys of each function (none without a full, non-empty robust MinHash)."""
    rows: list[list[int]] = [[] for _ in functions]
    keys, positions = _robust_band_keys(functions)
    for position, band_keys in zip(positions, keys.tolist(), strict=True):
        rows[position] = band_keys
    return rows


class TextKeys:
    """``_text_key`` of each constant, string and import seen, remembered for one build: the
    PE bench KB files 70k of them under 10k distinct keys (a hash each: ~0.1 of the ~2 CPU s
    of ``KnowledgeBase.prepare``)."""

    def __init__(self) -> None:
        self._known: dict[str, dict[object, int]] = {"constant": {}, "string": {}, "import": {}}

    def extend(self, keys: list[int], kind: str, values: Iterable[object]) -> None:
        known = self._known[kind]
        for value in values:
            key = known.get(value)
            if key is None:
                key = known[value] = _text_key(kind, value)
            keys.append(key)


def _with_text_keys_into(
    keys: list[int], function: FunctionFeatures, known: TextKeys | None
) -> None:
    imports = (name.rsplit("!", 1)[-1] for name in function.called_imports)
    if known is None:
        keys.extend(_text_key("constant", value) for value in function.constants)
        keys.extend(_text_key("string", value) for value in function.strings)
        keys.extend(_text_key("import", name) for name in imports)
    else:
        known.extend(keys, "constant", function.constants)
        known.extend(keys, "string", function.strings)
        known.extend(keys, "import", imports)


def _with_text_keys(
    keys: list[int], function: FunctionFeatures, known: TextKeys | None = None
) -> list[int]:
    _with_text_keys_into(keys, function, known)
    return sorted(set(keys))


def feature_keys(function: FunctionFeatures) -> list[int]:
    """The 64-bit keys under which ``function`` is filed (and looked up)."""
    return _with_text_keys(_robust_band_key_rows([function])[0], function)


def feature_key_rows(
    functions: Sequence[FunctionFeatures], known: TextKeys | None = None
) -> list[list[int]]:
    """``feature_keys`` of each function, the band keys of all of them computed together
    (the text keys remembered in ``known`` when given)."""
    return [
        _with_text_keys(band_keys, function, known)
        for band_keys, function in zip(_robust_band_key_rows(functions), functions, strict=True)
    ]


class StoredFunctionIds(Mapping[tuple[int, int], int]):
    """(sample id, address) -> store function id over the function table's columns. The
    stage is built sample by sample, so one sample's dict is held at a time rather than a dict
    of every stored function (47k tuple keys, ~10 MB on the PE bench KB)."""

    def __init__(
        self,
        sample_id: npt.NDArray[np.int64],
        address: npt.NDArray[np.uint64],
        function_id: npt.NDArray[np.int64],
    ) -> None:
        # Stable: a (sample, address) stored twice maps to its last function id, as a dict
        # filled in function id order would.
        order = np.lexsort((address, sample_id))
        self._sample_id = sample_id[order]
        self._address = address[order]
        self._function_id = function_id[order]
        self._current: tuple[int | None, dict[int, int]] = (None, {})

    def _of_sample(self, sample_id: int) -> dict[int, int]:
        if self._current[0] != sample_id:
            start, stop = np.searchsorted(self._sample_id, [sample_id, sample_id + 1]).tolist()
            by_address = dict(
                zip(
                    self._address[start:stop].tolist(),
                    self._function_id[start:stop].tolist(),
                    strict=True,
                )
            )
            self._current = (sample_id, by_address)
        return self._current[1]

    def __getitem__(self, key: tuple[int, int]) -> int:
        sample_id, address = key
        return self._of_sample(sample_id)[address]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return zip(self._sample_id.tolist(), self._address.tolist(), strict=True)

    def __len__(self) -> int:
        return len(self._function_id)


def _flat_feature_keys(
    functions: Sequence[FunctionFeatures], known: TextKeys
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.int64]]:
    """``feature_key_rows(functions, known)`` end to end, and the length of each row: each
    function's keys deduplicated and sorted by one sort of the whole sample rather than a
    ``sorted(set(...))`` and a list per function (29k of them on the PE bench KB)."""
    band_keys, band_positions = _robust_band_keys(functions)
    text: list[int] = []
    text_counts: list[int] = []
    for function in functions:
        before = len(text)
        _with_text_keys_into(text, function, known)
        text_counts.append(len(text) - before)
    keys = np.concatenate([band_keys.ravel(), np.array(text, dtype=np.uint64)])
    owners = np.concatenate(
        [
            np.repeat(np.array(band_positions, dtype=np.int64), ROBUST_BANDS),
            np.repeat(np.arange(len(functions), dtype=np.int64), text_counts),
        ]
    )
    if len(keys) == 0:
        return keys, np.zeros(len(functions), dtype=np.int64)
    order = np.lexsort((keys, owners))  # by function, then key
    keys, owners = keys[order], owners[order]
    first = np.r_[True, (keys[1:] != keys[:-1]) | (owners[1:] != owners[:-1])]
    return keys[first], np.bincount(owners[first], minlength=len(functions)).astype(np.int64)


@dataclass(frozen=True, slots=True)
class StageRows:
    """What the stage files for one sample: its functions of >= min_instructions as column
    blocks (``functions`` kept instead when a value does not fit the columns) and their keys.
    Computed from the decoded sample alone (``stage_rows``), so a build can decode and
    convert samples in other processes and only add the rows (``kb_build``)."""

    addresses: tuple[int, ...]  # of the indexed functions, in order
    sources: tuple[str, ...]
    block: ColumnBlock | None  # None: see ``functions``
    functions: tuple[FunctionFeatures, ...]  # only when ``block`` is None
    keys: npt.NDArray[np.uint64]  # each function's sorted distinct keys, end to end
    key_counts: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.addresses)


def stage_rows(
    functions: Sequence[FunctionFeatures], min_instructions: int, known: TextKeys
) -> StageRows:
    """The ``StageRows`` of a sample with these functions."""
    indexed = [function for function in functions if function.instruction_count >= min_instructions]
    block = regular_columns(indexed)
    keys, counts = _flat_feature_keys(indexed, known)
    return StageRows(
        addresses=tuple(function.address for function in indexed),
        sources=tuple(function.source for function in indexed),
        block=block,
        functions=() if block is not None else tuple(indexed),
        keys=keys,
        key_counts=counts,
    )


def _add_rows(
    builder: CompactBuilder,
    postings: PostingsBuilder,
    sample_id: int,
    rows: StageRows,
    function_ids: Mapping[tuple[int, int], int] | None,
) -> None:
    postings.add(rows.keys, rows.key_counts)
    if not rows:
        return  # nothing indexed
    identifiers = [-1] * len(rows)
    if function_ids is not None:
        identifiers = [function_ids.get((sample_id, address), -1) for address in rows.addresses]
    if rows.block is not None:
        builder.add_block(sample_id, identifiers, rows.block, rows.sources)
    else:
        builder.add_sample(sample_id, identifiers, rows.functions)


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
    # The cache files the arrays are mapped from (``index.feature_cache``); empty when built
    # in memory. Held to hand their touched pages back after a query (``release_pages``).
    mappings: tuple[mmap.mmap, ...] = field(default=(), compare=False, repr=False)

    def release_pages(self) -> None:
        """Drop the mapped files' pages from this process's resident set; they stay in the
        page cache, and the next query that reads a row maps its page again (a minor fault).

        A query reads rows scattered over the whole MinHash columns, so a process that has
        answered a few dozen queries otherwise keeps nearly all of them resident: on the PE
        bench (c) KB 17 MB of ``minhash.npy``/``robust_minhash.npy``, held through the next
        query and the next index build (docs/benchmarks.md, "Benchmark process memory").
        """
        advice = getattr(mmap, "MADV_DONTNEED", None)  # absent where madvise is (Windows)
        if advice is None:
            return
        for mapping in self.mappings:
            if not mapping.closed:
                mapping.madvise(advice)

    @classmethod
    def build(
        cls,
        samples: Iterable[tuple[int, Sequence[FunctionFeatures]]],
        min_instructions: int,
        function_ids: Mapping[tuple[int, int], int] | None = None,
        first_sweep: int = FIRST_SWEEP_ENTRIES,
    ) -> FeatureCandidateIndex:
        """Index the functions of ``(sample_id, functions)`` with >= ``min_instructions``.

        ``samples`` is consumed one sample at a time, so a generator that decodes each stored
        sample keeps only one decoded sample alive. ``function_ids`` maps (sample id, address)
        to the store's function id. ``first_sweep``: see ``key_postings`` (the same index
        whatever its value)."""
        known = TextKeys()
        rows = (
            (sample_id, stage_rows(sample_functions, min_instructions, known))
            for sample_id, sample_functions in samples
        )
        return cls.build_from_rows(rows, function_ids, first_sweep)

    @classmethod
    def build_from_rows(
        cls,
        samples: Iterable[tuple[int, StageRows]],
        function_ids: Mapping[tuple[int, int], int] | None = None,
        first_sweep: int = FIRST_SWEEP_ENTRIES,
    ) -> FeatureCandidateIndex:
        """``build`` from each sample's ``stage_rows`` (consumed one sample at a time)."""
        builder = CompactBuilder()
        postings = PostingsBuilder(MAX_POSTINGS_PER_KEY, first_sweep)
        for sample_id, rows in samples:
            _add_rows(builder, postings, sample_id, rows, function_ids)
            # The loop name would keep this sample alive while the next one is made.
            del rows
        # The keys are sorted before the builder's buffers become columns, so the sort's
        # full-length temporaries and the columns' copies are not in memory together.
        kept_keys, owners = postings.finish()
        del postings
        return cls(keys=kept_keys, postings=owners, stored=builder.finish())

    def __len__(self) -> int:
        return len(self.stored)

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.postings.nbytes) + self.stored.nbytes

    def _candidates(
        self,
        query_positions: npt.NDArray[np.int64],
        key_counts: npt.NDArray[np.int64],
        starts: npt.NDArray[np.int64],
        stops: npt.NDArray[np.int64],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(query position, KB position, shared keys) of the KB functions sharing at least
        MIN_SHARED_KEYS keys with each of these query functions (whose keys' posting ranges
        are ``starts:stops``, ``key_counts`` per function): at most CANDIDATES_PER_QUERY per
        query, grouped by query, most shared keys first, ties by KB position."""
        owners, positions, _ = expand_ranges(starts, stops, MAX_POSTINGS_PER_KEY)
        pair_query = np.repeat(query_positions, key_counts)[owners]
        pair_function = self.postings[positions]
        del owners, positions
        combined, shared = np.unique(
            pair_query * len(self.stored) + pair_function, return_counts=True
        )
        enough = shared >= MIN_SHARED_KEYS
        combined, shared = combined[enough], shared[enough]
        pair_query = combined // len(self.stored)
        pair_function = combined % len(self.stored)
        order = np.lexsort((pair_function, -shared, pair_query))
        pair_query, pair_function, shared = pair_query[order], pair_function[order], shared[order]
        top = first_per_group(pair_query, CANDIDATES_PER_QUERY)
        return pair_query[top], pair_function[top], shared[top]

    def find(
        self, queries: Sequence[FunctionFeatures], min_instructions: int
    ) -> list[FeatureMatch]:
        """Verified matches of each query function (>= ``min_instructions``), best first per
        query; only pairs sharing >= MIN_SHARED_KEYS keys are verified."""
        looked_up = [
            position
            for position, function in enumerate(queries)
            if function.instruction_count >= min_instructions
        ]
        key_rows = feature_key_rows([queries[position] for position in looked_up])
        key_counts = np.array([len(row) for row in key_rows], dtype=np.int64)
        targets = np.fromiter(
            chain.from_iterable(key_rows), dtype=np.uint64, count=key_counts.sum()
        )
        del key_rows
        if len(targets) == 0 or len(self.keys) == 0:
            return []
        starts = np.searchsorted(self.keys, targets, side="left").astype(np.int64)
        stops = np.searchsorted(self.keys, targets, side="right").astype(np.int64)
        del targets
        # Candidates are chosen per query function, so runs of whole query functions with at
        # most MAX_KEY_PAIRS_PER_PASS (key, posting) pairs each give the same candidates as one
        # pass, without one pass's pair temporaries (20 MiB for a 1,800-function DLL).
        key_pairs = np.minimum(np.maximum(stops - starts, 0), MAX_POSTINGS_PER_KEY)
        key_offsets = np.r_[0, np.cumsum(key_counts)]  # query i's keys: offsets[i]:offsets[i+1]
        running = np.r_[0, np.cumsum(key_pairs)]
        pairs_per_query = running[key_offsets[1:]] - running[key_offsets[:-1]]
        owner_of_query = np.array(looked_up, dtype=np.int64)
        chosen = [
            self._candidates(
                owner_of_query[first:stop],
                key_counts[first:stop],
                starts[key_offsets[first] : key_offsets[stop]],
                stops[key_offsets[first] : key_offsets[stop]],
            )
            for first, stop in pair_budget_runs(pairs_per_query, MAX_KEY_PAIRS_PER_PASS)
        ]
        pair_query = np.concatenate([part[0] for part in chosen])
        pair_function = np.concatenate([part[1] for part in chosen])
        shared = np.concatenate([part[2] for part in chosen])
        if len(pair_query) == 0:
            return []
        # Verified in one batch, bit for bit ``function_similarity``; only the pairs that pass
        # become FunctionFeatures (a KB function rebuilt per candidate held ~10 MB of Python
        # objects at the peak of a PE bench (c) query, most of them rejected).
        similarity = stored_pair_similarity(queries, pair_query, self.stored, pair_function)
        passed = similarity >= FEATURE_MATCH_SIMILARITY
        matches: list[FeatureMatch] = []
        for query, function_position, count, score in zip(
            pair_query[passed].tolist(),
            pair_function[passed].tolist(),
            shared[passed].tolist(),
            similarity[passed].tolist(),
            strict=True,
        ):
            matches.append(
                FeatureMatch(
                    query=query,
                    sample_id=int(self.stored.sample_id[function_position]),
                    function=self.stored.function(function_position),
                    shared_keys=count,
                    similarity=score,
                    function_id=int(self.stored.function_id[function_position]),
                )
            )
        matches.sort(key=lambda m: (m.query, -m.similarity, m.sample_id, m.function.address))
        return matches
