"""Schema migrations: small recorded functions, each applied in its own transaction.

Each migration is a frozen snapshot of the DDL of its day: once released it never changes, and a
later change to the tables is a new migration appended to ``MIGRATIONS`` (with ``schema.py``
updated to the new shape). The ``schema_migrations`` table records which ones ran and when.

Opening a store applies the pending ones in order. A database that records a migration this code
does not know was written by a newer earmark; it is refused with ``StoreError`` rather than
written by code that does not understand its tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection

from earmark.errors import StoreError
from earmark.store import schema

# Execution option read by the SQLite "begin" hook in ``earmark.store.engine``: write transactions
# start with BEGIN IMMEDIATE so two writers queue on the lock instead of both reading under a
# shared lock and then failing to upgrade it (SQLITE_BUSY without waiting).
SQLITE_BEGIN_OPTION = "earmark_sqlite_begin"

# PostgreSQL's counterpart of BEGIN IMMEDIATE: every write transaction (migrations included)
# first takes this transaction-scoped advisory lock, so earmark writers on one database queue
# exactly as they do on SQLite. The store's check-then-insert writes (a sample, a claim, an intel
# report) and two processes migrating a new database at once are then race-free without
# per-statement ON CONFLICT clauses; readers are never blocked (MVCC). The value is arbitrary
# but fixed ("earmark" in ASCII): advisory locks are per database, so it only has to differ from
# other applications' keys on the same database.
POSTGRES_WRITE_LOCK_KEY = 0x6561726D61726B


def _is_postgres(connection: Connection) -> bool:
    return connection.dialect.name == "postgresql"


@contextmanager
def begin_write(engine: Engine) -> Iterator[Connection]:
    """One write transaction: committed when the block ends, rolled back if it raises.

    Writers are serialised: SQLite by BEGIN IMMEDIATE, PostgreSQL by an advisory lock taken as
    the transaction's first statement (READ COMMITTED, so the writer then sees every commit made
    before it got the lock).
    """
    with engine.connect() as connection:
        connection = connection.execution_options(**{SQLITE_BEGIN_OPTION: "BEGIN IMMEDIATE"})
        with connection.begin():
            if _is_postgres(connection):
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": POSTGRES_WRITE_LOCK_KEY}
                )
            yield connection


@dataclass(frozen=True, slots=True)
class Migration:
    id: int
    name: str
    apply: Callable[[Connection], None]


def _create_core_tables(connection: Connection) -> None:
    """Version 1: samples, their functions and labels, and the revision counter."""
    snapshot = MetaData()
    Table(
        "kb_revision",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("revision", BigInteger, nullable=False),
    )
    Table(
        "samples",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("sha256", String(64), nullable=False, unique=True),
        Column("sha1", String(40), nullable=False),
        Column("md5", String(32), nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("format", String(16), nullable=False),
        Column("arch", String(16), nullable=False),
        Column("bits", Integer, nullable=False),
        Column("imphash", String(64), nullable=True),
        Column("tlsh", String(80), nullable=True),
        Column("pdb_path", Text, nullable=True),
        Column("rich_header", Text, nullable=True),
        Column("function_count", Integer, nullable=False),
        Column("features_format_version", String(16), nullable=False),
        Column("analyzer_version", String(64), nullable=False),
        Column("features", LargeBinary, nullable=False),
        Column("source", Text, nullable=False),
        Column("first_seen", DateTime(timezone=True), nullable=False),
        Column("tlp", String(16), nullable=False),
    )
    Table(
        "labels",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("sample_id", Integer, ForeignKey("samples.id", ondelete="CASCADE"), nullable=False),
        Column("actor", Text, nullable=True),
        Column("family", Text, nullable=True),
        Column("goodware", Boolean, nullable=False),
        Column("source", Text, nullable=False),
        Column("recorded_at", DateTime(timezone=True), nullable=False),
        Column("tlp", String(16), nullable=False),
        Index("ix_labels_sample_id", "sample_id"),
    )
    Table(
        "functions",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("sample_id", Integer, ForeignKey("samples.id", ondelete="CASCADE"), nullable=False),
        Column("address", BigInteger, nullable=False),
        Column("size", Integer, nullable=False),
        Column("instruction_count", Integer, nullable=False),
        Column("block_count", Integer, nullable=False),
        Column("exact_hash", BigInteger, nullable=False),
        Column("minhash", LargeBinary, nullable=False),
        Index("ix_functions_exact_hash", "exact_hash"),
        Index("ix_functions_sample_id", "sample_id"),
    )
    snapshot.create_all(connection)
    connection.execute(insert(snapshot.tables["kb_revision"]).values(id=1, revision=0))


def _index_labels_by_name(connection: Connection) -> None:
    """Version 2: find an actor's or family's samples without scanning every label."""
    snapshot = MetaData()
    labels = Table("labels", snapshot, autoload_with=connection)
    Index("ix_labels_actor", labels.c.actor).create(connection)
    Index("ix_labels_family", labels.c.family).create(connection)


def _create_intel_tables(connection: Connection) -> None:
    """Version 3: intel reports, their names, indicators and relations, actor profiles with
    aliases, the indicators found in samples, and a revision counter of its own for intel."""
    snapshot = MetaData()
    Table("samples", snapshot, autoload_with=connection)  # target of sample_indicators' key

    def report_row() -> Column[int]:
        return Column(
            "report_row",
            Integer,
            ForeignKey("intel_reports.id", ondelete="CASCADE"),
            nullable=False,
        )

    Table(
        "intel_revision",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("revision", BigInteger, nullable=False),
    )
    Table(
        "intel_reports",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("report_id", String(128), nullable=False, unique=True),
        Column("source", Text, nullable=False),
        Column("title", Text, nullable=False),
        Column("reference", Text, nullable=True),
        Column("published", Date, nullable=True),
        Column("tlp", String(16), nullable=False),
        Column("content_hash", String(64), nullable=False),
        Column("imported_at", DateTime(timezone=True), nullable=False),
    )
    Table(
        "intel_report_names",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        report_row(),
        Column("kind", String(16), nullable=False),
        Column("name", Text, nullable=False),
        Column("position", Integer, nullable=False),
        Index("ix_intel_report_names_report_row", "report_row"),
        Index("ix_intel_report_names_name", "name"),
    )
    Table(
        "intel_indicators",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        report_row(),
        Column("type", String(16), nullable=False),
        Column("value", Text, nullable=False),
        Index("ix_intel_indicators_report_row", "report_row"),
        Index("ix_intel_indicators_value", "value"),
    )
    Table(
        "intel_actors",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", Text, nullable=False),
        Column("source", Text, nullable=False),
        Column("external_ids", Text, nullable=False),
        UniqueConstraint("name", "source", name="uq_intel_actors_name_source"),
    )
    Table(
        "intel_actor_aliases",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column(
            "actor_row", Integer, ForeignKey("intel_actors.id", ondelete="CASCADE"), nullable=False
        ),
        Column("alias", Text, nullable=False),
        Column("alias_folded", Text, nullable=False),
        Index("ix_intel_actor_aliases_actor_row", "actor_row"),
        Index("ix_intel_actor_aliases_alias_folded", "alias_folded"),
    )
    Table(
        "intel_relations",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        report_row(),
        Column("source_name", Text, nullable=False),
        Column("source_type", String(32), nullable=False),
        Column("relation", String(64), nullable=False),
        Column("target_name", Text, nullable=False),
        Column("target_type", String(32), nullable=False),
        Index("ix_intel_relations_report_row", "report_row"),
        Index("ix_intel_relations_source_name", "source_name"),
        Index("ix_intel_relations_target_name", "target_name"),
    )
    Table(
        "sample_indicators",
        snapshot,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("sample_id", Integer, ForeignKey("samples.id", ondelete="CASCADE"), nullable=False),
        Column("type", String(16), nullable=False),
        Column("value", Text, nullable=False),
        Column("file_offset", BigInteger, nullable=True),
        Index("ix_sample_indicators_sample_id", "sample_id"),
        Index("ix_sample_indicators_value", "value"),
    )
    new_tables = [t for name, t in snapshot.tables.items() if name != "samples"]
    snapshot.create_all(connection, tables=new_tables)
    connection.execute(insert(snapshot.tables["intel_revision"]).values(id=1, revision=0))


def _widen_function_ids(connection: Connection) -> None:
    """Version 4: 64-bit function ids on PostgreSQL, where migration 1 made them SERIAL (int4,
    at most 2,147,483,647 rows, near the 1-billion-function design target). SQLite's INTEGER
    PRIMARY KEY is already 64-bit, so there this migration changes nothing."""
    if not _is_postgres(connection):
        return
    connection.execute(text("ALTER TABLE functions ALTER COLUMN id TYPE BIGINT"))
    connection.execute(text("ALTER SEQUENCE IF EXISTS functions_id_seq AS BIGINT"))


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "create samples, functions, labels and the revision counter", _create_core_tables),
    Migration(2, "index labels by actor and family", _index_labels_by_name),
    Migration(3, "create intel reports, indicators, actors, relations, sample indicators",
              _create_intel_tables),
    Migration(4, "64-bit function ids on PostgreSQL", _widen_function_ids),
)


def schema_version(migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """The schema version this code writes: the id of its last migration."""
    return max(m.id for m in migrations)


def _applied_ids(connection: Connection) -> set[int]:
    return set(connection.scalars(select(schema.schema_migrations.c.id)))


def apply_migrations(engine: Engine, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Bring the database up to date; returns the ids applied now (empty when already current).

    ``engine`` must come from ``earmark.store.engine.connect_database``: on SQLite its BEGIN hook
    is what makes a migration's DDL part of its transaction. Raises ``StoreError`` when the
    database was written by a newer earmark.
    """
    if not inspect(engine).has_table(schema.schema_migrations.name):
        with begin_write(engine) as connection:
            # checkfirst again under the write lock: another process may have created it.
            schema.schema_migrations.create(connection, checkfirst=True)
    known = {m.id for m in migrations}
    with engine.connect() as connection:
        applied = _applied_ids(connection)
    unknown = sorted(applied - known)
    if unknown:
        raise StoreError(
            f"the knowledge base has schema version {max(applied)} (migrations {unknown} are "
            "unknown here) but this earmark only knows up to version "
            f"{schema_version(migrations)}; upgrade earmark to open it"
        )
    newly_applied: list[int] = []
    for migration in sorted(migrations, key=lambda m: m.id):
        if migration.id in applied:
            continue
        with begin_write(engine) as connection:
            # Another process may have applied it since we looked; the write lock is ours now.
            if migration.id in _applied_ids(connection):
                continue
            migration.apply(connection)
            connection.execute(
                insert(schema.schema_migrations).values(
                    id=migration.id, name=migration.name, applied_at=datetime.now(UTC)
                )
            )
        newly_applied.append(migration.id)
    return newly_applied
