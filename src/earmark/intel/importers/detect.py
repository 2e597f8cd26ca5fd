"""Sniff an intel file's format and hand it to the right importer."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

from earmark.errors import IntelError
from earmark.intel.aliases import AliasResolver
from earmark.intel.importers.attack import import_attack_bundle, is_attack_bundle
from earmark.intel.importers.common import ImportResult, load_json, read_text
from earmark.intel.importers.misp import import_misp_events
from earmark.intel.importers.stix import import_stix_bundle
from earmark.intel.importers.tabular import ColumnMapping, import_csv, import_txt
from earmark.intel.importers.text import import_report_text
from earmark.intel.indicators import classify_value
from earmark.model.kb import Tlp

__all__ = ["detect_format", "import_file"]

# Share of non-comment lines that must each be one indicator for a .txt file to be an IOC list
# rather than prose. Lists carry a few stray headings; prose is far below half.
_IOC_LIST_MIN_SHARE = 0.8
_SNIFF_LINES = 200  # lines looked at to tell an IOC list from prose


def _json_format(data: Any) -> str:
    if isinstance(data, dict) and data.get("type") == "bundle":
        return "attack" if is_attack_bundle(data) else "stix"
    if isinstance(data, dict) and ("Event" in data or "response" in data):
        return "misp"
    if isinstance(data, list) and data and isinstance(data[0], dict) and "Event" in data[0]:
        return "misp"
    raise IntelError("JSON that is neither a STIX 2.1 bundle nor a MISP event")


def _looks_like_ioc_list(text: str) -> bool:
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()[:_SNIFF_LINES]]
    values = [line for line in lines if line]
    if not values:
        return False
    typed = sum(1 for value in values if classify_value(value) is not None)
    return typed / len(values) >= _IOC_LIST_MIN_SHARE


def detect_format(path: Path, text: str) -> str:
    """One of ``stix``, ``attack``, ``misp``, ``csv``, ``txt`` (IOC list), ``text`` (prose)."""
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return _json_format(load_json(text, path))
    if path.suffix.lower() in (".csv", ".tsv"):
        return "csv"
    return "txt" if _looks_like_ioc_list(text) else "text"


def import_file(
    path: str | Path,
    source: str | None = None,
    tlp: Tlp | None = None,
    published: date | None = None,
    mapping: ColumnMapping | None = None,
    resolver: AliasResolver | None = None,
) -> ImportResult:
    """Import one intel file of any supported format.

    ``source`` defaults to the file name. ``tlp`` applies where the file has no marking and
    tightens one it has (never loosens it); without either, records are TLP:AMBER.
    Raises ``IntelError`` for a file that cannot be read or understood.
    """
    path = Path(path)
    text = read_text(path)
    if not text.strip():
        raise IntelError(f"{path}: the file is empty")
    source = source or path.name
    kind = detect_format(path, text)
    if kind in ("stix", "attack", "misp"):
        data = load_json(text, path)
        if kind == "attack":
            return import_attack_bundle(data, source=source, tlp=tlp, published=published)
        if kind == "stix":
            return import_stix_bundle(data, source, tlp, published, resolver)
        return import_misp_events(data, source, tlp, published, resolver)
    if kind == "csv":
        return import_csv(text, source, mapping, tlp, published, resolver)
    if kind == "txt":
        return import_txt(text, source, tlp, published)
    return import_report_text(text, source, tlp, published, resolver=resolver)
