"""Pure domain types shared by every layer. No I/O, no third-party imports."""

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
    "ElfInfo",
    "Export",
    "FunctionFeatures",
    "Import",
    "PeInfo",
    "RichEntry",
    "RichHeader",
    "SampleFeatures",
    "Section",
    "Signer",
    "StringRef",
]
