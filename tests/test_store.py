"""One store test suite, run against every backend in ``store_url``.

To run it against PostgreSQL, add a parameter that yields a fresh database URL (for example
from an ``EARMARK_TEST_POSTGRES_URL`` environment variable, skipped when unset).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Connection, inspect, text

import earmark.store
from earmark.errors import StoreError
from earmark.model.kb import Tlp
from earmark.model.sample import MINHASH_PERMUTATIONS
from earmark.store import SqlStore, open_store, resolve_database_url, schema_version
from earmark.store import migrations as migrations_module
from earmark.store import schema as schema_module
from earmark.store.migrations import MIGRATIONS, Migration
from earmark.store.sql import connect_database
from kb_factories import make_features, make_label


@pytest.fixture(params=["sqlite-file", "sqlite-memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite-file":
        return str(tmp_path / "kb.db")
    return ":memory:"


@pytest.fixture
def store(store_url: str) -> Iterator[SqlStore]:
    with open_store(store_url) as opened:
        yield opened


def test_public_api_is_exactly_all() -> None:
    public = {name for name in vars(earmark.store) if not name.startswith("_")}
    modules = {"base", "intel_sql", "migrations", "schema", "sql"}
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
    with pytest.raises(StoreError):
        store.load_features("f" * 64)


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


def test_reopen_keeps_data_and_revision(tmp_path: Path) -> None:
    path = str(tmp_path / "kb.db")
    features = make_features(5, 3)
    with open_store(path) as store:
        store.add_sample(features, make_label())
        revision = store.revision()
    with open_store(path) as store:
        assert store.has_sample(features.sha256)
        assert store.revision() == revision
        assert store.load_features(features.sha256) == features


def test_migrations_are_applied_and_recorded(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    open_store(str(path)).close()
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT id, name FROM schema_migrations ORDER BY id").fetchall()
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert rows == [(m.id, m.name) for m in MIGRATIONS]
    assert schema_version() == MIGRATIONS[-1].id


def test_migrated_database_matches_schema_description(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    open_store(str(path)).close()
    inspector = inspect(connect_database(resolve_database_url(str(path))))
    for table in schema_module.metadata.sorted_tables:
        columns = {column["name"] for column in inspector.get_columns(table.name)}
        assert columns == {column.name for column in table.columns}, table.name
        indexes = {index["name"] for index in inspector.get_indexes(table.name)}
        assert indexes == {index.name for index in table.indexes}, table.name


def test_pending_migration_runs_on_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "kb.db")
    open_store(path).close()
    ran: list[int] = []
    extra = Migration(MIGRATIONS[-1].id + 1, "test migration", lambda _c: ran.append(1))
    applied = migrations_module.apply_migrations(
        connect_database(resolve_database_url(str(path))), (*MIGRATIONS, extra)
    )
    assert applied == [extra.id] and ran == [1]
    again = migrations_module.apply_migrations(
        connect_database(resolve_database_url(str(path))), (*MIGRATIONS, extra)
    )
    assert again == [] and ran == [1]


def test_database_from_newer_earmark_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    open_store(str(path)).close()
    with sqlite3.connect(path) as connection:
        connection.execute(
            "INSERT INTO schema_migrations (id, name, applied_at) "
            "VALUES (999, 'future', '2030-01-01')"
        )
    with pytest.raises(StoreError, match=r"schema version 999.*upgrade earmark"):
        open_store(str(path))


def test_failed_migration_is_rolled_back(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    open_store(str(path)).close()

    def half_done(connection: Connection) -> None:
        connection.execute(text("CREATE TABLE half_done (id INTEGER)"))
        raise RuntimeError("migration bug")

    engine = connect_database(resolve_database_url(str(path)))
    broken = Migration(MIGRATIONS[-1].id + 1, "broken", half_done)
    with pytest.raises(RuntimeError):
        migrations_module.apply_migrations(engine, (*MIGRATIONS, broken))
    assert not inspect(engine).has_table("half_done")
    with sqlite3.connect(path) as connection:
        ids = [row[0] for row in connection.execute("SELECT id FROM schema_migrations")]
    assert broken.id not in ids


def test_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "kb.db"
    path.write_bytes(b"MZ" + b"\x00" * 4096)
    with pytest.raises(StoreError, match="cannot open"):
        open_store(str(path))


def test_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no directory"):
        open_store(str(tmp_path / "absent" / "kb.db"))


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
