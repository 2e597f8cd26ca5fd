"""The loaded code image: the contract between format parsing and function recovery.

The loader (``earmark.extract.loader``) turns a PE or ELF file into a ``CodeImage``; function
recovery (``earmark.extract.functions``) only sees this, never LIEF, so either side can change
(or be replaced by a frozen test image) without touching the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from earmark.model.sample import Arch


@dataclass(frozen=True, slots=True)
class Segment:
    """Bytes mapped at a virtual address; only bytes present in the file, never zero-fill."""

    name: str
    virtual_address: int
    data: bytes
    executable: bool


@dataclass(frozen=True, slots=True)
class SymbolFunction:
    name: str
    address: int
    size: int  # 0 when the symbol table does not say


@dataclass(frozen=True, slots=True)
class CodeImage:
    arch: Arch
    bits: int
    image_base: int
    segments: tuple[Segment, ...]
    entry_points: tuple[int, ...]
    symbol_functions: tuple[SymbolFunction, ...]  # from .symtab/.dynsym/COFF symbols
    export_addresses: tuple[int, ...]
    # Function starts from unwind data: PE .pdata RUNTIME_FUNCTION begins, ELF .eh_frame FDEs.
    exception_starts: tuple[int, ...]
    # Address of an import slot (PE IAT entry) or stub (ELF PLT entry) -> "library!name".
    import_slots: Mapping[int, str] = field(default_factory=dict)
