"""What every importer returns, and the small rules they share: report ids, dates, TLP."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from earmark.errors import IntelError
from earmark.model.intel import ActorProfile, Indicator, IntelRelation, IntelReport
from earmark.model.kb import Tlp

# Largest intel file read. The ATT&CK enterprise bundle is ≈14 MB (≈45 MB with full
# attack-patterns); IOC exports beyond this are feeds that want a streaming importer.
MAX_INTEL_FILE_BYTES = 256 * 1024 * 1024

# Marking used when neither the file nor the caller says: TLP:AMBER, the knowledge base's
# default (model.kb.Provenance), so nothing is shared wider than its author might allow.
DEFAULT_TLP = Tlp.AMBER

_TLP_ORDER = (Tlp.CLEAR, Tlp.GREEN, Tlp.AMBER, Tlp.AMBER_STRICT, Tlp.RED)


@dataclass(frozen=True, slots=True)
class ImportResult:
    reports: tuple[IntelReport, ...]
    actors: tuple[ActorProfile, ...]
    relations: tuple[IntelRelation, ...]
    warnings: tuple[str, ...]  # skipped records and oddities, for the analyst


def report_id(source: str, *keys: str | None) -> str:
    """Stable id of a report: sha256 over source and its identifying keys (uuid, URL, title)."""
    material = "\x1f".join([source, *(k or "" for k in keys)])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def tlp_from_text(text: str) -> Tlp | None:
    """``TLP:AMBER+STRICT``, ``tlp:white``, ``amber`` … → a TLP 2.0 marking (WHITE is CLEAR)."""
    value = text.strip().lower().removeprefix("tlp:").removeprefix("tlp-").strip()
    if value == "white":
        return Tlp.CLEAR
    try:
        return Tlp(value)
    except ValueError:
        return None


def strictest_tlp(markings: Iterable[Tlp | None]) -> Tlp | None:
    """The most restrictive marking among ``markings`` (a caller's TLP never loosens a file's)."""
    present = [m for m in markings if m is not None]
    return max(present, key=_TLP_ORDER.index) if present else None


def parse_date(value: Any) -> date | None:
    """A date from ISO text (``2023-04-20``, ``2023-04-20T10:00:00Z``) or a Unix timestamp."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = str(value).strip()
    if text.isdigit() and len(text) >= 9:  # Unix seconds (MISP "timestamp" fields)
        return datetime.fromtimestamp(int(text), tz=UTC).date() if int(text) < 2**33 else None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).date()
    except ValueError:
        try:
            return date.fromisoformat(text[:10])
        except ValueError:
            return None


def read_text(path: Path) -> str:
    """The file as text (UTF-8, with a BOM or not; undecodable bytes replaced)."""
    try:
        size = path.stat().st_size
        if size > MAX_INTEL_FILE_BYTES:
            raise IntelError(f"{path}: {size} bytes is over the intel file limit "
                             f"({MAX_INTEL_FILE_BYTES} bytes)")
        data = path.read_bytes()
    except OSError as error:
        raise IntelError(f"{path}: cannot read ({error.strerror or error})") from error
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    return data.decode("utf-8-sig", errors="replace")


def load_json(text: str, path: Path | str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise IntelError(f"{path}: not valid JSON ({error})") from error


def unique_indicators(indicators: Iterable[Indicator]) -> tuple[Indicator, ...]:
    """Indicators without repeats (same type and value), in first-seen order, offsets dropped."""
    seen: dict[tuple[str, str], Indicator] = {}
    for indicator in indicators:
        seen.setdefault((indicator.type, indicator.value),
                        Indicator(indicator.type, indicator.value))
    return tuple(seen.values())
