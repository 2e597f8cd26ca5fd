"""Threat-intel importers: STIX 2.1, MITRE ATT&CK, MISP events, CSV/TXT IOC lists, report text.

Each returns an ``ImportResult`` of values (reports, actor profiles, relations, warnings); saving
them in the knowledge base is the store's job. ``import_file`` sniffs the format.
"""

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
