"""Threat-intel importers: STIX 2.1, MITRE ATT&CK, MISP events, CSV/TXT IOC lists, report text.

Each returns an ``ImportResult`` of values (reports, actor profiles, relations, warnings); saving
them in the knowledge base is the store's job. ``import_file`` sniffs the format.

The names below are loaded on first use (PEP 562): the STIX and ATT&CK importers load stix2 and
its pattern grammar (+13 MB RSS, ~0.3 s), which a process that only reads a TLP word
(``importers.common``, every ``earmark`` command through its CLI options) should not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from earmark.intel.importers.attack import attack_groups, import_attack_bundle
    from earmark.intel.importers.common import ImportResult, report_id
    from earmark.intel.importers.detect import detect_format, import_file
    from earmark.intel.importers.misp import import_misp_events
    from earmark.intel.importers.stix import import_stix_bundle, indicators_from_pattern
    from earmark.intel.importers.tabular import ColumnMapping, import_csv, import_txt
    from earmark.intel.importers.text import import_report_text

__all__ = [
    "ColumnMapping",
    "ImportResult",
    "attack_groups",
    "detect_format",
    "import_attack_bundle",
    "import_csv",
    "import_file",
    "import_misp_events",
    "import_report_text",
    "import_stix_bundle",
    "import_txt",
    "indicators_from_pattern",
    "report_id",
]

# The module of this package that defines each public name.
_HOMES = {
    "ColumnMapping": "tabular",
    "ImportResult": "common",
    "attack_groups": "attack",
    "detect_format": "detect",
    "import_attack_bundle": "attack",
    "import_csv": "tabular",
    "import_file": "detect",
    "import_misp_events": "misp",
    "import_report_text": "text",
    "import_stix_bundle": "stix",
    "import_txt": "tabular",
    "indicators_from_pattern": "stix",
    "report_id": "common",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
