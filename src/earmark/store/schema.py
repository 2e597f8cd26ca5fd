"""The current shape of the knowledge-base tables, as SQLAlchemy Core metadata.

Queries in ``earmark.store.sql`` are built from these tables. The tables are *created* by the
recorded migrations in ``earmark.store.migrations`` (each a frozen snapshot of the DDL of its day);
``tests/test_store.py`` checks that the migrated database and this description agree, so the two
cannot drift apart unnoticed.

Labels are kept denormalised (actor and family names on each label row) rather than in actor and
family tables: aliases and actor profiles belong to ``earmark.intel``, and a label is a claim made
by one source at one time, which must survive even if two actors are later merged.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# One row per applied migration; the highest id is the schema version of the database.
schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", String(200), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

# A single row whose counter goes up in the same transaction as every sample or label change;
# readers (the index) cache on it, and it works across processes because it lives in the DB.
kb_revision = Table(
    "kb_revision",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("revision", BigInteger, nullable=False),
)

samples = Table(
    "samples",
    metadata,
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
    # JSON text: {"key": int, "checksum_valid": bool, "entries": [[product_id, build, count]]}
    Column("rich_header", Text, nullable=True),
    Column("function_count", Integer, nullable=False),
    Column("features_format_version", String(16), nullable=False),
    Column("analyzer_version", String(64), nullable=False),
    # Frozen SampleFeatures, as bytes from the features codec (earmark.freeze compresses them).
    Column("features", LargeBinary, nullable=False),
    # Provenance of the sample row itself: who gave it to us, when, under which TLP.
    Column("source", Text, nullable=False),
    Column("first_seen", DateTime(timezone=True), nullable=False),
    Column("tlp", String(16), nullable=False),
)

labels = Table(
    "labels",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "sample_id",
        Integer,
        ForeignKey("samples.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("actor", Text, nullable=True),
    Column("family", Text, nullable=True),
    Column("goodware", Boolean, nullable=False),
    Column("source", Text, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("tlp", String(16), nullable=False),
    Index("ix_labels_sample_id", "sample_id"),
    Index("ix_labels_actor", "actor"),
    Index("ix_labels_family", "family"),
)

functions = Table(
    "functions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "sample_id",
        Integer,
        ForeignKey("samples.id", ondelete="CASCADE"),
        nullable=False,
    ),
    # Unsigned 64-bit values (addresses, hashes) are stored as the signed int64 with the same
    # bits, because SQLite and PostgreSQL integers are signed 64-bit.
    Column("address", BigInteger, nullable=False),
    Column("size", Integer, nullable=False),
    Column("instruction_count", Integer, nullable=False),
    Column("block_count", Integer, nullable=False),
    Column("exact_hash", BigInteger, nullable=False),
    # MINHASH_PERMUTATIONS little-endian uint32 values (256 bytes), decoded in bulk with numpy.
    Column("minhash", LargeBinary, nullable=False),
    Index("ix_functions_exact_hash", "exact_hash"),
    Index("ix_functions_sample_id", "sample_id"),
)
