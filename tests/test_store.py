"""One store test suite, run against every backend in ``store_url``.

The "postgres" parameter gets a fresh database on the server named by
``EARMARK_TEST_POSTGRES_URL`` (``scripts/test.sh`` starts one with ``scripts/postgres.sh``); it
is skipped when that is not set. Tests that need a database that survives a reopen use
``persistent_url`` (SQLite file and PostgreSQL).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import Connection, Engine, UniqueConstraint, insert, inspect, text
from sqlalchemy.engine import make_url

import earmark.store
from earmark.cli import cli
from earmark.errors import StoreError
from earmark.model.kb import Tlp
from earmark.model.sample import MINHASH_PERMUTATIONS
from earmark.store import SqlStore, open_store, resolve_database_url, schema_version
from earmark.store import function_table as table_module
from earmark.store import migrations as migrations_module
from earmark.store import schema as schema_module
from earmark.store.engine import connect_database
from earmark.store.migrations import MIGRATIONS, Migration
from fixtures.build import FixtureBuilder
from kb_factories import make_features, make_label


@pytest.fixture(params=["sqlite-file", "sqlite-memory", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite-file":
        return str(tmp_path / "kb.db")
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return ":memory:"


@pytest.fixture(params=["sqlite-file", "postgres"])
def persistent_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return str(tmp_path / "kb.db")


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    with open_store(store_url) as opened:
        yield opened


def test_public_api_is_exactly_all() -> None:
    public = {name for name in vars(earmark.store) if not name.startswith("_")}
    modules = {
        "base", "engine", "function_table", "intel_sql", "migrations", "rows", "schema", "sql"
    }
    assert public - modules == set(earmark.store.__all__)


def test_new_sample_is_stored_once_and_relabelled(store: SqlStore) -> None:
    features = make_features(1, 7)
    first = make_label()
    second = make_label(actor=None, family="bankshot", source="vendor report", tlp=Tlp.GREEN)

    assert store.add_sample(features, first) is True
    revision_after_add = store.revision()
    assert store.add_sample(features, first) is False  # same claim: nothing new
    assert store.revision() == revision_after_add
    assert store.add_sample(features, second) is False  # new claim: label only
    assert store.revision() > revision_after_add

    record = store.get_sample(features.sha256)
    assert record is not None
    assert record.function_count == 7
    assert record.labels == (first, second)
    assert record.families == {"contopee", "bankshot"}
    stats = store.stats()
    assert (stats.samples, stats.functions, stats.labels) == (1, 7, 2)


def test_add_label_requires_a_stored_sample(store: SqlStore) -> None:
    with pytest.raises(StoreError, match="not in the knowledge base"):
        store.add_label("0" * 64, make_label())


def test_unlabelled_sample_keeps_provenance(store: SqlStore) -> None:
    features = make_features("plain", 2)
    assert store.add_sample(features, None)
    record = store.get_sample(features.sha256)
    assert record is not None and record.labels == ()
    assert store.stats().labelled_samples == 0


def test_features_round_trip(store: SqlStore) -> None:
    features = make_features(2, 20)
    store.add_sample(features, make_label())
    assert store.load_features(features.sha256) == features
    outline = store.load_features(features.sha256, instructions=False)
    assert outline.functions and all(not f.normalized for f in outline.functions)
    emptied = tuple(dataclasses.replace(f, normalized=()) for f in features.functions)
    assert outline == dataclasses.replace(features, functions=emptied)
    # Undecoded, as a build process receives it: the codec's bytes of the same features.
    assert store.codec.from_bytes(store.load_features_blob(features.sha256.upper())) == features
    with pytest.raises(StoreError):
        store.load_features("f" * 64)
    with pytest.raises(StoreError):
        store.load_features_blob("f" * 64)


def test_function_table_equals_inserted_functions(store: SqlStore) -> None:
    samples = [make_features(seed, count) for seed, count in ((10, 4), (11, 0), (12, 9))]
    for features in samples:
        store.add_sample(features, make_label())
    table = store.load_function_table()
    by_sha = {record.sha256: record.sample_id for record in store.list_samples()}

    expected = [(by_sha[f.sha256], fn) for f in samples for fn in f.functions]
    assert len(table) == len(expected) == 13
    assert np.all(np.diff(table.function_id) > 0)
    assert table.sample_id.tolist() == [sample_id for sample_id, _ in expected]
    assert table.address.tolist() == [fn.address for _, fn in expected]
    assert table.size.tolist() == [fn.size for _, fn in expected]
    assert table.instruction_count.tolist() == [fn.instruction_count for _, fn in expected]
    assert table.exact_hash.tolist() == [fn.exact_hash for _, fn in expected]
    assert table.exact_hash.dtype == np.uint64 and table.address.dtype == np.uint64
    assert table.minhash.shape == (13, MINHASH_PERMUTATIONS)
    assert table.minhash.dtype == np.uint32
    assert table.minhash.tolist() == [list(fn.minhash) for _, fn in expected]
    assert max(fn.address for _, fn in expected) >= 2**63  # unsigned values above int64 survive
    assert not table.minhash.flags.writeable


def test_empty_function_table(store: SqlStore) -> None:
    table = store.load_function_table()
    assert len(table) == 0
    assert table.minhash.shape == (0, MINHASH_PERMUTATIONS)
    assert [len(column) for column in store.load_function_ids()] == [0, 0, 0]


def test_function_ids_are_the_tables_id_columns(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [make_features(seed, count) for seed, count in ((20, 5), (21, 0), (22, 8))]
    for features in samples:
        store.add_sample(features, None)
    table = store.load_function_table()
    assert max(table.address.tolist()) >= 2**63  # unsigned values above int64 survive
    monkeypatch.setattr(table_module, "FUNCTION_TABLE_FETCH_ROWS", 3)  # 13 rows: 5 round trips
    function_id, sample_id, address = store.load_function_ids()
    assert function_id.tolist() == table.function_id.tolist()
    assert sample_id.tolist() == table.sample_id.tolist()
    assert address.dtype == np.uint64 and address.tolist() == table.address.tolist()
    assert not (function_id.flags.writeable or address.flags.writeable)


def test_list_samples_and_sample_labels_agree(store: SqlStore) -> None:
    for seed in range(5):
        store.add_sample(make_features(seed, 1), make_label(goodware=seed == 0, actor=None))
    records = store.list_samples()
    assert [r.sample_id for r in records] == sorted(r.sample_id for r in records)
    assert dict(store.sample_labels()) == {r.sample_id: r for r in records}
    assert store.stats().goodware_samples == 1


def test_exception_midway_leaves_nothing(store: SqlStore, monkeypatch: pytest.MonkeyPatch) -> None:
    class Interrupted(Exception):
        pass

    def fail_after_functions(*_args: object) -> None:
        raise Interrupted

    features = make_features(3, 6)
    revision = store.revision()
    # The label is written after the sample row and its functions: failing there must undo them.
    monkeypatch.setattr(SqlStore, "_insert_label", fail_after_functions)
    with pytest.raises(Interrupted):
        store.add_sample(features, make_label())
    monkeypatch.undo()

    assert not store.has_sample(features.sha256)
    assert len(store.load_function_table()) == 0
    assert store.stats().samples == 0
    assert store.revision() == revision
    assert store.add_sample(features, make_label())  # and the sample can still be added


def test_wrong_minhash_length_is_refused_before_writing(store: SqlStore) -> None:
    features = make_features(4, 2)
    broken = dataclasses.replace(features.functions[0], minhash=(1, 2, 3))
    damaged = dataclasses.replace(features, functions=(broken,))
    with pytest.raises(StoreError, match="MinHash"):
        store.add_sample(damaged, None)
    assert store.stats().samples == 0


def test_reopen_keeps_data_and_revision(persistent_url: str) -> None:
    features = make_features(5, 3)
    with open_store(persistent_url) as store:
        store.add_sample(features, make_label())
        revision = store.revision()
    with open_store(persistent_url) as store:
        assert store.has_sample(features.sha256)
        assert store.revision() == revision
        assert store.load_features(features.sha256) == features


def _engine(url: str) -> Engine:
    return connect_database(resolve_database_url(url))


def test_migrations_are_applied_and_recorded(persistent_url: str) -> None:
    open_store(persistent_url).close()
    engine = _engine(persistent_url)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT id, name FROM schema_migrations ORDER BY id"))
        assert [tuple(row) for row in rows] == [(m.id, m.name) for m in MIGRATIONS]
    engine.dispose()
    assert schema_version() == MIGRATIONS[-1].id


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    open_store(str(path)).close()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_migrated_database_matches_schema_description(persistent_url: str) -> None:
    open_store(persistent_url).close()
    engine = _engine(persistent_url)
    inspector = inspect(engine)
    for table in schema_module.metadata.sorted_tables:
        columns = {column["name"]: column for column in inspector.get_columns(table.name)}
        assert set(columns) == {column.name for column in table.columns}, table.name
        for column in table.columns:
            stored = columns[column.name]["type"].compile(dialect=engine.dialect)
            described = column.type.compile(dialect=engine.dialect)
            assert _same_sql_type(stored, described), (table.name, column.name)
        # PostgreSQL also reports the index behind a UNIQUE constraint; those are checked
        # as constraints below.
        indexes = {
            index["name"]
            for index in inspector.get_indexes(table.name)
            if not index.get("duplicates_constraint")
        }
        assert indexes == {index.name for index in table.indexes}, table.name
        named_unique = {
            constraint.name
            for constraint in table.constraints
            if isinstance(constraint, UniqueConstraint) and constraint.name
        }
        stored_unique = {c["name"] for c in inspector.get_unique_constraints(table.name)}
        assert named_unique <= stored_unique, table.name
    engine.dispose()


def _same_sql_type(stored: str, described: str) -> bool:
    """Type names as reflected vs as described (reflection spells some types its own way)."""
    aliases = {"TIMESTAMP WITH TIME ZONE": "TIMESTAMP", "DATETIME": "TIMESTAMP"}
    return aliases.get(stored, stored) == aliases.get(described, described)


def test_pending_migration_runs_on_open(persistent_url: str) -> None:
    open_store(persistent_url).close()
    ran: list[int] = []
    extra = Migration(MIGRATIONS[-1].id + 1, "test migration", lambda _c: ran.append(1))
    engine = _engine(persistent_url)
    applied = migrations_module.apply_migrations(engine, (*MIGRATIONS, extra))
    assert applied == [extra.id] and ran == [1]
    again = migrations_module.apply_migrations(engine, (*MIGRATIONS, extra))
    assert again == [] and ran == [1]
    engine.dispose()


def test_database_from_newer_earmark_is_refused(persistent_url: str) -> None:
    open_store(persistent_url).close()
    engine = _engine(persistent_url)
    with engine.begin() as connection:
        connection.execute(
            insert(schema_module.schema_migrations).values(
                id=999, name="future", applied_at=datetime(2030, 1, 1, tzinfo=UTC)
            )
        )
    engine.dispose()
    with pytest.raises(StoreError, match=r"schema version 999.*upgrade earmark"):
        open_store(persistent_url)


def test_failed_migration_is_rolled_back(persistent_url: str) -> None:
    open_store(persistent_url).close()

    def half_done(connection: Connection) -> None:
        connection.execute(text("CREATE TABLE half_done (id INTEGER)"))
        raise RuntimeError("migration bug")

    engine = _engine(persistent_url)
    broken = Migration(MIGRATIONS[-1].id + 1, "broken", half_done)
    with pytest.raises(RuntimeError):
        migrations_module.apply_migrations(engine, (*MIGRATIONS, broken))
    assert not inspect(engine).has_table("half_done")
    with engine.connect() as connection:
        ids = list(connection.scalars(text("SELECT id FROM schema_migrations")))
    engine.dispose()
    assert broken.id not in ids


def test_concurrent_openers_migrate_once_and_writers_queue(persistent_url: str) -> None:
    """Several processes' worth of stores open a new database and store the same samples at
    the same moment: migrations run once, every sample and claim is stored exactly once."""
    openers = 4
    samples = [make_features(100 + n, 5) for n in range(6)]
    start = threading.Barrier(openers)

    def open_and_write(_worker: int) -> list[bool]:
        start.wait()
        with open_store(persistent_url) as store:
            return [store.add_sample(features, make_label()) for features in samples]

    with ThreadPoolExecutor(openers) as pool:
        results = list(pool.map(open_and_write, range(openers)))
    assert [sum(column) for column in zip(*results, strict=True)] == [1] * len(samples)
    with open_store(persistent_url) as store:
        stats = store.stats()
        assert (stats.samples, stats.labels, stats.functions) == (6, 6, 30)
        assert stats.schema_version == MIGRATIONS[-1].id
        assert stats.revision == len(samples)  # one bump per stored sample, none per no-op
    engine = _engine(persistent_url)
    with engine.connect() as connection:
        ids = list(connection.scalars(text("SELECT id FROM schema_migrations ORDER BY id")))
    engine.dispose()
    assert ids == [m.id for m in MIGRATIONS]


def test_function_table_is_read_in_chunks(
    store: SqlStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [make_features(200 + n, count) for n, count in enumerate((7, 3, 11))]
    for features in samples:
        store.add_sample(features, None)
    whole = store.load_function_table()
    monkeypatch.setattr(table_module, "FUNCTION_TABLE_FETCH_ROWS", 4)  # 21 rows: 6 round trips
    chunked = store.load_function_table()
    assert len(chunked) == 21
    for field in dataclasses.fields(whole):
        assert np.array_equal(getattr(whole, field.name), getattr(chunked, field.name))


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    path.write_bytes(b"MZ" + b"\x00" * 4096)
    with pytest.raises(StoreError, match="cannot open"):
        open_store(str(path))


def test_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no directory"):
        open_store(str(tmp_path / "absent" / "kb.db"))


def test_unreachable_server_is_a_store_error() -> None:
    pytest.importorskip("psycopg")
    with socket.socket() as probe:  # a port nothing listens on: bound here, never listened
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        with pytest.raises(StoreError, match="cannot open"):
            open_store(f"postgresql+psycopg://earmark:x@127.0.0.1:{port}/kb?connect_timeout=5")


def test_wrong_postgres_password_is_a_store_error(postgres_url: str) -> None:
    wrong = make_url(postgres_url).set(password="not-the-password")
    with pytest.raises(StoreError, match="cannot open") as raised:
        open_store(wrong.render_as_string(hide_password=False))
    assert "not-the-password" not in str(raised.value)


def test_database_location_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("EARMARK_DB", raising=False)
    assert resolve_database_url(None).database == "earmark.db"
    monkeypatch.setenv("EARMARK_DB", str(tmp_path / "env.db"))
    assert resolve_database_url(None).database == str(tmp_path / "env.db")
    assert resolve_database_url("other.db").render_as_string() == "sqlite:///other.db"
    postgres = resolve_database_url("postgresql+psycopg://u:secret@db/kb")
    assert postgres.get_backend_name() == "postgresql"
    assert resolve_database_url(":memory:").database is None
    with pytest.raises(StoreError):
        open_store("nosuchdialect://x")


def _ingest_and_attribute(database: str, builder: FixtureBuilder) -> dict[str, object]:
    runner = CliRunner()
    for source, actor, family in (("fx_codec.c", "Group A", "codec"),
                                  ("fx_dispatch.c", "Group B", "dispatch")):
        stored = builder.build(source, "gcc64", "O2").stripped
        result = runner.invoke(cli, ["ingest", "--db", database, str(stored),
                                     "--actor", actor, "--family", family])
        assert result.exit_code == 0, result.output
        assert "ingested 1, skipped 0" in result.output
    query = builder.build("fx_codec.c", "gcc64", "Os").stripped  # another -O level, not stored
    result = runner.invoke(cli, ["attribute", "--db", database, str(query), "--format", "json"])
    assert result.exit_code == 0, result.output
    document: dict[str, object] = json.loads(result.output)
    return document


def test_cli_ingest_and_attribute_on_postgres(
    postgres_url: str, builder: FixtureBuilder, tmp_path: Path
) -> None:
    """`earmark ingest --db postgresql+psycopg://...` then `attribute --format json`: the same
    case document as on a SQLite file."""
    on_postgres = _ingest_and_attribute(postgres_url, builder)
    on_sqlite = _ingest_and_attribute(str(tmp_path / "kb.db"), builder)
    hypotheses = on_postgres["hypotheses"]
    assert isinstance(hypotheses, list) and hypotheses[0]["actor"] == "Group A"
    assert on_postgres == on_sqlite
    with open_store(postgres_url) as store:
        assert store.stats().samples == 2 and store.stats().actors == 2
