"""Knowledge-base functions in numpy columns: what re-ranking and the feature stage read.

``CompactFunctions`` keeps, per KB function, the numbers, both MinHash rows and the references
(calls, called imports, strings, constants, immediates) -- no instruction tokens. References
are flattened into value arrays with per-function offsets (text as one UTF-8 blob), and a
``FunctionFeatures`` is rebuilt only for the rows a query touches. So the whole object is a
set of arrays that ``index.feature_cache`` saves as ``.npy`` files and maps back without
unpickling or rebuilding Python objects: a process pays for the pages a query reads, not
for the ~40 k reference tuples per 40 k functions it held before (~50 MB on the PE bench KB).
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from earmark.index.compact_columns import (
    IntColumn,
    IntColumnBuilder,
    TextColumn,
    TextColumnBuilder,
    column_of,
    extend_column,
)
from earmark.index.compact_rows import (
    INT_REFERENCES,
    TEXT_REFERENCES,
    ColumnBlock,
    fits_columns,
    regular_columns,
)
from earmark.index.lsh import expand_ranges, reduce_signatures
from earmark.index.row_reads import RowFile
from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures

__all__ = [
    "INT_REFERENCES",
    "NUMERIC_COLUMNS",
    "SIGNATURE_COLUMNS",
    "TEXT_REFERENCES",
    "CompactBuilder",
    "CompactFunctions",
    "IntColumn",
    "TextColumn",
    "fits_columns",
    "locate_function",
    "sample_ranges",
]

_UINT64_END: Final = 1 << 64

NUMERIC_COLUMNS: Final = {
    "sample_id": np.int64,
    "function_id": np.int64,
    "address": np.uint64,
    "size": np.int64,
    "block_count": np.int64,
    "edge_count": np.int64,
    "instruction_count": np.int64,
    "exact_hash": np.uint64,
    "minhash_length": np.int64,
    "robust_length": np.int64,
}
SIGNATURE_COLUMNS: Final = ("minhash", "robust_minhash")


# (request, same-hash function) pairs ``locate_positions`` compares per step: its temporaries
# stay near 10 MB (4 MB of them the gathered MinHash rows, 16,384 x 64 x 4 B). A query's
# requests usually fit one step (~1,500 pairs); on the PE bench KB one query whose matches
# hit a stub hash shared by many functions of a sample needed ~120 MB in one step.
LOCATE_CHUNK: Final = 1 << 14

_EMPTY_NUMBERS: Final = (0,) * 6
_EMPTY_ROW: Final = (0,) * MINHASH_PERMUTATIONS


class CompactBuilder:
    """Accumulates rows in ``array.array`` buffers (1-8 bytes per value) rather than lists of
    Python objects, so building over a large KB peaks near the size of the result.

    ``add`` only records a function; its sample's functions are converted together when the
    next sample starts or at ``finish`` (``add_sample``): a numpy array per column and a
    range check over it instead of ~40 Python-level steps per function (~30 % of
    ``KnowledgeBase.prepare`` on the PE bench KB, docs/benchmarks.md "Ingest pipeline
    cost"). Callers add a sample's functions together, so the held ones are a sample's."""

    def __init__(self) -> None:
        self.sample_id = array("q")
        self.function_id = array("q")
        self.numbers = array("Q")  # address, size, blocks, edges, instructions, exact hash
        self.minhash = array("I")
        self.robust = array("I")
        self.signature_length = array("q")  # minhash length, robust minhash length
        self.ints = {name: IntColumnBuilder() for name in INT_REFERENCES}
        self.texts = {name: TextColumnBuilder() for name in TEXT_REFERENCES}
        self.source_codes = array("q")
        self.source_names: dict[str, int] = {}
        self.irregular: dict[int, FunctionFeatures] = {}
        self._rows = 0
        self._pending_sample = 0
        self._pending_ids: list[int] = []
        self._pending: list[FunctionFeatures] = []

    def add(self, sample_id: int, function_id: int, function: FunctionFeatures) -> int:
        """Add one function; its position in the result."""
        if self._pending and sample_id != self._pending_sample:
            self._add_pending()
        self._pending_sample = sample_id
        self._pending_ids.append(function_id)
        self._pending.append(function)
        self._rows += 1
        return self._rows - 1

    def add_sample(
        self, sample_id: int, function_ids: Sequence[int], functions: Sequence[FunctionFeatures]
    ) -> None:
        """Add a sample's functions (with their store ids) at once, as ``add`` of each."""
        self._add_pending()
        self._rows += len(functions)
        self._add_rows(sample_id, function_ids, functions)

    def _add_pending(self) -> None:
        if self._pending:
            self._add_rows(self._pending_sample, self._pending_ids, self._pending)
            self._pending_ids, self._pending = [], []

    def _add_rows(
        self, sample_id: int, function_ids: Sequence[int], functions: Sequence[FunctionFeatures]
    ) -> None:
        block = regular_columns(functions)
        if block is None:  # some value does not fit: function by function
            for function_id, function in zip(function_ids, functions, strict=True):
                self._add_one(sample_id, function_id, function)
            return
        self._add_block(sample_id, function_ids, block, [f.source for f in functions])

    def add_block(
        self,
        sample_id: int,
        function_ids: Sequence[int],
        block: ColumnBlock,
        sources: Sequence[str],
    ) -> None:
        """Add a sample's functions already converted by ``regular_columns`` (elsewhere: a
        build's decoding processes, ``kb_build``) with their ``source``s, as ``add_sample``
        of the functions would."""
        self._add_pending()
        self._rows += len(sources)
        self._add_block(sample_id, function_ids, block, sources)

    def _add_block(
        self,
        sample_id: int,
        function_ids: Sequence[int],
        block: ColumnBlock,
        sources: Sequence[str],
    ) -> None:
        self.sample_id.extend([sample_id] * len(sources))
        self.function_id.extend(function_ids)
        extend_column(self.numbers, block.numbers)
        extend_column(self.minhash, block.minhash)
        extend_column(self.robust, block.robust_minhash)
        extend_column(self.signature_length, block.signature_lengths)
        for name, ints in self.ints.items():
            ints.add_rows(*block.int_references[name])
        for name, texts in self.texts.items():
            texts.add_rows(*block.text_references[name])
        names = self.source_names
        self.source_codes.extend([names.setdefault(source, len(names)) for source in sources])

    def _add_one(self, sample_id: int, function_id: int, function: FunctionFeatures) -> None:
        position = len(self.sample_id)
        self.sample_id.append(sample_id)
        self.function_id.append(function_id)
        regular = fits_columns(function)
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
        for name, ints in self.ints.items():
            ints.add(getattr(function, name) if regular else ())
        for name, texts in self.texts.items():
            texts.add(getattr(function, name) if regular else ())
        code = self.source_names.setdefault(function.source, len(self.source_names))
        self.source_codes.append(code)

    def finish(self) -> CompactFunctions:
        self._add_pending()
        numbers = column_of(self.numbers, np.uint64).reshape(-1, 6)
        lengths = column_of(self.signature_length, np.int64).reshape(-1, 2)
        sample_ids = column_of(self.sample_id, np.int64)
        return CompactFunctions(
            sample_id=sample_ids,
            function_id=column_of(self.function_id, np.int64),
            address=numbers[:, 0].copy(),
            size=numbers[:, 1].astype(np.int64),
            block_count=numbers[:, 2].astype(np.int64),
            edge_count=numbers[:, 3].astype(np.int64),
            instruction_count=numbers[:, 4].astype(np.int64),
            exact_hash=numbers[:, 5].copy(),
            minhash=column_of(self.minhash, np.uint32).reshape(-1, MINHASH_PERMUTATIONS),
            minhash_length=lengths[:, 0].copy(),
            robust_minhash=column_of(self.robust, np.uint32).reshape(-1, MINHASH_PERMUTATIONS),
            robust_length=lengths[:, 1].copy(),
            int_references={name: ints.finish() for name, ints in self.ints.items()},
            text_references={name: texts.finish() for name, texts in self.texts.items()},
            source_codes=column_of(self.source_codes, np.int64),
            source_names=tuple(self.source_names),
            irregular=dict(self.irregular),
            sample_ranges=sample_ranges(sample_ids),
        )


def sample_ranges(sample_ids: npt.NDArray[np.int64]) -> dict[int, tuple[int, int]]:
    """Each sample's (first position, last position + 1). Functions are added sample by
    sample, so each sample is one contiguous range."""
    if len(sample_ids) == 0:
        return {}
    change = np.flatnonzero(sample_ids[1:] != sample_ids[:-1]) + 1
    starts = np.r_[0, change].tolist()
    stops = np.r_[change, len(sample_ids)].tolist()
    ranges: dict[int, tuple[int, int]] = {}
    for start, stop in zip(starts, stops, strict=True):
        sample_id = int(sample_ids[start])
        first, _ = ranges.get(sample_id, (start, start))
        ranges[sample_id] = (first, stop)
    return ranges


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
    int_references: Mapping[str, IntColumn]  # INT_REFERENCES
    text_references: Mapping[str, TextColumn]  # TEXT_REFERENCES
    source_codes: npt.NDArray[np.int64]  # index into source_names
    source_names: tuple[str, ...]
    irregular: Mapping[int, FunctionFeatures]  # rows whose values do not fit the columns
    sample_ranges: Mapping[int, tuple[int, int]]
    # Signature columns (SIGNATURE_COLUMNS) of a stage loaded from its cache, read by row with
    # ``pread`` rather than through their mappings (``index.row_reads``); empty when in memory.
    row_files: Mapping[str, RowFile] = field(default_factory=dict, repr=False, compare=False)
    # (rows + 1, 5): offsets of calls, constants, immediates, called imports, strings (1.6 MB
    # per 40k functions), so a row's ten bounds are one slice.
    _reference_bounds: npt.NDArray[np.int64] = field(init=False, repr=False, compare=False)
    # Positions sorted by exact hash within each sample's range, and the hashes in that order
    # (16 bytes per function): ``locate`` binary-searches the sample's range instead of
    # comparing every one of its functions (it runs for every re-ranked candidate). None when
    # samples' ranges interleave (never for a built stage), then ``locate`` scans.
    _hash_order: npt.NDArray[np.int64] | None = field(init=False, repr=False, compare=False)
    _sorted_hashes: npt.NDArray[np.uint64] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        columns = [self.int_references[name].offsets for name in INT_REFERENCES]
        columns += [self.text_references[name].offsets for name in TEXT_REFERENCES]
        object.__setattr__(self, "_reference_bounds", np.stack(columns, axis=1))
        order, hashes = None, None
        ranges = sorted(self.sample_ranges.values())
        if sum(stop - start for start, stop in ranges) == len(self):
            run = np.zeros(len(self), dtype=np.int64)
            for number, (start, stop) in enumerate(ranges):
                run[start:stop] = number
            order = np.lexsort((self.exact_hash, run)).astype(np.int64)
            hashes = np.asarray(self.exact_hash)[order]
        object.__setattr__(self, "_hash_order", order)
        object.__setattr__(self, "_sorted_hashes", hashes)

    def __len__(self) -> int:
        return int(self.sample_id.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the numpy columns, references included."""
        columns = [getattr(self, name) for name in (*NUMERIC_COLUMNS, *SIGNATURE_COLUMNS)]
        columns += [self.source_codes]
        for ints in self.int_references.values():
            columns += [ints.values, ints.negative, ints.offsets]
        for texts in self.text_references.values():
            columns += [texts.blob, texts.starts, texts.ids, texts.offsets]
        return sum(int(column.nbytes) for column in columns)

    def function(self, position: int) -> FunctionFeatures:
        """The function at ``position``, with ``normalized`` empty and ``name`` None."""
        kept = self.irregular.get(position)
        if kept is not None:
            return kept
        # Plain ints via ``item`` and all reference bounds in one slice: this runs for every
        # re-ranked candidate (thousands per query), and numpy scalars cost ~3x more.
        low, high = self._reference_bounds[position : position + 2].tolist()
        ints, texts = self.int_references, self.text_references
        return FunctionFeatures(
            address=self.address.item(position),
            size=self.size.item(position),
            block_count=self.block_count.item(position),
            edge_count=self.edge_count.item(position),
            instruction_count=self.instruction_count.item(position),
            exact_hash=self.exact_hash.item(position),
            minhash=tuple(self._signature_row("minhash", position))
            if self.minhash_length.item(position)
            else (),
            normalized=(),
            calls=ints["calls"].between(position, low[0], high[0]),
            called_imports=texts["called_imports"].between(low[3], high[3]),
            strings=texts["strings"].between(low[4], high[4]),
            constants=ints["constants"].between(position, low[1], high[1]),
            name=None,
            source=self.source_names[self.source_codes.item(position)],
            robust_minhash=tuple(self._signature_row("robust_minhash", position))
            if self.robust_length.item(position)
            else (),
            immediates=ints["immediates"].between(position, low[2], high[2]),
        )

    def signature_rows(self, name: str, positions: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
        """Rows ``positions`` of the signature column ``name`` (SIGNATURE_COLUMNS)."""
        file = self.row_files.get(name)
        if file is None:
            column: npt.NDArray[np.uint32] = getattr(self, name)
            return column[positions]
        return file.rows(positions)

    def _signature_row(self, name: str, position: int) -> list[int]:
        file = self.row_files.get(name)
        row = getattr(self, name)[position] if file is None else file.row(position)
        values: list[int] = row.tolist()
        return values

    def locate(
        self, sample_id: int, exact_hash: int, signature: npt.NDArray[np.uint8]
    ) -> FunctionFeatures | None:
        """The sample's function with this exact hash and b-bit signature (the lowest address
        when several agree; any with the hash when none agrees); None when the sample has no
        such function. The same rule as reading the sample's features and searching them."""
        start, stop = self.sample_ranges.get(sample_id, (0, 0))
        position = self._locate_one(start, stop, exact_hash, signature)
        return None if position is None else self.function(position)

    def locate_positions(
        self,
        sample_ids: npt.NDArray[np.int64],
        exact_hashes: npt.NDArray[np.uint64],
        signatures: npt.NDArray[np.uint8],
    ) -> npt.NDArray[np.int64]:
        """``locate`` of many (sample, exact hash, signature) requests at once, as positions
        (-1: the sample has no such function). Re-ranking locates ~1,500 matches per query:
        one binary search per matched sample and one signature comparison over all requests
        replace ~40 µs of numpy calls per request."""
        found = np.full(len(sample_ids), -1, dtype=np.int64)
        starts = np.zeros(len(sample_ids), dtype=np.int64)
        stops = np.zeros(len(sample_ids), dtype=np.int64)
        by_sample = np.argsort(sample_ids, kind="stable")
        distinct, first = np.unique(sample_ids[by_sample], return_index=True)
        groups = np.split(by_sample, first[1:]) if len(by_sample) else []
        for sample_id, wanted in zip(distinct.tolist(), groups, strict=True):
            start, stop = self.sample_ranges.get(sample_id, (0, 0))
            if start == stop:
                continue
            if (
                self._hash_order is None
                or self._sorted_hashes is None
                or self._irregular_in(start, stop)
            ):
                for request in wanted.tolist():
                    position = self._locate_one(
                        start, stop, int(exact_hashes[request]), signatures[request]
                    )
                    found[request] = -1 if position is None else position
                continue
            hashes = self._sorted_hashes[start:stop]
            starts[wanted] = start + np.searchsorted(hashes, exact_hashes[wanted], side="left")
            stops[wanted] = start + np.searchsorted(hashes, exact_hashes[wanted], side="right")
        if self._hash_order is None:
            return found
        # Requests in steps of about LOCATE_CHUNK (request, same-hash function) pairs: a hash
        # shared by thousands of a sample's functions (padding stubs) times hundreds of requests
        # would otherwise gather a ~100 MB signature block at once.
        reach = np.cumsum(stops - starts)
        begin = 0
        while begin < len(sample_ids):
            done = int(reach[begin - 1]) if begin else 0
            end = max(int(np.searchsorted(reach, done + LOCATE_CHUNK, side="right")), begin + 1)
            self._choose_positions(
                found, starts, stops, signatures, np.arange(begin, end, dtype=np.int64)
            )
            begin = end
        return found

    def _choose_positions(
        self,
        found: npt.NDArray[np.int64],
        starts: npt.NDArray[np.int64],
        stops: npt.NDArray[np.int64],
        signatures: npt.NDArray[np.uint8],
        requests: npt.NDArray[np.int64],
    ) -> None:
        """Set ``found`` for ``requests``, whose same-hash functions are the ``_hash_order``
        entries ``starts:stops``: the rule of ``_locate_one`` over all of them at once."""
        assert self._hash_order is not None
        owner, spots, _ = expand_ranges(starts[requests], stops[requests], len(self))
        request, positions = requests[owner], self._hash_order[spots]
        signed = self.minhash_length[positions] > 0
        request, positions = request[signed], positions[signed]
        stored = reduce_signatures(self.signature_rows("minhash", positions))
        equal = (stored == signatures[request]).all(axis=1)
        any_equal = np.zeros(len(found), dtype=bool)
        any_equal[request[equal]] = True
        # Agreeing signatures when a request has any, else every function with the hash; of
        # those the lowest address, then the first position.
        chosen = equal | ~any_equal[request]
        request, positions = request[chosen], positions[chosen]
        order = np.lexsort((positions, self.address[positions], request))
        ordered = request[order]
        leading = order[np.r_[True, ordered[1:] != ordered[:-1]]] if len(order) else order
        found[request[leading]] = positions[leading]

    def _irregular_in(self, start: int, stop: int) -> bool:
        return any(start <= position < stop for position in self.irregular)

    def _locate_one(
        self, start: int, stop: int, exact_hash: int, signature: npt.NDArray[np.uint8]
    ) -> int | None:
        """``locate`` within the sample's positions ``start:stop``, as a position."""
        if start == stop:
            return None
        if self._irregular_in(start, stop):
            functions = [self.function(position) for position in range(start, stop)]
            located = _locate_in(functions, exact_hash, signature)
            if located is None:
                return None
            return start + next(i for i, f in enumerate(functions) if f is located)
        if not 0 <= exact_hash < _UINT64_END:
            return None
        if self._hash_order is None or self._sorted_hashes is None:
            same_hash = start + np.flatnonzero(
                (self.exact_hash[start:stop] == np.uint64(exact_hash))
                & (self.minhash_length[start:stop] > 0)
            )
        else:
            hashes = self._sorted_hashes[start:stop]
            low = int(np.searchsorted(hashes, np.uint64(exact_hash), side="left"))
            high = int(np.searchsorted(hashes, np.uint64(exact_hash), side="right"))
            same_hash = np.sort(self._hash_order[start + low : start + high])
            same_hash = same_hash[self.minhash_length[same_hash] > 0]
        if len(same_hash) == 0:
            return None
        signatures = reduce_signatures(self.signature_rows("minhash", same_hash))
        equal = same_hash[(signatures == signature).all(axis=1)]
        chosen = equal if len(equal) else same_hash
        # Lowest address; the first such row on ties, as ``min`` over the sample's order does.
        return int(chosen[int(np.argmin(self.address[chosen]))])


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
