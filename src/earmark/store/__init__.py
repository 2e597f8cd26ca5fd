"""The knowledge base: samples, functions, labels and threat intel, behind the ``Store`` protocol.

``open_store()`` opens ``$EARMARK_DB`` or ``./earmark.db``; ``open_store("kb.db")`` a SQLite file;
``open_store("postgresql+psycopg://...")`` any SQLAlchemy URL. See docs/store.md.
"""

from earmark.store.base import (
    FeaturesCodec,
    IntelStats,
    IntelWriteSummary,
    SampleIndicators,
    Store,
    StoreStats,
)
from earmark.store.engine import DATABASE_ENV_VAR, DEFAULT_DATABASE_PATH, resolve_database_url
from earmark.store.migrations import MIGRATIONS, schema_version
from earmark.store.rows import PreparedSample, prepare_sample
from earmark.store.sql import FreezeCodec, SqlStore, open_store

__all__ = [
    "DATABASE_ENV_VAR",
    "DEFAULT_DATABASE_PATH",
    "MIGRATIONS",
    "FeaturesCodec",
    "FreezeCodec",
    "IntelStats",
    "IntelWriteSummary",
    "PreparedSample",
    "SampleIndicators",
    "SqlStore",
    "Store",
    "StoreStats",
    "open_store",
    "prepare_sample",
    "resolve_database_url",
    "schema_version",
]
