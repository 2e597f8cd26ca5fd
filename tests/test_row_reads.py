"""Rows of saved 2-D arrays read with pread: the same values as indexing the array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.errors import IndexCacheError
from earmark.index.row_reads import RowFile


def _saved(tmp_path: Path, array: np.ndarray, name: str = "column.npy") -> Path:
    path = tmp_path / name
    np.save(path, array, allow_pickle=False)
    return path


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=300),
    picks=st.lists(st.integers(min_value=0, max_value=10**6), max_size=200),
)
def test_rows_equal_fancy_indexing(
    tmp_path_factory: pytest.TempPathFactory, rows: int, picks: list[int]
) -> None:
    array = np.random.default_rng(rows).integers(0, 1 << 32, size=(rows, 64), dtype=np.uint32)
    rows_file = RowFile(_saved(tmp_path_factory.mktemp("rows"), array))
    positions = np.array([pick % rows for pick in picks], dtype=np.int64)  # repeats, any order
    assert np.array_equal(rows_file.rows(positions), array[positions])
    assert rows_file.rows(positions).shape == (len(positions), 64)
    for position in positions[:10].tolist():
        assert rows_file.row(position).tolist() == array[position].tolist()


def test_header_versions_and_dtypes(tmp_path: Path) -> None:
    array = np.arange(7 * 3, dtype=np.int64).reshape(7, 3)
    path = tmp_path / "v2.npy"
    with path.open("wb") as handle:
        np.lib.format.write_array(handle, array, version=(2, 0))
    rows_file = RowFile(path)
    assert len(rows_file) == 7 and rows_file.dtype == np.int64
    assert rows_file.rows(np.array([6, 0, 6])).tolist() == array[[6, 0, 6]].tolist()


def test_out_of_range_rows_raise(tmp_path: Path) -> None:
    rows_file = RowFile(_saved(tmp_path, np.zeros((4, 2), dtype=np.uint32)))
    with pytest.raises(IndexError):
        rows_file.rows(np.array([0, 4]))
    with pytest.raises(IndexError):
        rows_file.rows(np.array([-1]))
    with pytest.raises(IndexError):
        rows_file.row(4)
    assert rows_file.rows(np.zeros(0, dtype=np.int64)).shape == (0, 2)


def test_damaged_files_are_typed_errors(tmp_path: Path) -> None:
    path = _saved(tmp_path, np.ones((50, 8), dtype=np.uint32))
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # cut short
    with pytest.raises(IndexCacheError):
        RowFile(path)
    with pytest.raises(IndexCacheError):
        RowFile(_saved(tmp_path, np.ones(5, dtype=np.uint32), "flat.npy"))
    with pytest.raises(IndexCacheError):
        RowFile(_saved(tmp_path, np.ones((5, 2), dtype=np.uint32, order="F"), "fortran.npy"))
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(IndexCacheError):
        RowFile(tmp_path / "junk.npy")


def test_file_shrunk_while_open_is_a_typed_error(tmp_path: Path) -> None:
    path = _saved(tmp_path, np.ones((50, 8), dtype=np.uint32))
    rows_file = RowFile(path)
    with path.open("r+b") as handle:
        handle.truncate(200)
    with pytest.raises(IndexCacheError):
        rows_file.rows(np.array([49]))
    with pytest.raises(IndexCacheError):
        rows_file.row(49)
    rows_file.close()
    rows_file.close()  # closing twice is harmless
