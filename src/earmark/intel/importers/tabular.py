"""IOC lists: CSV/TSV with a column mapping, and plain TXT with one value per line.

CSV: the header row is detected (``csv.Sniffer``) and columns are found by name when no mapping
is given (``value``/``indicator``/``ioc``, ``type``, ``actor``/``group``, ``date``/``first_seen``);
a ``type`` column that names a MISP or STIX type is honoured, else the value's content decides.
Rows sharing an actor and date form one report, since IOC lists often concatenate campaigns.
TXT: ``#`` starts a comment; each remaining line is typed by the indicator extractor.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from earmark.errors import IntelError
from earmark.intel.aliases import AliasResolver
from earmark.intel.importers.common import (
    DEFAULT_TLP,
    ImportResult,
    parse_date,
    report_id,
    unique_indicators,
)
from earmark.intel.indicators import classify_value
from earmark.model.intel import Indicator, IndicatorType, IntelReport
from earmark.model.kb import Tlp

__all__ = ["ColumnMapping", "import_csv", "import_txt"]

_VALUE_NAMES = ("value", "indicator", "ioc", "observable", "ioc_value", "data")
_TYPE_NAMES = ("type", "indicator_type", "ioc_type", "kind")
_ACTOR_NAMES = ("actor", "group", "threat_actor", "apt", "attribution")
_DATE_NAMES = ("date", "first_seen", "firstseen", "published", "created", "timestamp")
_FAMILY_NAMES = ("family", "malware", "malware_family")
# Bytes looked at to sniff the dialect; a few rows are enough and sniffing is quadratic-ish.
_SNIFF_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class ColumnMapping:
    """Which column holds what: header names, or 0-based indexes as strings ("0")."""

    value: str
    type: str | None = None
    actor: str | None = None
    date: str | None = None
    family: str | None = None


def _typed(value: str, declared: str | None) -> Indicator | None:
    found = classify_value(value)
    if found is not None:
        return found
    declared = (declared or "").strip().lower()
    if declared in ("mutex", "mutant"):
        return Indicator(IndicatorType.MUTEX, value.strip())
    if declared in ("user-agent", "useragent", "user_agent"):
        return Indicator(IndicatorType.USER_AGENT, value.strip())
    return None


def _find_column(header: Sequence[str], wanted: str | None, names: Sequence[str]
                 ) -> int | None:
    lowered = [h.strip().lower() for h in header]
    if wanted is not None:
        if wanted.isdigit():
            return int(wanted)
        if wanted.strip().lower() in lowered:
            return lowered.index(wanted.strip().lower())
        raise IntelError(f"column {wanted!r} is not in the header {list(header)}")
    return next((lowered.index(n) for n in names if n in lowered), None)


def import_csv(text: str, source: str, mapping: ColumnMapping | None = None,
               tlp: Tlp | None = None, published: date | None = None,
               resolver: AliasResolver | None = None) -> ImportResult:
    resolver = resolver or AliasResolver.default()
    sample = text[:_SNIFF_BYTES]
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, ",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = [r for r in csv.reader(io.StringIO(text), dialect) if any(c.strip() for c in r)]
    if not rows:
        raise IntelError(f"{source}: the CSV file has no rows")
    # A first row without any indicator in it is a header. csv.Sniffer().has_header guesses
    # from column types and misses all-text IOC tables.
    has_header = all(classify_value(c) is None for c in rows[0])
    header = rows[0] if has_header else [str(i) for i in range(len(rows[0]))]
    body = rows[1:] if has_header else rows
    wanted = mapping or ColumnMapping(value="")
    columns = {
        "value": _find_column(header, wanted.value or None, _VALUE_NAMES),
        "type": _find_column(header, wanted.type, _TYPE_NAMES),
        "actor": _find_column(header, wanted.actor, _ACTOR_NAMES),
        "date": _find_column(header, wanted.date, _DATE_NAMES),
        "family": _find_column(header, wanted.family, _FAMILY_NAMES),
    }
    warnings: list[str] = []
    groups: dict[tuple[str, date | None], tuple[list[Indicator], set[str]]] = {}

    def cell(row: Sequence[str], name: str) -> str | None:
        index = columns[name]
        return row[index].strip() if index is not None and index < len(row) else None

    for line_number, row in enumerate(body, start=2 if has_header else 1):
        values = [cell(row, "value")] if columns["value"] is not None else row
        indicators = [i for v in values if v for i in [_typed(v, cell(row, "type"))] if i]
        if not indicators:
            warnings.append(f"{source}:{line_number}: no indicator in {row[:3]}")
            continue
        actor = resolver.resolve(cell(row, "actor") or "") if cell(row, "actor") else ""
        when = parse_date(cell(row, "date")) or published
        bucket = groups.setdefault((actor, when), ([], set()))
        bucket[0].extend(indicators)
        if cell(row, "family"):
            bucket[1].add(str(cell(row, "family")))
    reports = tuple(
        IntelReport(
            report_id=report_id(source, actor, when.isoformat() if when else None),
            source=source,
            title=f"{source}" + (f" — {actor}" if actor else "")
            + (f" ({when.isoformat()})" if when else ""),
            reference=None, published=when, tlp=tlp or DEFAULT_TLP,
            actors=(actor,) if actor else (),
            families=tuple(sorted(families)),
            indicators=unique_indicators(indicators),
        )
        for (actor, when), (indicators, families) in groups.items()
    )
    return ImportResult(reports, (), (), tuple(warnings))


def import_txt(text: str, source: str, tlp: Tlp | None = None,
               published: date | None = None, actor: str | None = None) -> ImportResult:
    """One value per line; ``#`` comments; lines that are no indicator are reported back."""
    indicators: list[Indicator] = []
    warnings: list[str] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        value = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not value:
            continue
        found = classify_value(value)
        if found is None:
            warnings.append(f"{source}:{line_number}: not an indicator: {value[:80]!r}")
        else:
            indicators.append(found)
    report = IntelReport(
        report_id=report_id(source, actor), source=source, title=source, reference=None,
        published=published, tlp=tlp or DEFAULT_TLP,
        actors=(AliasResolver.default().resolve(actor),) if actor else (),
        families=(), indicators=unique_indicators(indicators),
    )
    return ImportResult((report,), (), (), tuple(warnings))
