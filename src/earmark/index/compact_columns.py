"""Per-row reference tuples flattened into numpy columns (``CompactFunctions``' calls,
constants, immediates, called imports and strings), and their builders.

A row's values are a slice of one value array between two offsets, so a column is three or
four arrays that ``index.feature_cache`` saves as ``.npy`` files and maps back, and a row is
rebuilt as a tuple only when it is read.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, islice
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = [
    "IntColumn",
    "IntColumnBuilder",
    "TextColumn",
    "TextColumnBuilder",
    "column_of",
    "extend_column",
]

_UINT64_END: Final = 1 << 64
_INT64_END: Final = 1 << 63
# Integers are stored as value mod 2**64 plus a sign flag (calls are addresses; constants and
# immediates may be negative).
_UINT64_MASK: Final = (1 << 64) - 1

_Column = TypeVar("_Column", bound=np.generic)


def column_of(values: array[int], dtype: type[_Column]) -> npt.NDArray[_Column]:
    """A numpy column over an ``array.array`` (its C item size varies by platform)."""
    kind = "i" if values.typecode.islower() else "u"
    raw = np.frombuffer(values, dtype=f"{kind}{values.itemsize}") if len(values) else None
    if raw is None:
        return np.zeros(0, dtype=dtype)
    # No copy when the type already fits: the numpy column then shares the buffer's memory.
    return raw.astype(dtype, copy=False)


def extend_column(buffer: array[int], values: npt.NDArray[np.generic]) -> None:
    """Append a numpy array's values (in range for ``buffer``) to an ``array.array``: one
    copy of a whole sample's rows instead of an ``extend`` from Python ints per function."""
    kind = "i" if buffer.typecode.islower() else "u"
    buffer.frombytes(values.astype(f"{kind}{buffer.itemsize}", copy=False).tobytes())


@dataclass(frozen=True)
class IntColumn:
    """Per-row integer tuples: row i is ``values[offsets[i]:offsets[i+1]]`` (minus 2**64
    where ``negative``)."""

    values: npt.NDArray[np.uint64]
    negative: npt.NDArray[np.bool_]
    offsets: npt.NDArray[np.int64]  # rows + 1
    # Rows holding a negative value (few: most references are addresses and small constants),
    # so the common row is one slice and one ``tolist``.
    negative_rows: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        flagged = np.flatnonzero(self.negative)
        rows = np.searchsorted(self.offsets, flagged, side="right") - 1
        object.__setattr__(self, "negative_rows", frozenset(rows.tolist()))

    def row(self, position: int) -> tuple[int, ...]:
        start, stop = self.offsets[position : position + 2].tolist()
        return self.between(position, start, stop)

    def between(self, position: int, start: int, stop: int) -> tuple[int, ...]:
        """Row ``position``, whose values are ``start:stop`` (from ``offsets``)."""
        if start == stop:
            return ()
        values = self.values[start:stop].tolist()
        if position not in self.negative_rows:
            return tuple(values)
        return tuple(
            value - _UINT64_END if sign else value
            for value, sign in zip(values, self.negative[start:stop].tolist(), strict=True)
        )


@dataclass(frozen=True)
class TextColumn:
    """Per-row string tuples over a vocabulary of distinct texts: distinct text k is
    ``blob[starts[k]:starts[k+1]]`` (UTF-8, lone surrogates passed through), row i holds the
    texts ``ids[offsets[i]:offsets[i+1]]``. Import names and strings repeat across functions
    and versions, so each distinct text is decoded once per process, on first use."""

    blob: npt.NDArray[np.uint8]
    starts: npt.NDArray[np.int64]  # distinct texts + 1
    ids: npt.NDArray[np.int64]  # one per text occurrence
    offsets: npt.NDArray[np.int64]  # rows + 1
    decoded: dict[int, str] = field(default_factory=dict, repr=False, compare=False)

    def row(self, position: int) -> tuple[str, ...]:
        first, last = self.offsets[position : position + 2].tolist()
        return self.between(first, last)

    def between(self, first: int, last: int) -> tuple[str, ...]:
        """The texts ``first:last`` (a row's range, from ``offsets``)."""
        if first == last:
            return ()
        return tuple(self.text(k) for k in self.ids[first:last].tolist())

    def text(self, k: int) -> str:
        found = self.decoded.get(k)
        if found is None:
            start, stop = self.starts[k : k + 2].tolist()
            found = self.blob[start:stop].tobytes().decode("utf-8", "surrogatepass")
            self.decoded[k] = found
        return found


class IntColumnBuilder:
    """Rows of integers appended one at a time into ``array.array`` buffers."""

    def __init__(self) -> None:
        self.values = array("Q")
        self.negative = array("B")
        self.offsets = array("q", [0])

    def add(self, values: tuple[int, ...]) -> None:
        self.values.extend(value & _UINT64_MASK for value in values)
        self.negative.extend(value < 0 for value in values)
        self.offsets.append(len(self.values))

    def add_rows(self, values: list[int], counts: Sequence[int]) -> None:
        """Rows of ``counts`` values each, ``values`` end to end (each in
        ``-2**64 < value < 2**64``): what ``add`` of each row gives, converted by numpy in
        one call when the values fit int64 or uint64 (always, for extracted features)."""
        if values:
            low, high = min(values), max(values)
            if low >= 0:
                extend_column(self.values, np.array(values, dtype=np.uint64))
                self.negative.frombytes(bytes(len(values)))
            elif high < _INT64_END and low >= -_INT64_END:
                signed = np.array(values, dtype=np.int64)
                # Two's complement: the uint64 view of a negative int64 is value + 2**64.
                extend_column(self.values, signed.view(np.uint64))
                extend_column(self.negative, (signed < 0).view(np.uint8))
            else:
                self.values.extend(value & _UINT64_MASK for value in values)
                self.negative.extend(value < 0 for value in values)
        self.offsets.extend(islice(accumulate(counts, initial=self.offsets[-1]), 1, None))

    def finish(self) -> IntColumn:
        return IntColumn(
            column_of(self.values, np.uint64),
            column_of(self.negative, np.uint8).astype(np.bool_),
            column_of(self.offsets, np.int64),
        )


class TextColumnBuilder:
    """Rows of texts appended one at a time; each distinct text stored once."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.starts = array("q", [0])
        self.known: dict[str, int] = {}
        self.ids = array("q")
        self.offsets = array("q", [0])

    def add(self, texts: tuple[str, ...]) -> None:
        for text in texts:
            k = self.known.get(text)
            if k is None:
                k = self.known[text] = len(self.known)
                self.blob += text.encode("utf-8", "surrogatepass")
                self.starts.append(len(self.blob))
            self.ids.append(k)
        self.offsets.append(len(self.ids))

    def add_rows(self, texts: list[str], counts: Sequence[int]) -> None:
        """Rows of ``counts`` texts each, ``texts`` end to end: what ``add`` of each row
        gives (new texts numbered in order of first appearance)."""
        known = self.known
        for text in texts:
            if text not in known:
                known[text] = len(known)
                self.blob += text.encode("utf-8", "surrogatepass")
                self.starts.append(len(self.blob))
        self.ids.extend(map(known.__getitem__, texts))
        self.offsets.extend(islice(accumulate(counts, initial=self.offsets[-1]), 1, None))

    def finish(self) -> TextColumn:
        return TextColumn(
            np.frombuffer(bytes(self.blob), dtype=np.uint8).copy(),
            column_of(self.starts, np.int64),
            column_of(self.ids, np.int64),
            column_of(self.offsets, np.int64),
        )
