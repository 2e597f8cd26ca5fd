"""Connecting to the knowledge base's database: the path or URL it is named by, and an engine
with earmark's connection settings (SQLite's pragmas and BEGIN hook, PostgreSQL's pre-ping),
and driver failures as ``StoreError``. Kept apart from ``earmark.store.sql`` (the queries)."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError, NoSuchModuleError
from sqlalchemy.pool import StaticPool

from earmark.errors import StoreError
from earmark.store.migrations import SQLITE_BEGIN_OPTION

__all__ = [
    "DATABASE_ENV_VAR",
    "DEFAULT_DATABASE_PATH",
    "POSTGRES_EXTRA",
    "SQLITE_BUSY_TIMEOUT_SECONDS",
    "connect_database",
    "database_errors",
    "resolve_database_url",
]

# Environment variable naming the knowledge base when no path or URL is given (DESIGN.md §1).
DATABASE_ENV_VAR = "EARMARK_DB"
# The knowledge base used when neither an argument nor EARMARK_DB names one.
DEFAULT_DATABASE_PATH = "earmark.db"
# How long a SQLite writer waits for another process's write transaction before failing. One
# sample's write takes milliseconds; 30 s covers a parallel ingest writing a 50k-function sample.
SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
# The extra that installs the PostgreSQL driver, named in the error when it is missing.
POSTGRES_EXTRA = "earmark[postgres]"


def resolve_database_url(url_or_path: str | None) -> URL:
    """None → $EARMARK_DB → ./earmark.db; a plain path → sqlite:///path; a URL as it is."""
    target = url_or_path or os.environ.get(DATABASE_ENV_VAR) or DEFAULT_DATABASE_PATH
    if target == ":memory:":
        return make_url("sqlite://")
    if "://" not in target:
        return URL.create("sqlite", database=str(Path(target).expanduser()))
    try:
        return make_url(target)
    except ArgumentError as error:
        raise StoreError(f"not a database path or URL: {target!r} ({error})") from error


def _enable_wal(cursor: Any) -> None:
    """Switch a database file to WAL once (the mode is stored in the file).

    Changing the journal mode needs the database to itself, and SQLite answers "database is
    locked" at once, without its busy handler, while another connection is inside a
    transaction: several processes opening a new knowledge base together hit that. So the mode
    is only set when it is not WAL yet, and a locked attempt is retried until the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    delay = 0.01
    while True:
        row = cursor.execute("PRAGMA journal_mode").fetchone()
        if row is not None and str(row[0]).lower() in ("wal", "memory"):
            return  # already WAL, or an in-memory database (which has no WAL)
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # Take transactions out of the sqlite3 module's hands (it would not BEGIN before DDL, so a
    # migration would not be atomic); the "begin" hook below issues BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL: readers (the index) never block the ingest writer, and a killed writer leaves
        # only uncommitted frames that the next open discards.
        _enable_wal(cursor)
        # NORMAL is crash-safe in WAL mode (a power cut may lose the last commits, never
        # corrupts) and avoids an fsync per sample.
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    connection.exec_driver_sql(connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "BEGIN"))


def connect_database(url: URL) -> Engine:
    """An engine with earmark's connection settings (SQLite: pragmas, transactional DDL)."""
    shown = url.render_as_string(hide_password=True)
    try:
        if url.get_backend_name() != "sqlite":
            # pre-ping: a pooled connection the server dropped (restart, idle timeout) is
            # replaced instead of failing the next write of a long-running `earmark serve`.
            return create_engine(url, pool_pre_ping=True)
        connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}
        if url.database in (None, "", ":memory:"):
            # One shared connection, or every checkout would see a new empty database.
            connect_args["check_same_thread"] = False
            engine = create_engine(url, connect_args=connect_args, poolclass=StaticPool)
        else:
            parent = Path(url.database).parent
            if not parent.is_dir():
                raise StoreError(f"cannot create knowledge base {shown}: no directory {parent}")
            engine = create_engine(url, connect_args=connect_args)
    except (ArgumentError, NoSuchModuleError) as error:
        raise StoreError(f"cannot use database URL {shown}: {error}") from error
    except ImportError as error:  # the dialect is known but its driver is not installed
        postgres = url.get_backend_name() == "postgresql"
        hint = f" (pip install '{POSTGRES_EXTRA}')" if postgres else ""
        raise StoreError(f"cannot use database URL {shown}: no driver: {error}{hint}") from error
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


@contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Turn driver failures (locked, corrupt, unreachable database) into ``StoreError``."""
    try:
        yield
    except IntegrityError:
        raise  # a constraint we did not expect to break is a bug, not a user error
    except DatabaseError as error:
        raise StoreError(f"knowledge base: cannot {action}: {error.orig}") from error
