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
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
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
    # 64-bit on PostgreSQL (migration 4); INTEGER on SQLite, where that is the 64-bit rowid.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
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

# -- threat intelligence (migration 3) ---------------------------------------------------------
# Kept apart from kb_revision: an intel import must not invalidate the function index cache.
intel_revision = Table(
    "intel_revision",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("revision", BigInteger, nullable=False),
)

# One row per imported report (publication, feed entry, MISP event). ``report_id`` is the
# importer's stable id, so re-importing a file finds its rows; ``content_hash`` tells whether the
# re-imported report differs from the stored one (then its rows are replaced, else left alone).
intel_reports = Table(
    "intel_reports",
    metadata,
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

# Actor and family names a report cites (canonical names at import time, split taxonomy).
intel_report_names = Table(
    "intel_report_names",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "report_row", Integer, ForeignKey("intel_reports.id", ondelete="CASCADE"), nullable=False
    ),
    Column("kind", String(16), nullable=False),  # "actor" or "family"
    Column("name", Text, nullable=False),
    Column("position", Integer, nullable=False),  # order in the report (first family = main)
    Index("ix_intel_report_names_report_row", "report_row"),
    Index("ix_intel_report_names_name", "name"),
)

intel_indicators = Table(
    "intel_indicators",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "report_row", Integer, ForeignKey("intel_reports.id", ondelete="CASCADE"), nullable=False
    ),
    Column("type", String(16), nullable=False),
    Column("value", Text, nullable=False),
    Index("ix_intel_indicators_report_row", "report_row"),
    Index("ix_intel_indicators_value", "value"),
)

# Actor profiles (ATT&CK groups, galaxy clusters) per source; aliases in their own table.
intel_actors = Table(
    "intel_actors",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("external_ids", Text, nullable=False),  # JSON list of strings
    UniqueConstraint("name", "source", name="uq_intel_actors_name_source"),
)

intel_actor_aliases = Table(
    "intel_actor_aliases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "actor_row", Integer, ForeignKey("intel_actors.id", ondelete="CASCADE"), nullable=False
    ),
    Column("alias", Text, nullable=False),
    Column("alias_folded", Text, nullable=False),  # casefolded, for case-insensitive lookup
    Index("ix_intel_actor_aliases_actor_row", "actor_row"),
    Index("ix_intel_actor_aliases_alias_folded", "alias_folded"),
)

# Relations as names, cited by the report that stated them (replaced with it).
intel_relations = Table(
    "intel_relations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "report_row", Integer, ForeignKey("intel_reports.id", ondelete="CASCADE"), nullable=False
    ),
    Column("source_name", Text, nullable=False),
    Column("source_type", String(32), nullable=False),
    Column("relation", String(64), nullable=False),
    Column("target_name", Text, nullable=False),
    Column("target_type", String(32), nullable=False),
    Index("ix_intel_relations_report_row", "report_row"),
    Index("ix_intel_relations_source_name", "source_name"),
    Index("ix_intel_relations_target_name", "target_name"),
)

# Indicators found in a sample's strings at ingest, with their file offset.
sample_indicators = Table(
    "sample_indicators",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sample_id", Integer, ForeignKey("samples.id", ondelete="CASCADE"), nullable=False),
    Column("type", String(16), nullable=False),
    Column("value", Text, nullable=False),
    Column("file_offset", BigInteger, nullable=True),
    Index("ix_sample_indicators_sample_id", "sample_id"),
    Index("ix_sample_indicators_value", "value"),
)
