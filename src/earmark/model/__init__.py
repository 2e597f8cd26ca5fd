"""Pure domain types shared by every layer. No I/O, no third-party imports."""

from earmark.model.evidence import Evidence, EvidenceKind
from earmark.model.intel import (
    ActorProfile,
    Indicator,
    IndicatorType,
    IntelRelation,
    IntelReport,
)
from earmark.model.kb import FunctionTable, Provenance, SampleLabel, SampleRecord, Tlp
from earmark.model.sample import (
    FEATURES_FORMAT_VERSION,
    MINHASH_PERMUTATIONS,
    ElfInfo,
    Export,
    FunctionFeatures,
    Import,
    PeInfo,
    RichEntry,
    RichHeader,
    SampleFeatures,
    Section,
    Signer,
    StringRef,
)

__all__ = [
    "FEATURES_FORMAT_VERSION",
    "MINHASH_PERMUTATIONS",
    "ActorProfile",
    "ElfInfo",
    "Evidence",
    "EvidenceKind",
    "Export",
    "FunctionFeatures",
    "FunctionTable",
    "Import",
    "Indicator",
    "IndicatorType",
    "IntelRelation",
    "IntelReport",
    "PeInfo",
    "Provenance",
    "RichEntry",
    "RichHeader",
    "SampleFeatures",
    "SampleLabel",
    "SampleRecord",
    "Section",
    "Signer",
    "StringRef",
    "Tlp",
]
