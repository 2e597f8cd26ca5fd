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
class UnwindRange:
    """One unwind-table entry: PE ``RUNTIME_FUNCTION`` [begin, end) and the function it is part of.

    MSVC splits one function into several entries when the prologue state differs between
    its parts (shrink-wrapped or cold code); the later parts carry ``UNW_FLAG_CHAININFO`` and
    point back at the entry of the function. ``function`` is that root entry's begin, and
    equals ``begin`` for an entry that starts a function.
    """

    begin: int
    end: int
    function: int

    @property
    def chained(self) -> bool:
        return self.function != self.begin


@dataclass(frozen=True, slots=True)
class CodeImage:
    arch: Arch
    bits: int
    image_base: int
    segments: tuple[Segment, ...]
    entry_points: tuple[int, ...]
    symbol_functions: tuple[SymbolFunction, ...]  # from .symtab/.dynsym/COFF symbols
    export_addresses: tuple[int, ...]
    # Function starts from unwind data: PE .pdata RUNTIME_FUNCTION begins of entries that start
    # a function (chained entries are parts of another one), ELF .eh_frame FDEs.
    exception_starts: tuple[int, ...]
    # Address of an import slot (PE IAT entry) or stub (ELF PLT entry) -> "library!name".
    import_slots: Mapping[int, str] = field(default_factory=dict)
    # Every PE .pdata entry with its extent and owning function (see UnwindRange), by begin.
    exception_ranges: tuple[UnwindRange, ...] = ()
    # ELF: the address i386 PIC code holds in its GOT register (_GLOBAL_OFFSET_TABLE_, which
    # the ABI puts at DT_PLTGOT / .got.plt); jump tables there are relative to it.
    got_address: int | None = None
    # ELF: [start, end) of the .plt, .plt.sec and .plt.got sections, which hold import stubs
    # and the lazy-binding resolver stub, never functions. Images are mapped by program
    # segment, so section names are not otherwise visible to recovery.
    plt_ranges: tuple[tuple[int, int], ...] = ()
