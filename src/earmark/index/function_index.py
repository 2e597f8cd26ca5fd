"""The function index: exact-hash and MinHash-LSH lookup of a whole sample's functions at once.

Memory layout (per indexed function, 10^7 rows and 10^4 samples; docs/index.md has the
measurements). Integer columns are packed in the fewest whole bytes their largest value needs
(``packed.py``), so the widths below grow by a byte only when rows or ids pass 2^24:
  signatures      64 B  b-bit MinHash (uint8 x 64); rows sorted by band-0 key
  band_orders     45 B  3-byte row permutation for bands 1..15 (band 0 is the row order itself)
  exact_hash       8 B  read only for candidate rows
  function_id      3 B  store id, to name what matched
  sample_position  2 B  position in ``sample_ids`` (one int64 per sample, not per function)
Exact duplicates have identical MinHash signatures, so they always fall in the query's band-0
bucket: the exact-hash lookup is that bucket filtered by hash equality, which saves the 12 B a
separate sorted hash array with its permutation would cost.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from earmark.errors import IndexCacheError
from earmark.index.lsh import (
    BAND_COUNT,
    ROWS_PER_BAND,
    SIGNATURE_BITS,
    band_keys,
    count_agreeing_slots,
    estimate_jaccard_from_agreement,
    expand_ranges,
    first_per_group,
    locate_keys,
    pair_budget_runs,
    reduce_signatures,
    sort_band,
)
from earmark.index.packed import PackedColumns, PackedUInts, byte_width
from earmark.index.rarity import EXAMPLE_NAMES, RarityTable, compute_rarity
from earmark.model.kb import FunctionTable, SampleRecord
from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures

# Functions with fewer instructions are neither indexed nor matched. Measured on the xcomp
# corpus (zlib/zstd/brotli, gcc+clang, 5 -O levels; `bench/index_scale.py min-size`, table in
# docs/index.md): of bodies with 1-9 instructions 13-58 % also occur verbatim in an unrelated
# library (`push rax; call; pop rcx; ret` wrappers, -O0 getters, error-name thunks); at 10-11
# it is 3.4 %, at 12-15 0.7 %, from 16 on 0 %. 10 drops 14 % of functions, nearly all noise.
MIN_INSTRUCTIONS: Final = 10

# Rows read per band bucket for one query function. A fuller bucket is code that thousands of
# stored functions share (runtime stubs): verifying all of it costs time and its rarity weight
# is ~0 anyway. Cut buckets are counted in ``FunctionMatches.truncated_buckets``.
MAX_ROWS_PER_BUCKET: Final = 512

# Candidate pairs verified per pass of a query. A sample's functions are matched in passes of
# whole query functions, each pass with at most this many (query, row) pairs unless a single
# function has more (at most 16 bands x MAX_ROWS_PER_BUCKET): the pairs and their temporaries
# (dedup, agreement, sort) take ~60 bytes each, so one pass of all of a 900-function DLL's
# ~650k pairs held 39 MiB at once; 2^17 pairs keep a pass near 8 MB. Results do not depend on
# it: passes are disjoint runs of query functions and matches are grouped by query anyway.
MAX_PAIRS_PER_PASS: Final = 1 << 17

# Default similarity floor for a reported match: the LSH S-curve threshold (16 x 4 bands).
DEFAULT_MIN_SIMILARITY: Final = 0.5
# Matches kept per query function, best first.
DEFAULT_TOP_K: Final = 20

# Rows converted per chunk while building: a chunk's gathered uint32 MinHash rows and their
# masked copy are the build's temporaries (4 MB each at 2^14 rows), however large the table.
# At 2^20 rows the PE bench's KBs were one chunk: 24 MB of temporaries beside the table
# ((a+c) KB, 47.3k functions: that step's RSS 166 -> 156 MB; the same index).
BUILD_CHUNK_ROWS: Final = 1 << 14

INDEX_FORMAT: Final = "earmark-function-index"
# 3: integer columns packed in whole bytes, sample ids once per sample, rarity profiles.
INDEX_FORMAT_VERSION: Final = 3
_MANIFEST: Final = "manifest.json"
_LOOKUP_ARRAYS: Final = ("signatures", "band_orders")
_PACKED_ARRAYS: Final = ("band_orders", "function_id", "sample_position")
_CORE_ARRAYS: Final = (*_PACKED_ARRAYS, "signatures", "exact_hash", "sample_ids")


@dataclass(frozen=True)
class QueryFunctions:
    """Query functions as arrays (Q rows), the batch form of ``FunctionFeatures``."""

    exact_hash: npt.NDArray[np.uint64]
    minhash: npt.NDArray[np.uint32]  # (Q, MINHASH_PERMUTATIONS)
    instruction_count: npt.NDArray[np.uint32]

    @classmethod
    def from_features(cls, functions: Sequence[FunctionFeatures]) -> QueryFunctions:
        minhash = np.array([f.minhash for f in functions], dtype=np.uint32)
        return cls(
            exact_hash=np.array([f.exact_hash for f in functions], dtype=np.uint64),
            minhash=minhash.reshape(len(functions), MINHASH_PERMUTATIONS),
            instruction_count=np.array([f.instruction_count for f in functions], dtype=np.uint32),
        )


@dataclass(frozen=True)
class FunctionMatches:
    """Matches of a query batch as parallel arrays, grouped by query, best first."""

    query: npt.NDArray[np.int64]  # position in the caller's query sequence
    row: npt.NDArray[np.int64]  # index row (for rarity look-ups)
    function_id: npt.NDArray[np.int64]
    sample_id: npt.NDArray[np.int64]
    similarity: npt.NDArray[np.float32]  # estimated Jaccard; 1.0 for exact matches
    exact: npt.NDArray[np.bool_]
    skipped_small: int  # query functions under the minimum size, not looked up
    truncated_buckets: int  # buckets cut at MAX_ROWS_PER_BUCKET

    def __len__(self) -> int:
        return int(self.query.shape[0])

    def for_query(self, position: int) -> FunctionMatches:
        selected = self.query == position
        return replace(
            self,
            query=self.query[selected],
            row=self.row[selected],
            function_id=self.function_id[selected],
            sample_id=self.sample_id[selected],
            similarity=self.similarity[selected],
            exact=self.exact[selected],
        )


class FunctionIndexBuilder:
    """Collects table chunks (filtered and cut to b-bit signatures at once), then sorts."""

    def __init__(self, revision: int, min_instructions: int = MIN_INSTRUCTIONS) -> None:
        self.revision = revision
        self.min_instructions = min_instructions
        self._signatures: list[npt.NDArray[np.uint8]] = []
        self._exact: list[npt.NDArray[np.uint64]] = []
        self._function_id: list[npt.NDArray[np.int64]] = []
        self._sample_id: list[npt.NDArray[np.int64]] = []

    def add(self, table: FunctionTable) -> None:
        for start in range(0, len(table), BUILD_CHUNK_ROWS):
            window = slice(start, start + BUILD_CHUNK_ROWS)
            keep = np.flatnonzero(table.instruction_count[window] >= self.min_instructions)
            keep += start
            self._signatures.append(reduce_signatures(table.minhash[keep]))
            self._exact.append(table.exact_hash[keep].astype(np.uint64))
            self._function_id.append(table.function_id[keep].astype(np.int64))
            self._sample_id.append(table.sample_id[keep].astype(np.int64))

    def finish(self) -> FunctionIndex:
        signatures = _concatenate(self._signatures, np.uint8, (0, MINHASH_PERMUTATIONS))
        self._signatures.clear()  # drop chunk references before the sorted copy is made
        order = sort_band(np.ascontiguousarray(band_keys(signatures)[:, 0]))
        signatures = signatures[order]
        keys = band_keys(signatures)
        rows = len(order)
        band_orders = np.empty((BAND_COUNT - 1, rows, byte_width(max(rows - 1, 0))), np.uint8)
        for band in range(1, BAND_COUNT):
            permutation = sort_band(np.ascontiguousarray(keys[:, band]))
            band_orders[band - 1] = PackedUInts.pack(permutation, band_orders.shape[2]).data
        sample_ids, sample_position = np.unique(
            _concatenate(self._sample_id, np.int64, (0,))[order], return_inverse=True
        )
        return FunctionIndex(
            revision=self.revision,
            min_instructions=self.min_instructions,
            signatures=signatures,
            band_orders=PackedColumns(band_orders),
            exact_hash=_concatenate(self._exact, np.uint64, (0,))[order],
            function_id=PackedUInts.pack(_concatenate(self._function_id, np.int64, (0,))[order]),
            sample_position=PackedUInts.pack(sample_position.reshape(-1)),
            sample_ids=sample_ids.astype(np.int64),
            rarity=None,
        )


_Scalar = TypeVar("_Scalar", bound=np.generic)


def _concatenate(
    parts: list[npt.NDArray[_Scalar]], dtype: type[_Scalar], empty_shape: tuple[int, ...]
) -> npt.NDArray[_Scalar]:
    if not parts:
        return np.zeros(empty_shape, dtype=dtype)
    return np.concatenate(parts)


@dataclass(frozen=True)
class FunctionIndex:
    """Exact + MinHash-LSH index over the KB's functions, with optional rarity statistics."""

    revision: int  # store revision the index was built from (the cache key)
    min_instructions: int
    signatures: npt.NDArray[np.uint8]  # (rows, 64), sorted by band-0 key
    band_orders: PackedColumns  # BAND_COUNT - 1 row permutations
    exact_hash: npt.NDArray[np.uint64]
    function_id: PackedUInts  # store function id of each row
    sample_position: PackedUInts  # each row's position in ``sample_ids``
    sample_ids: npt.NDArray[np.int64]  # distinct store sample ids, ascending (one per sample)
    rarity: RarityTable | None

    @classmethod
    def build(
        cls,
        table: FunctionTable,
        revision: int,
        samples: Mapping[int, SampleRecord] | None = None,
        min_instructions: int = MIN_INSTRUCTIONS,
    ) -> FunctionIndex:
        """Index ``table``; with ``samples`` also compute rarity for every row."""
        builder = FunctionIndexBuilder(revision, min_instructions)
        builder.add(table)
        # The caller's table (full 32-bit MinHash columns, ~2x the index) and the builder's
        # chunks are not held through the sorts and the rarity pass: this frame holds the only
        # references (PE bench (c) KB: index build peak 16 MB lower).
        del table
        index = builder.finish()
        del builder
        return index.with_rarity(samples) if samples is not None else index

    def with_rarity(self, samples: Mapping[int, SampleRecord]) -> FunctionIndex:
        rarity = compute_rarity(
            self.signatures,
            self.band_orders,
            self.exact_hash,
            self.sample_position.unpack(),
            self.sample_ids,
            samples,
        )
        return replace(self, rarity=rarity)

    def __len__(self) -> int:
        return int(self.signatures.shape[0])

    def sample_id(self, rows: npt.NDArray[np.integer]) -> npt.NDArray[np.int64]:
        """Store sample id of each index row."""
        return self.sample_ids[self.sample_position[rows]]

    @property
    def nbytes(self) -> int:
        """Bytes of the index columns (rarity not included; see ``rarity.nbytes``)."""
        return sum(int(getattr(self, name).nbytes) for name in _CORE_ARRAYS)

    @property
    def lookup_nbytes(self) -> int:
        """Bytes every query reads at random: signatures and band permutations."""
        return sum(int(getattr(self, name).nbytes) for name in _LOOKUP_ARRAYS)

    def query(
        self,
        functions: Sequence[FunctionFeatures] | QueryFunctions,
        min_similarity: float = DEFAULT_MIN_SIMILARITY,
        top_k: int = DEFAULT_TOP_K,
    ) -> FunctionMatches:
        """Stored functions similar to each query function, as one batch of array operations."""
        batch = (
            functions
            if isinstance(functions, QueryFunctions)
            else (QueryFunctions.from_features(functions))
        )
        large = np.flatnonzero(batch.instruction_count >= self.min_instructions)
        skipped = int(len(batch.instruction_count) - len(large))
        if len(large) == 0 or len(self) == 0:
            return _empty_matches(skipped)
        query_signatures = reduce_signatures(batch.minhash[large])
        query_keys = band_keys(query_signatures)
        stored_keys = band_keys(self.signatures)
        bounds = []
        for band in range(BAND_COUNT):
            order = None if band == 0 else self.band_orders.column(band - 1)
            targets = np.ascontiguousarray(query_keys[:, band])
            bounds.append(locate_keys(stored_keys, band, order, targets))
        bucket_rows = [np.maximum(stops - starts, 0) for starts, stops in bounds]
        truncated = sum(int(np.count_nonzero(rows > MAX_ROWS_PER_BUCKET)) for rows in bucket_rows)
        pairs = np.sum([np.minimum(rows, MAX_ROWS_PER_BUCKET) for rows in bucket_rows], axis=0)
        query_exact_hash = batch.exact_hash[large]
        parts = [
            self._match_queries(
                bounds, query_signatures, query_exact_hash, first, stop, top_k, min_similarity
            )
            for first, stop in pair_budget_runs(pairs, MAX_PAIRS_PER_PASS)
        ]
        queries = np.concatenate([part[0] for part in parts])
        rows = np.concatenate([part[1] for part in parts])
        return FunctionMatches(
            query=large[queries].astype(np.int64),
            row=rows,
            function_id=self.function_id[rows],
            sample_id=self.sample_id(rows),
            similarity=np.concatenate([part[2] for part in parts]),
            exact=np.concatenate([part[3] for part in parts]),
            skipped_small=skipped,
            truncated_buckets=truncated,
        )

    def _match_queries(
        self,
        bounds: Sequence[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]],
        query_signatures: npt.NDArray[np.uint8],
        query_exact_hash: npt.NDArray[np.uint64],
        first: int,
        stop: int,
        top_k: int,
        min_similarity: float,
    ) -> tuple[
        npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.bool_]
    ]:
        """Verified matches of query rows ``first:stop`` (positions among the looked-up
        functions), grouped by query, best first, at most ``top_k`` each."""
        pair_queries: list[npt.NDArray[np.int64]] = []
        pair_rows: list[npt.NDArray[np.int64]] = []
        for band, (starts, stops) in enumerate(bounds):
            order = None if band == 0 else self.band_orders.column(band - 1)
            owners, positions, _ = expand_ranges(
                starts[first:stop], stops[first:stop], MAX_ROWS_PER_BUCKET
            )
            pair_queries.append(owners + first)
            pair_rows.append(positions if order is None else order[positions])
        combined = np.unique(np.concatenate(pair_queries) * len(self) + np.concatenate(pair_rows))
        queries = combined // len(self)
        rows = combined % len(self)
        agreeing = count_agreeing_slots(self.signatures, rows, query_signatures, queries)
        similarity = estimate_jaccard_from_agreement(agreeing)
        exact = self.exact_hash[rows] == query_exact_hash[queries]
        similarity[exact] = 1.0
        keep = (similarity >= min_similarity) | exact
        queries, rows, similarity, exact = queries[keep], rows[keep], similarity[keep], exact[keep]
        best_first = np.lexsort((rows, -similarity, queries))
        queries, rows = queries[best_first], rows[best_first]
        similarity, exact = similarity[best_first], exact[best_first]
        top = first_per_group(queries, top_k)
        return queries[top], rows[top], similarity[top], exact[top]

    def save(self, path: Path) -> None:
        """Write the index (and rarity) as a directory of .npy files plus a manifest.

        Written to a temporary sibling first and renamed, so a reader never sees half a file.
        """
        staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        arrays: dict[str, npt.NDArray[np.generic]] = {
            name: getattr(self, name) for name in _CORE_ARRAYS if name not in _PACKED_ARRAYS
        }
        arrays.update({name: getattr(self, name).data for name in _PACKED_ARRAYS})
        if self.rarity is not None:
            arrays.update(self.rarity.arrays())
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array, allow_pickle=False)
        manifest = {
            "format": INDEX_FORMAT,
            "version": INDEX_FORMAT_VERSION,
            "revision": self.revision,
            "min_instructions": self.min_instructions,
            "bands": BAND_COUNT,
            "rows_per_band": ROWS_PER_BAND,
            "signature_bits": SIGNATURE_BITS,
            "rows": len(self),
            "arrays": sorted(arrays),
            "rarity": None
            if self.rarity is None
            else {
                "family_names": list(self.rarity.family_names),
                "actor_names": list(self.rarity.actor_names),
                "total_owners": self.rarity.total_owners,
            },
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)

    @classmethod
    def load(cls, path: Path, revision: int, memory_map: bool = False) -> FunctionIndex | None:
        """The index saved at ``path`` if it was built from ``revision``; None if absent or stale.

        ``memory_map`` keeps the per-row columns (exact hash, ids, rarity) on disk, paged in
        only for candidate rows; the lookup arrays (signatures, band orders; 109 B/function up
        to 2^24 rows) are always read into memory because every query touches them at random.
        Raises IndexCacheError when the directory is damaged or of another format.
        """
        manifest_path = path / _MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if manifest.get("format") != INDEX_FORMAT:
                raise IndexCacheError(f"{path} is not an earmark function index")
            if (
                manifest.get("version") != INDEX_FORMAT_VERSION
                or manifest.get("bands") != BAND_COUNT
                or manifest.get("rows_per_band") != ROWS_PER_BAND
                or manifest.get("signature_bits") != SIGNATURE_BITS
            ):
                raise IndexCacheError(f"{path} was written with other index parameters")
            if manifest.get("revision") != revision:
                return None
            mode: Literal["r"] | None = "r" if memory_map else None
            arrays = {
                name: np.load(
                    path / f"{name}.npy",
                    mmap_mode=None if name in _LOOKUP_ARRAYS else mode,
                    allow_pickle=False,
                )
                for name in manifest["arrays"]
            }
            rarity_names = manifest["rarity"]
            index = cls(
                revision=revision,
                min_instructions=int(manifest["min_instructions"]),
                signatures=arrays["signatures"],
                band_orders=PackedColumns(arrays["band_orders"]),
                exact_hash=arrays["exact_hash"],
                function_id=PackedUInts(arrays["function_id"]),
                sample_position=PackedUInts(arrays["sample_position"]),
                sample_ids=arrays["sample_ids"],
                rarity=None
                if rarity_names is None
                else RarityTable(
                    profile=PackedUInts(arrays["rarity_profile"]),
                    family_count=arrays["rarity_family_count"],
                    actor_count=arrays["rarity_actor_count"],
                    owner_count=arrays["rarity_owner_count"],
                    goodware_count=arrays["rarity_goodware_count"],
                    family_examples=arrays["rarity_family_examples"],
                    actor_examples=arrays["rarity_actor_examples"],
                    family_names=tuple(rarity_names["family_names"]),
                    actor_names=tuple(rarity_names["actor_names"]),
                    total_owners=int(rarity_names["total_owners"]),
                ),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise IndexCacheError(f"cannot read the function index at {path}: {error}") from error
        _check_consistent(index, path)
        return index

    @classmethod
    def load_or_build(
        cls,
        path: Path,
        revision: int,
        table: FunctionTable,
        samples: Mapping[int, SampleRecord],
    ) -> FunctionIndex:
        """The cached index for ``revision``, rebuilt (and saved) when missing, stale or damaged."""
        try:
            cached = cls.load(path, revision)
        except IndexCacheError:
            cached = None  # a damaged cache is rebuilt, never trusted
        if cached is not None and cached.rarity is not None:
            return cached
        index = cls.build(table, revision, samples)
        index.save(path)
        return index


def _check_consistent(index: FunctionIndex, path: Path) -> None:
    """Shapes, dtypes and value bounds, so a damaged file fails here and not mid-query."""
    rows = len(index)
    expected: dict[str, tuple[type[np.generic], tuple[int | None, ...]]] = {
        "signatures": (np.uint8, (rows, MINHASH_PERMUTATIONS)),
        "band_orders": (np.uint8, (BAND_COUNT - 1, rows, None)),
        "exact_hash": (np.uint64, (rows,)),
        "function_id": (np.uint8, (rows, None)),
        "sample_position": (np.uint8, (rows, None)),
        "sample_ids": (np.int64, (None,)),
    }
    for name, (dtype, shape) in expected.items():
        value = getattr(index, name)
        array = value if isinstance(value, np.ndarray) else value.data
        if not _has_shape(array, dtype, shape):
            raise IndexCacheError(f"{path}: {name} has dtype {array.dtype} shape {array.shape}")
    orders = index.band_orders
    if any(orders.column(band).maximum() >= rows for band in range(len(orders))):
        raise IndexCacheError(f"{path}: band order points past the last row")
    if index.sample_position.maximum() >= len(index.sample_ids):
        raise IndexCacheError(f"{path}: sample positions point past the sample list")
    rarity = index.rarity
    if rarity is not None:
        profiles = rarity.owner_count.shape[0]
        counts = (rarity.family_count, rarity.actor_count, rarity.goodware_count)
        examples = (rarity.family_examples, rarity.actor_examples)
        if (
            any(count.shape != (profiles,) for count in counts)
            or any(example.shape != (profiles, EXAMPLE_NAMES) for example in examples)
            or not _has_shape(rarity.profile.data, np.uint8, (rows, None))
        ):
            raise IndexCacheError(f"{path}: rarity columns do not match each other")
        if rarity.profile.maximum() >= profiles:
            raise IndexCacheError(f"{path}: rarity profiles do not match the index rows")
        names_ok = int(rarity.family_examples.max(initial=-1)) < len(rarity.family_names) and int(
            rarity.actor_examples.max(initial=-1)
        ) < len(rarity.actor_names)
        if not names_ok:
            raise IndexCacheError(f"{path}: rarity names do not match their codes")


def _has_shape(
    array: npt.NDArray[np.generic], dtype: type[np.generic], shape: tuple[int | None, ...]
) -> bool:
    """dtype and shape match (None: any length); a packed uint8 column is 1..8 bytes wide."""
    if array.dtype != dtype or array.ndim != len(shape):
        return False
    if not all(
        want is None or length == want for length, want in zip(array.shape, shape, strict=True)
    ):
        return False
    return not (dtype is np.uint8 and shape[-1] is None) or 1 <= array.shape[-1] <= 8


def _empty_matches(skipped: int) -> FunctionMatches:
    return FunctionMatches(
        query=np.zeros(0, dtype=np.int64),
        row=np.zeros(0, dtype=np.int64),
        function_id=np.zeros(0, dtype=np.int64),
        sample_id=np.zeros(0, dtype=np.int64),
        similarity=np.zeros(0, dtype=np.float32),
        exact=np.zeros(0, dtype=bool),
        skipped_small=skipped,
        truncated_buckets=0,
    )


def saved_index_revision(path: Path) -> int | None:
    """The revision of the index saved at ``path`` when its manifest is of this format and
    version, else None (absent or unreadable: ``FunctionIndex.load`` decides about damage).
    Reads the manifest alone."""
    try:
        manifest = json.loads((path / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("format") != INDEX_FORMAT or manifest.get("version") != INDEX_FORMAT_VERSION:
        return None
    revision = manifest.get("revision")
    return revision if isinstance(revision, int) else None
