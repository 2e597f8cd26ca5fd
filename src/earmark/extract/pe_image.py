"""PE: header sanity checks on raw bytes, then the ``CodeImage`` built from LIEF's parse.

The checks read the headers with ``struct`` (not pefile or LIEF) because they must run before
any parser: their job is to refuse geometry a parser could choke or spend minutes on.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

import lief

from earmark.config import Limits
from earmark.errors import MalformedFileError, UnsupportedFormatError
from earmark.extract.image import CodeImage, Segment, SymbolFunction, UnwindRange
from earmark.extract.metadata import clean_text
from earmark.model.sample import Arch

_MACHINES: dict[int, tuple[Arch, int]] = {0x14C: ("x86", 32), 0x8664: ("x86_64", 64)}
_OPTIONAL_MAGIC_BITS = {0x10B: 32, 0x20B: 64}
_SECTION_HEADER_SIZE = 40
_FILE_HEADER_SIZE = 20
# TLS callback arrays are a handful of pointers in real code; a long array is a parser trap.
MAX_TLS_CALLBACKS = 64
# Links followed from a chained .pdata entry to the entry of its function. MSVC chains one
# level deep in practice (a part points at the function's first entry); a longer chain, or a
# loop, in a hostile file ends at this depth.
MAX_UNWIND_CHAIN_DEPTH = 32
_IMAGE_SCN_CNT_CODE = 0x20
_IMAGE_SCN_MEM_EXECUTE = 0x20000000


@dataclass(frozen=True, slots=True)
class PeSectionHeader:
    name: str
    virtual_address: int  # RVA
    virtual_size: int
    raw_offset: int
    raw_size: int  # clipped to the bytes present in the file
    executable: bool


@dataclass(frozen=True, slots=True)
class PeHeader:
    arch: Arch
    bits: int
    image_base: int
    subsystem: int  # raw value: LIEF's enum getter fails on values it does not know
    sections: tuple[PeSectionHeader, ...]
    warnings: tuple[str, ...]


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    if offset < 0 or offset + size > len(data):
        raise MalformedFileError(f"the file ends inside the {what}")
    return struct.unpack_from(fmt, data, offset)


def check_pe_header(data: bytes, limits: Limits) -> PeHeader:
    """Validate DOS/PE/section headers; refuse what the Windows loader would refuse."""
    (pe_offset,) = _unpack("<I", data, 0x3C, "DOS header")
    if pe_offset + 4 > len(data):
        raise MalformedFileError("the PE header offset points past the end of the file")
    if data[pe_offset : pe_offset + 4] != b"PE\0\0":
        raise UnsupportedFormatError("an MZ file without a PE header (DOS, NE or LE executable)")
    machine, section_count, _, _, _, optional_size, _ = _unpack(
        "<HHIIIHH", data, pe_offset + 4, "COFF file header"
    )
    if machine not in _MACHINES:
        raise UnsupportedFormatError(f"PE machine 0x{machine:04x} is not x86 or x86-64")
    arch, bits = _MACHINES[machine]
    if section_count > limits.max_sections:
        raise MalformedFileError(
            f"{section_count} sections, over the limit of {limits.max_sections} "
            "(Limits.max_sections)"
        )
    optional_offset = pe_offset + 4 + _FILE_HEADER_SIZE
    (magic,) = _unpack("<H", data, optional_offset, "optional header")
    if magic not in _OPTIONAL_MAGIC_BITS:
        raise MalformedFileError(f"unknown optional header magic 0x{magic:04x}")
    if _OPTIONAL_MAGIC_BITS[magic] != bits:
        raise MalformedFileError(f"the optional header does not match the {bits}-bit machine")
    if bits == 64:
        (image_base,) = _unpack("<Q", data, optional_offset + 24, "optional header")
    else:
        (image_base,) = _unpack("<I", data, optional_offset + 28, "optional header")
    (size_of_image,) = _unpack("<I", data, optional_offset + 56, "optional header")
    (subsystem,) = _unpack("<H", data, optional_offset + 68, "optional header")
    if size_of_image > limits.max_virtual_size:
        raise MalformedFileError(
            f"SizeOfImage 0x{size_of_image:x} is over Limits.max_virtual_size "
            f"(0x{limits.max_virtual_size:x})"
        )
    table_offset = optional_offset + optional_size
    if table_offset + section_count * _SECTION_HEADER_SIZE > len(data):
        raise MalformedFileError("the section table runs past the end of the file")
    warnings: list[str] = []
    sections = tuple(
        _read_section(data, table_offset + index * _SECTION_HEADER_SIZE, limits, warnings)
        for index in range(section_count)
    )
    _check_overlaps(sections, warnings)
    return PeHeader(arch, bits, image_base, subsystem, sections, tuple(warnings))


def _read_section(data: bytes, offset: int, limits: Limits, warnings: list[str]) -> PeSectionHeader:
    raw_name = data[offset : offset + 8].split(b"\0", 1)[0]
    name = raw_name.decode("latin-1")
    virtual_size, virtual_address, raw_size, raw_offset = struct.unpack_from(
        "<IIII", data, offset + 8
    )
    (characteristics,) = struct.unpack_from("<I", data, offset + 36)
    if virtual_size > limits.max_virtual_size:
        raise MalformedFileError(
            f"section {name!r} has virtual size 0x{virtual_size:x}, over Limits.max_virtual_size"
        )
    if raw_size and raw_offset >= len(data):
        raise MalformedFileError(f"section {name!r} starts past the end of the file")
    if raw_offset + raw_size > len(data):
        # The Windows loader refuses this, but a truncated download still has useful code;
        # analyse the bytes that exist and say so.
        warnings.append(f"section {name!r} is cut short by the end of the file")
        raw_size = len(data) - raw_offset
    executable = bool(characteristics & (_IMAGE_SCN_CNT_CODE | _IMAGE_SCN_MEM_EXECUTE))
    return PeSectionHeader(name, virtual_address, virtual_size, raw_offset, raw_size, executable)


def _check_overlaps(sections: tuple[PeSectionHeader, ...], warnings: list[str]) -> None:
    by_address = sorted(sections, key=lambda section: section.virtual_address)
    for previous, current in itertools.pairwise(by_address):
        span = previous.virtual_size or previous.raw_size
        if current.virtual_address < previous.virtual_address + span:
            # Windows refuses images whose sections overlap in memory; no valid PE does this.
            raise MalformedFileError(
                f"sections {previous.name!r} and {current.name!r} overlap in memory"
            )
    by_offset = sorted((s for s in sections if s.raw_size), key=lambda s: s.raw_offset)
    for previous, current in itertools.pairwise(by_offset):
        if current.raw_offset < previous.raw_offset + previous.raw_size:
            # The loader copes (the same bytes are mapped twice); packers do it on purpose.
            warnings.append(f"sections {previous.name!r} and {current.name!r} share file bytes")


def build_pe_image(
    binary: lief.PE.Binary, header: PeHeader, data: bytes
) -> tuple[CodeImage, tuple[str, ...]]:
    warnings: list[str] = []
    base = header.image_base
    segments = tuple(
        Segment(
            name=section.name,
            virtual_address=base + section.virtual_address,
            data=data[section.raw_offset : section.raw_offset + _mapped_size(section)],
            executable=section.executable,
        )
        for section in header.sections
        if section.raw_size
    )
    entry_points: list[int] = []
    entry_rva = binary.optional_header.addressof_entrypoint
    if entry_rva:
        entry_points.append(base + entry_rva)
    tls = binary.tls if binary.has_tls else None
    if tls is not None:
        callbacks = list(tls.callbacks)
        if len(callbacks) > MAX_TLS_CALLBACKS:
            warnings.append(f"{len(callbacks)} TLS callbacks; kept the first {MAX_TLS_CALLBACKS}")
        entry_points.extend(int(address) for address in callbacks[:MAX_TLS_CALLBACKS] if address)
    exception_ranges = unwind_ranges(binary, base)
    image = CodeImage(
        arch=header.arch,
        bits=header.bits,
        image_base=base,
        segments=segments,
        entry_points=tuple(dict.fromkeys(entry_points)),
        symbol_functions=_coff_functions(binary, header),
        export_addresses=tuple(sorted({base + rva for _, rva, _ in pe_exports(binary)})),
        exception_starts=tuple(sorted({r.function for r in exception_ranges})),
        import_slots={base + rva: f"{library}!{name}" for library, name, rva in pe_imports(binary)},
        exception_ranges=exception_ranges,
    )
    return image, tuple(warnings)


def unwind_ranges(binary: lief.PE.Binary, base: int) -> tuple[UnwindRange, ...]:
    """Every .pdata entry with the begin of the function it belongs to, sorted by begin.

    A chained entry (``UNW_FLAG_CHAININFO``) is a later part of the function whose entry its
    UNWIND_INFO names; only entries that are no part of another one start functions.
    """
    chained_to: dict[int, int] = {}  # begin RVA -> begin RVA of the entry it chains to
    ends: dict[int, int] = {}
    for entry in binary.exceptions:
        # rva_end and unwind_info exist on x64 entries (RuntimeFunctionX64) only; other
        # machines' entries are not read (x86 PE has no .pdata).
        end = getattr(entry, "rva_end", None)
        if end is None:
            continue
        begin = int(entry.rva_start)
        ends.setdefault(begin, int(end))
        unwind = getattr(entry, "unwind_info", None)
        parent = unwind.chained if unwind is not None else None
        if parent is not None and int(parent.rva_start) != begin:
            chained_to.setdefault(begin, int(parent.rva_start))
    ranges: list[UnwindRange] = []
    for begin, end in sorted(ends.items()):
        function = begin
        for _ in range(MAX_UNWIND_CHAIN_DEPTH):
            parent_begin = chained_to.get(function)
            if parent_begin is None:
                break
            function = parent_begin
        ranges.append(UnwindRange(base + begin, base + end, base + function))
    return tuple(ranges)


def _mapped_size(section: PeSectionHeader) -> int:
    # Bytes beyond the virtual size are file padding the loader does not map.
    if section.virtual_size:
        return min(section.raw_size, section.virtual_size)
    return section.raw_size


def _coff_functions(binary: lief.PE.Binary, header: PeHeader) -> tuple[SymbolFunction, ...]:
    """Function symbols from the COFF symbol table (mingw keeps it unless stripped)."""
    found: dict[int, SymbolFunction] = {}
    for symbol in binary.symbols:
        index = symbol.section_idx - 1  # COFF section numbers are 1-based; <= 0 is special
        if not symbol.is_function or not 0 <= index < len(header.sections):
            continue
        address = header.image_base + header.sections[index].virtual_address + symbol.value
        found.setdefault(address, SymbolFunction(clean_text(str(symbol.name)), address, 0))
    return tuple(sorted(found.values(), key=lambda function: function.address))


def pe_imports(binary: lief.PE.Binary) -> list[tuple[str, str, int]]:
    """(lower-case dll, name or "#ordinal", IAT slot RVA) for every imported function."""
    found: list[tuple[str, str, int]] = []
    for library in binary.imports:
        library_name = clean_text(str(library.name)).lower()
        for entry in library.entries:
            name = f"#{entry.ordinal}" if entry.is_ordinal else clean_text(str(entry.name))
            found.append((library_name, name, int(entry.iat_address)))
    return found


def pe_exports(binary: lief.PE.Binary) -> list[tuple[str, int, int]]:
    """(name, RVA, ordinal) of exported code; forwarders point into other DLLs and are skipped."""
    export = binary.get_export() if binary.has_exports else None
    if export is None:
        return []
    return [
        (clean_text(str(entry.name)), int(entry.address), int(entry.ordinal))
        for entry in export.entries
        if not entry.is_forwarded and entry.address
    ]
