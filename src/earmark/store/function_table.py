"""Bulk reads of the functions table as numpy columns (``SqlStore.load_function_table`` and
``load_function_ids``): through the driver's own cursor, in chunks, in the caller's snapshot."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from earmark.errors import StoreError
from earmark.model.kb import FunctionTable
from earmark.model.sample import MINHASH_PERMUTATIONS
from earmark.store import schema
from earmark.store.rows import MINHASH_BLOB_BYTES

__all__ = [
    "FUNCTION_TABLE_CURSOR",
    "FUNCTION_TABLE_FETCH_ROWS",
    "read_function_ids",
    "read_function_table",
]

# Rows fetched per round trip by load_function_table: each row is ~600 B of Python objects
# (tuple, ints, a 256-byte MinHash bytes). PE bench (a+c) KB, 47.3k functions, peak over the
# RSS before the read: 61 MB at 65,536 rows (one chunk held the whole table as objects), 24 MB
# at 4,096, 17 MB at 1,024 (the arrays themselves are 14 MB), with CPU 0.09 -> 0.05 s (the
# chunk stays in the CPU caches); a PostgreSQL round trip then still carries ~300 KB.
FUNCTION_TABLE_FETCH_ROWS = 1_024
# Name of the PostgreSQL server-side cursor load_function_table reads through (unique within
# its transaction, which is all a cursor name must be).
FUNCTION_TABLE_CURSOR = "earmark_function_table"


def _bulk_read_cursor(connection: Connection) -> Any:
    """The driver's own cursor, inside the connection's open transaction.

    SQLAlchemy's Row objects cost ~2x on a bulk read (measured in docs/store.md) and all values
    here are plain. On PostgreSQL the cursor is a named (server-side) one in binary format: the
    server keeps the result and ``fetchmany`` brings one chunk per round trip, where a client
    cursor would hold the whole table in the driver first; binary skips the hex text form of
    the MinHash blobs.
    """
    dbapi_connection: Any = connection.connection.dbapi_connection
    if connection.dialect.name == "postgresql":
        return dbapi_connection.cursor(FUNCTION_TABLE_CURSOR, binary=True)
    return dbapi_connection.cursor()


def read_function_ids(
    connection: Connection,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
    """(function_id, sample_id, address) of every function, ordered by function id; read
    in ``FUNCTION_TABLE_FETCH_ROWS`` chunks like the whole table (PE bench (a)+(c) KB,
    47.3k functions: ~0.02 against ~0.05 s for ``read_function_table``)."""
    columns = schema.functions.c
    query = select(columns.id, columns.sample_id, columns.address).order_by(columns.id)
    chunks: list[npt.NDArray[np.int64]] = []
    cursor = _bulk_read_cursor(connection)
    cursor.execute(str(query.compile(dialect=connection.dialect)))
    while chunk := cursor.fetchmany(FUNCTION_TABLE_FETCH_ROWS):
        chunks.append(np.array(chunk, dtype=np.int64).reshape(len(chunk), 3))
    cursor.close()
    rows = np.concatenate(chunks) if chunks else np.zeros((0, 3), dtype=np.int64)
    function_id, sample_id = rows[:, 0].copy(), rows[:, 1].copy()
    address = rows[:, 2].copy().view(np.uint64)  # stored as the int64 of the same bits
    for array in (function_id, sample_id, address):
        array.setflags(write=False)
    return function_id, sample_id, address


def read_function_table(connection: Connection) -> FunctionTable:
    """All functions as numpy arrays, ordered by function id; the arrays are read-only.
    ``connection`` reads one snapshot (its count and rows must agree)."""
    columns = schema.functions.c
    query = select(
        columns.id,
        columns.sample_id,
        columns.address,
        columns.size,
        columns.instruction_count,
        columns.exact_hash,
        columns.minhash,
    ).order_by(columns.id)
    expected = int(connection.scalar(select(func.count()).select_from(schema.functions)) or 0)
    function_id = np.empty(expected, dtype=np.int64)
    sample_id = np.empty(expected, dtype=np.int64)
    address = np.empty(expected, dtype=np.int64)
    size = np.empty(expected, dtype=np.uint32)
    instruction_count = np.empty(expected, dtype=np.uint32)
    exact_hash = np.empty(expected, dtype=np.int64)
    minhash = np.empty((expected, MINHASH_PERMUTATIONS), dtype=np.uint32)
    filled = 0
    cursor = _bulk_read_cursor(connection)
    cursor.execute(str(query.compile(dialect=connection.dialect)))
    while chunk := cursor.fetchmany(FUNCTION_TABLE_FETCH_ROWS):
        end = min(filled + len(chunk), expected)
        taken = chunk[: end - filled]
        if not taken:
            break
        ids, samples, addresses, sizes, counts, hashes, blobs = zip(*taken, strict=True)
        function_id[filled:end] = ids
        sample_id[filled:end] = samples
        address[filled:end] = addresses
        size[filled:end] = sizes
        instruction_count[filled:end] = counts
        exact_hash[filled:end] = hashes
        signatures = b"".join(blobs)
        if len(signatures) != len(taken) * MINHASH_BLOB_BYTES:
            raise StoreError("knowledge base damaged: a MinHash blob has a wrong size")
        minhash[filled:end] = np.frombuffer(signatures, dtype="<u4").reshape(
            len(taken), MINHASH_PERMUTATIONS
        )
        filled = end
    cursor.close()
    arrays = (function_id, sample_id, address, size, instruction_count, exact_hash, minhash)
    for array in arrays:
        array.setflags(write=False)
    return FunctionTable(
        function_id=function_id[:filled],
        sample_id=sample_id[:filled],
        address=address[:filled].view(np.uint64),
        size=size[:filled],
        instruction_count=instruction_count[:filled],
        exact_hash=exact_hash[:filled].view(np.uint64),
        minhash=minhash[:filled],
    )
