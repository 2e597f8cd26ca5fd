"""The intel half of the SQL store: reports, indicators, actor profiles, relations, sample IOCs.

Functions here run inside a transaction the caller (``earmark.store.sql.SqlStore``) opened, so
an import of one file, or one sample with its indicators, is all-or-nothing.

Idempotence: every report row is keyed by the importer's stable ``report_id``, and carries a
digest of its content (``content_hash``). Re-importing an unchanged file therefore writes
nothing and leaves the intel revision alone; a changed report replaces its own rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.engine import Connection

from earmark.model.intel import ActorProfile, Indicator, IndicatorType, IntelRelation, IntelReport
from earmark.model.kb import Tlp
from earmark.store import schema
from earmark.store.base import IntelStats, IntelWriteSummary

# Values bound in one ``IN (...)`` list. SQLite's default limit on bound parameters is 32,766
# (3.32+), older builds 999; 500 stays under both with room for the other parameters.
IN_CLAUSE_CHUNK = 500

_ACTOR, _FAMILY = "actor", "family"


def _chunks(values: Sequence[Any], size: int = IN_CLAUSE_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _relation_key(relation: IntelRelation) -> tuple[str, str, str, str, str]:
    return (relation.source_name, relation.source_type, relation.relation,
            relation.target_name, relation.target_type)


def report_content_hash(report: IntelReport, relations: Sequence[IntelRelation]) -> str:
    """Digest of everything stored for a report, so an unchanged re-import is detected."""
    document = [
        report.source, report.title, report.reference,
        report.published.isoformat() if report.published else None, report.tlp.value,
        list(report.actors), list(report.families),
        [[i.type.value, i.value] for i in report.indicators],
        sorted(_relation_key(r) for r in relations),
    ]
    return hashlib.sha256(json.dumps(document, ensure_ascii=True).encode()).hexdigest()


def bump_intel_revision(connection: Connection) -> None:
    connection.execute(
        update(schema.intel_revision)
        .where(schema.intel_revision.c.id == 1)
        .values(revision=schema.intel_revision.c.revision + 1)
    )


def read_intel_revision(connection: Connection) -> int:
    value = connection.scalar(
        select(schema.intel_revision.c.revision).where(schema.intel_revision.c.id == 1)
    )
    return int(value or 0)


# -- writes -------------------------------------------------------------------------------


def _existing_reports(connection: Connection, ids: Sequence[str]) -> dict[str, tuple[int, str]]:
    columns = schema.intel_reports.c
    found: dict[str, tuple[int, str]] = {}
    for chunk in _chunks(ids):
        rows = connection.execute(
            select(columns.report_id, columns.id, columns.content_hash).where(
                columns.report_id.in_(chunk)
            )
        )
        found.update({row.report_id: (row.id, row.content_hash) for row in rows})
    return found


def _report_values(report: IntelReport, digest: str, imported_at: datetime) -> dict[str, Any]:
    return {
        "report_id": report.report_id,
        "source": report.source,
        "title": report.title,
        "reference": report.reference,
        "published": report.published,
        "tlp": report.tlp.value,
        "content_hash": digest,
        "imported_at": imported_at,
    }


def _insert_children(
    connection: Connection, row: int, report: IntelReport, relations: Sequence[IntelRelation]
) -> int:
    """Names, indicators and relations of one report row; returns the indicators written."""
    names = [
        {"report_row": row, "kind": kind, "name": name, "position": position}
        for kind, values in ((_ACTOR, report.actors), (_FAMILY, report.families))
        for position, name in enumerate(dict.fromkeys(values))
    ]
    unique = dict.fromkeys((i.type.value, i.value) for i in report.indicators)
    indicators = [{"report_row": row, "type": kind, "value": value} for kind, value in unique]
    relation_rows = [
        {"report_row": row, "source_name": r.source_name, "source_type": r.source_type,
         "relation": r.relation, "target_name": r.target_name, "target_type": r.target_type}
        for r in dict.fromkeys(relations)
    ]
    for table, rows in ((schema.intel_report_names, names),
                        (schema.intel_indicators, indicators),
                        (schema.intel_relations, relation_rows)):
        if rows:
            connection.execute(insert(table), rows)
    return len(indicators)


def _delete_children(connection: Connection, row: int) -> None:
    for table in (schema.intel_report_names, schema.intel_indicators, schema.intel_relations):
        connection.execute(delete(table).where(table.c.report_row == row))


def _write_actor(connection: Connection, profile: ActorProfile) -> str:
    """"added", "updated" or "unchanged"."""
    actors, aliases = schema.intel_actors.c, schema.intel_actor_aliases.c
    external_ids = json.dumps(list(profile.external_ids))
    wanted_aliases = list(dict.fromkeys(a for a in profile.aliases if a.strip()))
    row = connection.execute(
        select(actors.id, actors.external_ids).where(
            actors.name == profile.name, actors.source == profile.source
        )
    ).first()
    if row is not None:
        stored = list(connection.scalars(
            select(aliases.alias).where(aliases.actor_row == row.id).order_by(aliases.id)
        ))
        if stored == wanted_aliases and row.external_ids == external_ids:
            return "unchanged"
        connection.execute(
            update(schema.intel_actors).where(actors.id == row.id)
            .values(external_ids=external_ids)
        )
        connection.execute(delete(schema.intel_actor_aliases).where(aliases.actor_row == row.id))
        actor_row, outcome = int(row.id), "updated"
    else:
        result = connection.execute(insert(schema.intel_actors).values(
            name=profile.name, source=profile.source, external_ids=external_ids
        ))
        key = result.inserted_primary_key
        assert key is not None  # an INSERT of one row always has one
        actor_row, outcome = int(key[0]), "added"
    if wanted_aliases:
        connection.execute(insert(schema.intel_actor_aliases), [
            {"actor_row": actor_row, "alias": alias, "alias_folded": alias.casefold()}
            for alias in wanted_aliases
        ])
    return outcome


def write_intel(
    connection: Connection,
    reports: Sequence[IntelReport],
    actors: Sequence[ActorProfile],
    relations: Sequence[IntelRelation],
    imported_at: datetime | None,
) -> IntelWriteSummary:
    """Store one import's values (see ``Store.add_intel``); the caller owns the transaction."""
    imported_at = (imported_at or datetime.now(UTC)).astimezone(UTC)
    by_id = {report.report_id: report for report in reports}  # a repeated id: the last wins
    relations_by_report: dict[str, list[IntelRelation]] = defaultdict(list)
    for relation in relations:
        relations_by_report[relation.report_id].append(relation)
    existing = _existing_reports(connection, list(by_id))
    added = updated = unchanged = indicators_written = relations_written = 0
    for rid, report in by_id.items():
        own_relations = relations_by_report.get(rid, [])
        digest = report_content_hash(report, own_relations)
        values = _report_values(report, digest, imported_at)
        if rid in existing:
            row, stored_digest = existing[rid]
            if stored_digest == digest:
                unchanged += 1
                continue
            _delete_children(connection, row)
            connection.execute(
                update(schema.intel_reports).where(schema.intel_reports.c.id == row).values(values)
            )
            updated += 1
        else:
            key = connection.execute(insert(schema.intel_reports).values(values))
            assert key.inserted_primary_key is not None
            row = int(key.inserted_primary_key[0])
            added += 1
        indicators_written += _insert_children(connection, row, report, own_relations)
        relations_written += len(dict.fromkeys(own_relations))
    # Relations citing a report imported earlier (not in this batch) attach to the stored row.
    orphans = [r for rid, rs in relations_by_report.items() if rid not in by_id for r in rs]
    stored_rows = _existing_reports(connection, list({r.report_id for r in orphans}))
    skipped = 0
    for relation in dict.fromkeys(orphans):
        if relation.report_id not in stored_rows:
            skipped += 1
            continue
        row = stored_rows[relation.report_id][0]
        columns = schema.intel_relations.c
        duplicate = connection.scalar(select(func.count()).where(
            columns.report_row == row, columns.source_name == relation.source_name,
            columns.source_type == relation.source_type, columns.relation == relation.relation,
            columns.target_name == relation.target_name,
            columns.target_type == relation.target_type))
        if not duplicate:
            connection.execute(insert(schema.intel_relations).values(
                report_row=row, source_name=relation.source_name,
                source_type=relation.source_type, relation=relation.relation,
                target_name=relation.target_name, target_type=relation.target_type))
            relations_written += 1
    actor_outcomes: dict[str, int] = defaultdict(int)
    for profile in {(p.name, p.source): p for p in actors}.values():
        actor_outcomes[_write_actor(connection, profile)] += 1
    if added or updated or relations_written or actor_outcomes["added"] or actor_outcomes[
            "updated"]:
        bump_intel_revision(connection)
    return IntelWriteSummary(
        reports_added=added, reports_updated=updated, reports_unchanged=unchanged,
        indicators_added=indicators_written, relations_added=relations_written,
        relations_skipped=skipped, actors_added=actor_outcomes["added"],
        actors_updated=actor_outcomes["updated"], actors_unchanged=actor_outcomes["unchanged"],
    )


def insert_sample_indicators(
    connection: Connection, sample_id: int, indicators: Iterable[Indicator]
) -> None:
    rows = [
        {"sample_id": sample_id, "type": kind, "value": value, "file_offset": offset}
        for kind, value, offset in dict.fromkeys(
            (i.type.value, i.value, i.offset) for i in indicators
        )
    ]
    if rows:
        connection.execute(insert(schema.sample_indicators), rows)


# -- reads --------------------------------------------------------------------------------


def read_reports(connection: Connection, report_ids: Collection[str] | None) -> list[IntelReport]:
    columns = schema.intel_reports.c
    if report_ids is None:
        report_rows = list(connection.execute(select(schema.intel_reports).order_by(columns.id)))
    else:
        report_rows = []
        for chunk in _chunks(sorted(set(report_ids))):
            report_rows.extend(connection.execute(
                select(schema.intel_reports).where(columns.report_id.in_(chunk))
            ))
        report_rows.sort(key=lambda row: row.id)
    row_ids = [row.id for row in report_rows]
    names: dict[int, dict[str, list[str]]] = defaultdict(lambda: {_ACTOR: [], _FAMILY: []})
    indicators: dict[int, list[Indicator]] = defaultdict(list)
    name_columns, indicator_columns = schema.intel_report_names.c, schema.intel_indicators.c
    chunks = [row_ids] if report_ids is None else list(_chunks(row_ids))
    for chunk in chunks:
        name_query = select(schema.intel_report_names).order_by(
            name_columns.report_row, name_columns.kind, name_columns.position)
        indicator_query = select(schema.intel_indicators).order_by(indicator_columns.id)
        if report_ids is not None:
            name_query = name_query.where(name_columns.report_row.in_(chunk))
            indicator_query = indicator_query.where(indicator_columns.report_row.in_(chunk))
        for row in connection.execute(name_query):
            names[row.report_row][row.kind].append(row.name)
        for row in connection.execute(indicator_query):
            indicators[row.report_row].append(Indicator(IndicatorType(row.type), row.value))
    return [
        IntelReport(
            report_id=row.report_id, source=row.source, title=row.title,
            reference=row.reference, published=row.published, tlp=Tlp(row.tlp),
            actors=tuple(names[row.id][_ACTOR]), families=tuple(names[row.id][_FAMILY]),
            indicators=tuple(indicators[row.id]),
        )
        for row in report_rows
    ]


def read_actor_profiles(connection: Connection) -> list[ActorProfile]:
    actors, aliases = schema.intel_actors.c, schema.intel_actor_aliases.c
    alias_rows: dict[int, list[str]] = defaultdict(list)
    for row in connection.execute(select(aliases.actor_row, aliases.alias).order_by(aliases.id)):
        alias_rows[row.actor_row].append(row.alias)
    return [
        ActorProfile(name=row.name, aliases=tuple(alias_rows[row.id]),
                     external_ids=tuple(json.loads(row.external_ids)), source=row.source)
        for row in connection.execute(select(schema.intel_actors).order_by(actors.id))
    ]


def read_relations(connection: Connection, names: Collection[str] | None) -> list[IntelRelation]:
    columns = schema.intel_relations.c
    query = (
        select(columns.source_name, columns.source_type, columns.relation, columns.target_name,
               columns.target_type, schema.intel_reports.c.report_id)
        .join(schema.intel_reports, schema.intel_reports.c.id == columns.report_row)
        .order_by(columns.id)
    )
    if names is None:
        rows = list(connection.execute(query))
    else:
        rows = []
        for chunk in _chunks(sorted(set(names))):
            rows.extend(connection.execute(query.where(
                or_(columns.source_name.in_(chunk), columns.target_name.in_(chunk)))))
    return list(dict.fromkeys(
        IntelRelation(row.source_name, row.source_type, row.relation, row.target_name,
                      row.target_type, row.report_id)
        for row in rows
    ))


def read_actor_names(connection: Connection, alias: str) -> list[str]:
    actors, aliases = schema.intel_actors.c, schema.intel_actor_aliases.c
    folded = alias.strip().casefold()
    by_alias = select(actors.name).join(
        schema.intel_actor_aliases, aliases.actor_row == actors.id
    ).where(aliases.alias_folded == folded)
    by_name = select(actors.name).where(func.lower(actors.name) == folded)
    return sorted(set(connection.scalars(by_alias)) | set(connection.scalars(by_name)))


def read_sample_indicator_rows(
    connection: Connection, sha256: str | None
) -> dict[int, tuple[str, datetime, list[Indicator]]]:
    """sample id → (sha256, first seen, indicators with offsets), in insertion order."""
    samples, found = schema.samples.c, schema.sample_indicators.c
    query = (
        select(found.sample_id, samples.sha256, samples.first_seen, found.type, found.value,
               found.file_offset)
        .join(schema.samples, samples.id == found.sample_id)
        .order_by(found.sample_id, found.id)
    )
    if sha256 is not None:
        query = query.where(samples.sha256 == sha256.lower())
    result: dict[int, tuple[str, datetime, list[Indicator]]] = {}
    for row in connection.execute(query):
        entry = result.setdefault(row.sample_id, (row.sha256, row.first_seen, []))
        entry[2].append(Indicator(IndicatorType(row.type), row.value, row.file_offset))
    return result


def read_intel_stats(connection: Connection) -> IntelStats:
    def count(query: Any) -> int:
        return int(connection.scalar(query) or 0)

    indicators, found = schema.intel_indicators.c, schema.sample_indicators.c
    return IntelStats(
        reports=count(select(func.count()).select_from(schema.intel_reports)),
        indicators=count(select(func.count()).select_from(schema.intel_indicators)),
        distinct_values=count(select(func.count(indicators.value.distinct()))),
        actor_profiles=count(select(func.count()).select_from(schema.intel_actors)),
        aliases=count(select(func.count()).select_from(schema.intel_actor_aliases)),
        relations=count(select(func.count()).select_from(schema.intel_relations)),
        sample_indicators=count(select(func.count()).select_from(schema.sample_indicators)),
        samples_with_indicators=count(select(func.count(found.sample_id.distinct()))),
        revision=read_intel_revision(connection),
    )
