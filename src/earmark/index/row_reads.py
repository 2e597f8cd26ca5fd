"""Rows of a saved 2-D ``.npy`` column read with ``pread`` instead of through a file mapping.

A query reads a few thousand scattered rows of the feature stage's MinHash columns (256 bytes
each). Through a memory mapping every faulting row brings its neighbours with it: the kernel's
fault-around maps the 16 page-cache pages around it (64 KiB), and ``madvise(MADV_RANDOM)``
does not stop that, so one query left ~17 MiB of the two columns resident in the process
(docs/benchmarks.md, "Query process memory (2)"). ``pread`` copies just the rows asked for into
the result array; the file's pages stay in the page cache, shared and reclaimable, outside the
process. numpy has no gather-from-file (``np.fromfile`` reads one contiguous run), hence this.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from earmark.errors import IndexCacheError

_FORMAT_READERS: Final = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


class RowFile:
    """The rows of one C-ordered 2-D array saved with ``np.save``, read on demand."""

    def __init__(self, path: Path) -> None:
        with path.open("rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
                reader = _FORMAT_READERS.get(version)
                if reader is None:
                    raise IndexCacheError(f"{path}: unsupported .npy version {version}")
                shape, fortran_order, dtype = reader(handle)
            except ValueError as error:  # numpy's answer to a damaged header
                raise IndexCacheError(f"{path}: {error}") from error
            self.offset = handle.tell()
        if fortran_order or len(shape) != 2 or dtype.hasobject:
            raise IndexCacheError(f"{path}: not a C-ordered 2-D array of plain values")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype: np.dtype[Any] = dtype
        self.row_bytes = self.shape[1] * dtype.itemsize
        if os.path.getsize(path) < self.offset + self.shape[0] * self.row_bytes:
            raise IndexCacheError(f"{path}: shorter than its {self.shape} array")
        self._descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._closer = weakref.finalize(self, os.close, self._descriptor)

    def __len__(self) -> int:
        return self.shape[0]

    def close(self) -> None:
        self._closer()

    def row(self, position: int) -> npt.NDArray[Any]:
        """One row (a fresh array). Re-ranking builds one function at a time, so this path
        skips the deduplication of ``rows``: one system call."""
        if not 0 <= position < self.shape[0]:
            raise IndexError(f"row {position} outside 0..{self.shape[0] - 1}")
        data = os.pread(self._descriptor, self.row_bytes, self.offset + position * self.row_bytes)
        if len(data) != self.row_bytes:
            raise IndexCacheError("a feature cache file was cut short while in use")
        return np.frombuffer(data, dtype=self.dtype)

    def rows(self, positions: npt.NDArray[np.integer[Any]]) -> npt.NDArray[Any]:
        """``array[positions]`` for a 1-D integer array: each run of consecutive distinct rows
        is one ``preadv`` straight into the result."""
        wanted = np.asarray(positions, dtype=np.int64)
        if wanted.ndim != 1:
            raise ValueError("rows() takes a 1-D array of positions")
        if len(wanted) == 0:
            return np.empty((0, self.shape[1]), dtype=self.dtype)
        if int(wanted.min()) < 0 or int(wanted.max()) >= self.shape[0]:
            raise IndexError(f"rows outside 0..{self.shape[0] - 1}")
        distinct, inverse = np.unique(wanted, return_inverse=True)
        breaks = np.flatnonzero(np.diff(distinct) != 1) + 1
        run_first = distinct[np.r_[0, breaks]]
        run_length = np.diff(np.r_[0, breaks, len(distinct)])
        block = np.empty((len(distinct), self.shape[1]), dtype=self.dtype)
        target = block.data.cast("B")
        filled = 0
        for first, length in zip(run_first.tolist(), run_length.tolist(), strict=True):
            size = length * self.row_bytes
            got = os.preadv(
                self._descriptor,
                [target[filled : filled + size]],
                self.offset + first * self.row_bytes,
            )
            if got != size:
                raise IndexCacheError("a feature cache file was cut short while in use")
            filled += size
        return block[inverse.reshape(-1)]
