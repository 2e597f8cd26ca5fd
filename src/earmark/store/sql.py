"""The SQLAlchemy-backed knowledge base: SQLite by default, any SQLAlchemy URL (PostgreSQL) too.

All SQL in earmark lives in ``earmark.store``. Queries are SQLAlchemy Core built from
``earmark.store.schema``, so the same code runs on SQLite and PostgreSQL. What differs by backend
is kept to a few places: SQLite's connection pragmas and BEGIN hook (``earmark.store.engine``,
which also names and opens the database), PostgreSQL's write lock (``migrations.begin_write``),
snapshot reads (``_read``) and the server-side cursor of the function table's bulk reads
(``earmark.store.function_table``).
"""

from __future__ import annotations

import importlib
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, cast

import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine, and_, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from earmark.errors import StoreError
from earmark.model.intel import ActorProfile, Indicator, IntelRelation, IntelReport
from earmark.model.kb import FunctionTable, Provenance, SampleLabel, SampleRecord, Tlp
from earmark.model.sample import SampleFeatures
from earmark.store import intel_sql, schema
from earmark.store.base import (
    FeaturesCodec,
    IntelStats,
    IntelWriteSummary,
    SampleIndicators,
    StoreStats,
)
from earmark.store.engine import (
    connect_database,
    database_errors,
    resolve_database_url,
)
from earmark.store.function_table import read_function_ids, read_function_table
from earmark.store.migrations import apply_migrations, begin_write
from earmark.store.rows import (
    FUNCTION_ROW_COLUMNS,
    PreparedSample,
    prepare_sample,
)

# Provenance given to a sample row stored without a label or explicit provenance.
UNKNOWN_SOURCE = "unknown"


def _utc(moment: datetime) -> datetime:
    """Aware UTC datetime; naive values (SQLite returns them) are taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


class FreezeCodec:
    """The default ``FeaturesCodec``: ``earmark.freeze``, looked up when first used.

    Looked up at run time so ``earmark.store`` keeps depending on ``earmark.model`` only
    (DESIGN.md §3); pass another codec to ``open_store`` to replace it.
    """

    def _freeze(self) -> Any:
        return importlib.import_module("earmark.freeze")

    def to_bytes(self, features: SampleFeatures) -> bytes:
        return cast(bytes, self._freeze().features_to_bytes(features))

    def from_bytes(self, data: bytes, *, instructions: bool = True) -> SampleFeatures:
        decoded = self._freeze().features_from_bytes(data, instructions=instructions)
        return cast(SampleFeatures, decoded)


def open_store(url_or_path: str | None = None, *, codec: FeaturesCodec | None = None) -> SqlStore:
    """Open (creating and migrating as needed) the knowledge base at a path or SQLAlchemy URL."""
    url = resolve_database_url(url_or_path)
    engine = connect_database(url)
    try:
        with database_errors(f"open {url.render_as_string(hide_password=True)}"):
            apply_migrations(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlStore(engine, codec or FreezeCodec())


def _label_from_row(row: Any) -> SampleLabel:
    return SampleLabel(
        actor=row.actor,
        family=row.family,
        goodware=bool(row.goodware),
        provenance=Provenance(
            source=row.source, recorded_at=_utc(row.recorded_at), tlp=Tlp(row.tlp)
        ),
    )


class SqlStore:
    """``Store`` over a SQLAlchemy engine. Create it with ``open_store``."""

    def __init__(self, engine: Engine, codec: FeaturesCodec) -> None:
        self._engine = engine
        self._codec = codec

    @property
    def codec(self) -> FeaturesCodec:
        return self._codec

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    # -- writes -------------------------------------------------------------------------

    def add_sample(
        self,
        features: SampleFeatures,
        label: SampleLabel | None,
        provenance: Provenance | None = None,
        frozen: bytes | None = None,
        indicators: Sequence[Indicator] = (),
    ) -> bool:
        # Everything that can fail on bad input is computed before the transaction opens.
        blob = frozen if frozen is not None else self._codec.to_bytes(features)
        return self.add_prepared(prepare_sample(features, blob), label, provenance, indicators)

    def add_prepared(
        self,
        sample: PreparedSample,
        label: SampleLabel | None,
        provenance: Provenance | None = None,
        indicators: Sequence[Indicator] = (),
    ) -> bool:
        if provenance is None:
            provenance = (
                label.provenance if label else Provenance(UNKNOWN_SOURCE, datetime.now(UTC))
            )
        try:
            with (
                database_errors(f"store sample {sample.sha256}"),
                begin_write(self._engine) as connection,
            ):
                if self._sample_id(connection, sample.sha256) is not None:
                    self._add_label_in(connection, sample.sha256, label)
                    return False
                sample_id = self._insert_sample_row(connection, sample, provenance)
                self._insert_functions(connection, sample_id, sample)
                intel_sql.insert_sample_indicators(connection, sample_id, indicators)
                if label is not None:
                    self._insert_label(connection, sample_id, label)
                self._bump_revision(connection)
        except IntegrityError:
            # Another writer stored the same sha256 between our check and our insert.
            if not self.has_sample(sample.sha256):
                raise
            if label is not None:
                self.add_label(sample.sha256, label)
            return False
        return True

    def add_label(self, sha256: str, label: SampleLabel) -> bool:
        with database_errors(f"label sample {sha256}"), begin_write(self._engine) as connection:
            return self._add_label_in(connection, sha256, label)

    def _add_label_in(self, connection: Connection, sha256: str, label: SampleLabel | None) -> bool:
        sample_id = self._sample_id(connection, sha256)
        if sample_id is None:
            raise StoreError(f"cannot label sample {sha256}: it is not in the knowledge base")
        if label is None or self._has_same_claim(connection, sample_id, label):
            return False
        self._insert_label(connection, sample_id, label)
        self._bump_revision(connection)
        return True

    def _sample_id(self, connection: Connection, sha256: str) -> int | None:
        return connection.scalar(
            select(schema.samples.c.id).where(schema.samples.c.sha256 == sha256.lower())
        )

    def _insert_sample_row(
        self, connection: Connection, sample: PreparedSample, provenance: Provenance
    ) -> int:
        result = connection.execute(
            insert(schema.samples).values(
                sha256=sample.sha256,
                sha1=sample.sha1,
                md5=sample.md5,
                size=sample.size,
                format=sample.format,
                arch=sample.arch,
                bits=sample.bits,
                imphash=sample.imphash,
                tlsh=sample.tlsh,
                pdb_path=sample.pdb_path,
                rich_header=sample.rich_header,
                function_count=sample.function_count,
                features_format_version=sample.format_version,
                analyzer_version=sample.analyzer_version,
                features=sample.features_blob,
                source=provenance.source,
                first_seen=_utc(provenance.recorded_at),
                tlp=provenance.tlp.value,
            )
        )
        primary_key = result.inserted_primary_key
        assert primary_key is not None  # an INSERT of one row always has one
        return int(primary_key[0])

    def _insert_functions(
        self, connection: Connection, sample_id: int, sample: PreparedSample
    ) -> None:
        """All function rows in one driver-level executemany: SQLAlchemy's per-row parameter
        processing measured ~30 us a row (1.2 s of the writer's CPU for 39.6k functions),
        more than the inserts themselves; the values are plain ints and bytes already."""
        if not sample.function_count:
            return
        placeholder = "?" if connection.dialect.paramstyle in ("qmark", "numeric") else "%s"
        connection.exec_driver_sql(
            f"INSERT INTO {schema.functions.name} ({', '.join(FUNCTION_ROW_COLUMNS)}) "
            f"VALUES ({', '.join([placeholder] * len(FUNCTION_ROW_COLUMNS))})",
            sample.function_rows(sample_id),
        )

    def _has_same_claim(self, connection: Connection, sample_id: int, label: SampleLabel) -> bool:
        labels = schema.labels.c
        same = connection.scalar(
            select(func.count())
            .select_from(schema.labels)
            .where(
                and_(
                    labels.sample_id == sample_id,
                    labels.actor.is_(None) if label.actor is None else labels.actor == label.actor,
                    labels.family.is_(None)
                    if label.family is None
                    else labels.family == label.family,
                    labels.goodware == label.goodware,
                    labels.source == label.provenance.source,
                    labels.tlp == label.provenance.tlp.value,
                )
            )
        )
        return bool(same)

    def _insert_label(self, connection: Connection, sample_id: int, label: SampleLabel) -> None:
        connection.execute(
            insert(schema.labels).values(
                sample_id=sample_id,
                actor=label.actor,
                family=label.family,
                goodware=label.goodware,
                source=label.provenance.source,
                recorded_at=_utc(label.provenance.recorded_at),
                tlp=label.provenance.tlp.value,
            )
        )

    def _bump_revision(self, connection: Connection) -> None:
        connection.execute(
            update(schema.kb_revision)
            .where(schema.kb_revision.c.id == 1)
            .values(revision=schema.kb_revision.c.revision + 1)
        )

    # -- reads --------------------------------------------------------------------------

    @contextmanager
    def _read(self, action: str) -> Iterator[Connection]:
        """A read transaction, so several queries see one consistent snapshot.

        SQLite gives that to any transaction (WAL); PostgreSQL's default READ COMMITTED takes a
        new snapshot per statement, so reads there ask for REPEATABLE READ, which for a
        read-only transaction never fails and never blocks a writer.
        """
        with database_errors(action), self._engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                connection = connection.execution_options(
                    isolation_level="REPEATABLE READ", postgresql_readonly=True
                )
            with connection.begin():
                yield connection

    def has_sample(self, sha256: str) -> bool:
        with database_errors("read samples"), self._engine.connect() as connection:
            return self._sample_id(connection, sha256) is not None

    def get_sample(self, sha256: str) -> SampleRecord | None:
        records = self._sample_records(schema.samples.c.sha256 == sha256.lower())
        return records[0] if records else None

    def list_samples(self) -> list[SampleRecord]:
        return self._sample_records(None)

    def sample_labels(self) -> Mapping[int, SampleRecord]:
        return {record.sample_id: record for record in self._sample_records(None)}

    def _sample_records(self, condition: Any) -> list[SampleRecord]:
        samples = schema.samples.c
        sample_query = select(
            samples.id,
            samples.sha256,
            samples.format,
            samples.arch,
            samples.size,
            samples.function_count,
        ).order_by(samples.id)
        label_query = select(schema.labels).order_by(schema.labels.c.id)
        if condition is not None:
            sample_query = sample_query.where(condition)
            label_query = label_query.join(schema.samples).where(condition)
        with self._read("read samples") as connection:  # one snapshot for both queries
            sample_rows = connection.execute(sample_query).all()
            label_rows = connection.execute(label_query).all()
        labels_by_sample: dict[int, list[SampleLabel]] = {}
        for row in label_rows:
            labels_by_sample.setdefault(row.sample_id, []).append(_label_from_row(row))
        return [
            SampleRecord(
                sample_id=row.id,
                sha256=row.sha256,
                format=row.format,
                arch=row.arch,
                size=row.size,
                function_count=row.function_count,
                labels=tuple(labels_by_sample.get(row.id, ())),
            )
            for row in sample_rows
        ]

    def load_features(self, sha256: str, *, instructions: bool = True) -> SampleFeatures:
        return self._codec.from_bytes(self.load_features_blob(sha256), instructions=instructions)

    def load_features_blob(self, sha256: str) -> bytes:
        with database_errors("read features"), self._engine.connect() as connection:
            blob = connection.scalar(
                select(schema.samples.c.features).where(schema.samples.c.sha256 == sha256.lower())
            )
        if blob is None:
            raise StoreError(f"sample {sha256} is not in the knowledge base")
        return bytes(blob)

    def load_function_ids(
        self,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
        """(function_id, sample_id, address) of every function, ordered by function id
        (``function_table.read_function_ids``)."""
        with self._read("read function ids") as connection:
            return read_function_ids(connection)

    def load_function_table(self) -> FunctionTable:
        """All functions as numpy arrays, ordered by function id; the arrays are read-only
        (``function_table.read_function_table``)."""
        with self._read("read functions") as connection:  # count and rows: one snapshot
            return read_function_table(connection)

    def revision(self) -> int:
        with database_errors("read the revision"), self._engine.connect() as connection:
            value = connection.scalar(
                select(schema.kb_revision.c.revision).where(schema.kb_revision.c.id == 1)
            )
        return int(value or 0)

    def stats(self) -> StoreStats:
        labels = schema.labels.c

        def count(query: Any) -> int:
            return int(connection.scalar(query) or 0)

        with self._read("read statistics") as connection:
            stats = StoreStats(
                samples=count(select(func.count()).select_from(schema.samples)),
                functions=count(select(func.count()).select_from(schema.functions)),
                labels=count(select(func.count()).select_from(schema.labels)),
                goodware_samples=count(
                    select(func.count(labels.sample_id.distinct())).where(labels.goodware)
                ),
                labelled_samples=count(select(func.count(labels.sample_id.distinct()))),
                actors=count(select(func.count(labels.actor.distinct()))),
                families=count(select(func.count(labels.family.distinct()))),
                schema_version=count(select(func.max(schema.schema_migrations.c.id))),
                revision=count(
                    select(schema.kb_revision.c.revision).where(schema.kb_revision.c.id == 1)
                ),
            )
        return stats

    # -- threat intelligence (SQL in earmark.store.intel_sql) ----------------------------

    def add_intel(
        self,
        reports: Sequence[IntelReport],
        actors: Sequence[ActorProfile] = (),
        relations: Sequence[IntelRelation] = (),
        imported_at: datetime | None = None,
    ) -> IntelWriteSummary:
        with database_errors("store intel"), begin_write(self._engine) as connection:
            return intel_sql.write_intel(connection, reports, actors, relations, imported_at)

    def load_intel_reports(self, report_ids: Collection[str] | None = None) -> list[IntelReport]:
        with self._read("read intel reports") as connection:
            return intel_sql.read_reports(connection, report_ids)

    def load_actor_profiles(self) -> list[ActorProfile]:
        with self._read("read actor profiles") as connection:
            return intel_sql.read_actor_profiles(connection)

    def load_intel_relations(self, names: Collection[str] | None = None) -> list[IntelRelation]:
        with self._read("read intel relations") as connection:
            return intel_sql.read_relations(connection, names)

    def find_actor_names(self, alias: str) -> list[str]:
        with self._read("read actor aliases") as connection:
            return intel_sql.read_actor_names(connection, alias)

    def load_sample_indicators(self, sha256: str | None = None) -> list[SampleIndicators]:
        with self._read("read sample indicators") as connection:
            rows = intel_sql.read_sample_indicator_rows(connection, sha256)
            label_rows = connection.execute(
                select(schema.labels)
                .where(schema.labels.c.sample_id.in_(select(schema.sample_indicators.c.sample_id)))
                .order_by(schema.labels.c.id)
            ).all()
        labels: dict[int, list[SampleLabel]] = {}
        for row in label_rows:
            labels.setdefault(row.sample_id, []).append(_label_from_row(row))
        return [
            SampleIndicators(
                sha256=sha,
                first_seen=_utc(first_seen),
                labels=tuple(labels.get(sample_id, ())),
                indicators=tuple(found),
            )
            for sample_id, (sha, first_seen, found) in rows.items()
        ]

    def intel_stats(self) -> IntelStats:
        with self._read("read intel statistics") as connection:
            return intel_sql.read_intel_stats(connection)

    def intel_revision(self) -> int:
        with self._read("read the intel revision") as connection:
            return intel_sql.read_intel_revision(connection)

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
