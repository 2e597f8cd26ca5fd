"""Threat intelligence: indicators, intel importers, actor names, warninglists, infrastructure.

    indicators   text or sample strings → Indicator values (refanged, validated)
    importers    STIX 2.1 / ATT&CK / MISP / CSV / TXT / report text → ImportResult
    aliases      any actor name → one canonical name under a chosen Taxonomy
"""

from earmark.intel.aliases import AliasResolver, Taxonomy
from earmark.intel.indicators import (
    classify_value,
    extract_indicators,
    indicators_from_strings,
    refang,
)

__all__ = [
    "AliasResolver",
    "Taxonomy",
    "classify_value",
    "extract_indicators",
    "indicators_from_strings",
    "refang",
]
