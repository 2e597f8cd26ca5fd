"""Non-negative integers stored in the fewest whole bytes that hold the largest of them.

Row permutations, function ids, sample positions and rarity groups are per-function columns
whose values are bounded by a count (rows, samples, clusters), so a fixed 4- or 8-byte dtype
wastes a quarter to five eighths of them: a permutation of 10^7 rows needs 3 bytes per entry,
not 4, and that alone is 15 B per function over the 15 band permutations (docs/index.md,
"Memory per indexed function"). numpy has no 3-, 5-, 6- or 7-byte integer dtype, so a column
is a (count, width) uint8 matrix, little-endian, widened to int64 only for the entries read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, overload

import numpy as np
import numpy.typing as npt

# Entries widened per step when a whole column is scanned (``maximum``, ``unpack``), so a scan
# of 10^7 entries needs 8 MB of temporaries rather than 80 MB.
SCAN_CHUNK: Final = 1 << 20

Int64Array = npt.NDArray[np.int64]


def byte_width(largest: int) -> int:
    """Bytes needed for values 0..largest (at least one)."""
    if largest < 0:
        raise ValueError(f"packed integers must be non-negative, got {largest}")
    return max(1, (int(largest).bit_length() + 7) // 8)


def _widen(raw: npt.NDArray[np.uint8]) -> Int64Array:
    """(k, width) little-endian bytes -> (k,) int64."""
    count, width = raw.shape
    padded_width = 4 if width <= 4 else 8
    padded = np.zeros((count, padded_width), dtype=np.uint8)
    padded[:, :width] = raw
    if padded_width == 4:
        return padded.view("<u4").reshape(count).astype(np.int64)
    return padded.view("<i8").reshape(count).copy()


# numpy dtypes whose items are exactly 1, 2, 4 or 8 little-endian bytes (as ``_widen`` reads them).
_NATIVE_DTYPES: Final = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<i8"}


@dataclass(frozen=True)
class PackedUInts:
    """A column of non-negative integers, ``width`` bytes each (``data`` is (count, width))."""

    data: npt.NDArray[np.uint8]
    # For widths numpy has a dtype for (1, 2, 4, 8 bytes) and contiguous data: the column as
    # that dtype, a view without a copy, so reading entries is one gather instead of
    # ``_widen``'s padded copy (index look-ups read entries ~250 times per query).
    _native: npt.NDArray[Any] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        native = None
        dtype = _NATIVE_DTYPES.get(int(self.data.shape[1])) if self.data.ndim == 2 else None
        if dtype is not None and self.data.flags.c_contiguous:
            native = self.data.view(dtype).reshape(-1)
        object.__setattr__(self, "_native", native)

    @classmethod
    def pack(cls, values: npt.ArrayLike, width: int | None = None) -> PackedUInts:
        """Pack ``values`` (1-D) in ``width`` bytes, by default the fewest that hold the max."""
        array = np.asarray(values)
        if array.ndim != 1:
            raise ValueError(f"expected a 1-D column, got shape {array.shape}")
        if len(array) and int(array.min()) < 0:
            raise ValueError("packed integers must be non-negative")
        largest = int(array.max()) if len(array) else 0
        chosen = byte_width(largest) if width is None else width
        if chosen < byte_width(largest) or chosen > 8:
            raise ValueError(f"{largest} does not fit in {chosen} bytes")
        as_bytes = np.ascontiguousarray(array.astype("<u8")).view(np.uint8).reshape(-1, 8)
        return cls(np.ascontiguousarray(as_bytes[:, :chosen]))

    @property
    def width(self) -> int:
        return int(self.data.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @overload
    def __getitem__(self, index: int | np.integer[Any]) -> int: ...

    @overload
    def __getitem__(self, index: npt.NDArray[np.integer[Any]] | slice) -> Int64Array: ...

    def __getitem__(
        self, index: int | np.integer[Any] | npt.NDArray[np.integer[Any]] | slice
    ) -> int | Int64Array:
        if isinstance(index, int | np.integer):
            if self._native is not None:
                return int(self._native[int(index)])
            return int(_widen(self.data[int(index)].reshape(1, -1))[0])
        if self._native is not None:
            values: Int64Array = self._native[index].reshape(-1).astype(np.int64)
            return values
        return _widen(self.data[index].reshape(-1, self.width))

    def unpack(self) -> Int64Array:
        """The whole column as int64 (widened in chunks of SCAN_CHUNK entries)."""
        result = np.empty(len(self), dtype=np.int64)
        for start in range(0, len(self), SCAN_CHUNK):
            result[start : start + SCAN_CHUNK] = self[start : start + SCAN_CHUNK]
        return result

    def maximum(self) -> int:
        """Largest value, -1 for an empty column."""
        largest = -1
        for start in range(0, len(self), SCAN_CHUNK):
            largest = max(largest, int(self[start : start + SCAN_CHUNK].max()))
        return largest

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Int64Array:
        unpacked = self.unpack()
        return unpacked if dtype is None else unpacked.astype(dtype)

    def tolist(self) -> list[int]:
        values: list[int] = self.unpack().tolist()
        return values


@dataclass(frozen=True)
class PackedColumns:
    """Several equally long packed columns of one width (``data`` is (columns, count, width))."""

    data: npt.NDArray[np.uint8]

    @classmethod
    def pack(cls, columns: list[npt.NDArray[np.integer[Any]]], width: int) -> PackedColumns:
        count = len(columns[0]) if columns else 0
        data = np.empty((len(columns), count, width), dtype=np.uint8)
        for position, column in enumerate(columns):
            data[position] = PackedUInts.pack(column, width).data
        return cls(data)

    @property
    def width(self) -> int:
        return int(self.data.shape[2])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def column(self, position: int) -> PackedUInts:
        return PackedUInts(self.data[position])


def narrowest_unsigned(
    values: npt.NDArray[np.integer[Any]],
) -> npt.NDArray[np.unsignedinteger[Any]]:
    """``values`` (non-negative) in the smallest of uint8/16/32/64 that holds them."""
    largest = int(values.max()) if len(values) else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.uint64)


def narrowest_signed(values: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.signedinteger[Any]]:
    """``values`` (>= -1, -1 meaning none) in the smallest of int8/16/32/64 that holds them."""
    largest = int(values.max()) if values.size else 0
    for dtype in (np.int8, np.int16, np.int32):
        if largest <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.int64)
