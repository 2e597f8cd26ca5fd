"""ELF: header sanity checks on raw bytes, then the ``CodeImage`` built from LIEF's parse.

Segments come from the program headers we checked ourselves (only bytes present in the file);
LIEF supplies symbols, init/fini arrays and relocations. ``.eh_frame_hdr`` and PLT stubs are
decoded here because LIEF 1.0 does not expose FDE start addresses or stub-to-symbol mapping
(``Binary.functions`` mixes all sources without saying which).
"""

from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass

import lief

from earmark.config import Limits
from earmark.errors import MalformedFileError, UnsupportedFormatError
from earmark.extract.image import CodeImage, Segment, SymbolFunction
from earmark.extract.metadata import clean_text
from earmark.model.sample import Arch

_MACHINES: dict[tuple[int, int], tuple[Arch, int]] = {(1, 3): ("x86", 32), (2, 62): ("x86_64", 64)}
_PT_LOAD = 1
_PF_X = 1
_SHT_NOBITS = 8
_SHF_ALLOC = 0x2
_SHF_EXECINSTR = 0x4
_HEADER_FORMATS = {32: "<HHIIIIIHHHHHH", 64: "<HHIQQQIHHHHHH"}
_PROGRAM_FORMATS = {32: "<IIIIIIII", 64: "<IIQQQQQQ"}
_SECTION_FORMATS = {32: "<IIIIIIIIII", 64: "<IIQQQQIIQQ"}
# PLT stubs: optional endbr32/64, optional bnd prefix, then jmp [rip/abs+disp32] (ff 25) or,
# in i386 PIC code, jmp [ebx+disp32] (ff a3). The displacement locates the GOT slot.
_PLT_JUMP = re.compile(rb"(?:\xf3\x0f\x1e[\xfa\xfb])?\xf2?\xff([\x25\xa3])(.{4})", re.DOTALL)
_PLT_SECTIONS = (".plt", ".plt.sec", ".plt.got")
# DWARF pointer encodings used by .eh_frame_hdr; the search table is datarel|sdata4 in every
# toolchain we know (GNU ld, gold, lld, mold), so only that is decoded.
_DW_EH_PE_DATAREL_SDATA4 = 0x3B
_DW_EH_PE_UDATA4 = 0x03


@dataclass(frozen=True, slots=True)
class ElfRange:
    name: str
    virtual_address: int
    offset: int
    file_size: int  # clipped to the bytes present in the file
    memory_size: int
    executable: bool


@dataclass(frozen=True, slots=True)
class ElfHeader:
    arch: Arch
    bits: int
    loads: tuple[ElfRange, ...]
    sections: tuple[ElfRange, ...]
    warnings: tuple[str, ...]


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple[int, ...]:
    if offset < 0 or offset + struct.calcsize(fmt) > len(data):
        raise MalformedFileError(f"the file ends inside the {what}")
    return struct.unpack_from(fmt, data, offset)


def check_elf_header(data: bytes, limits: Limits) -> ElfHeader:
    """Validate identity, program headers and section headers before LIEF sees the file."""
    if len(data) < 20:
        raise MalformedFileError("the file ends inside the ELF identity")
    elf_class, encoding = data[4], data[5]
    if encoding != 1:
        raise UnsupportedFormatError("big-endian or unknown ELF data encoding")
    (machine,) = struct.unpack_from("<H", data, 18)
    if (elf_class, machine) not in _MACHINES:
        raise UnsupportedFormatError(
            f"ELF class {elf_class} machine {machine} is not x86 (ELF32) or x86-64 (ELF64)"
        )
    arch, bits = _MACHINES[(elf_class, machine)]
    fields = _unpack(_HEADER_FORMATS[bits], data, 16, "ELF header")
    program_offset, section_offset = fields[4], fields[5]
    program_entry_size, program_count = fields[8], fields[9]
    section_entry_size, section_count = fields[10], fields[11]
    for count, what in ((program_count, "program headers"), (section_count, "sections")):
        if count > limits.max_sections:
            raise MalformedFileError(
                f"{count} {what}, over the limit of {limits.max_sections} (Limits.max_sections)"
            )
    warnings: list[str] = []
    loads = _read_loads(data, bits, program_offset, program_entry_size, program_count, limits)
    sections: tuple[ElfRange, ...] = ()
    section_format = _SECTION_FORMATS[bits]
    if section_count and (
        section_entry_size != struct.calcsize(section_format)
        or section_offset + section_count * section_entry_size > len(data)
    ):
        # The kernel never reads section headers, so code still runs; only symbols are lost.
        warnings.append("the section header table is damaged or cut off; sections ignored")
    elif section_count:
        sections = _read_sections(data, bits, section_offset, section_count, limits, warnings)
    return ElfHeader(arch, bits, loads, sections, tuple(warnings))


def _read_loads(
    data: bytes, bits: int, offset: int, entry_size: int, count: int, limits: Limits
) -> tuple[ElfRange, ...]:
    program_format = _PROGRAM_FORMATS[bits]
    if count and entry_size != struct.calcsize(program_format):
        raise MalformedFileError(f"program header entry size {entry_size} is wrong for ELF{bits}")
    loads: list[ElfRange] = []
    for index in range(count):
        values = _unpack(program_format, data, offset + index * entry_size, "program headers")
        if bits == 64:
            kind, flags, file_offset, address, _, file_size, memory_size, _ = values
        else:
            kind, file_offset, address, _, file_size, memory_size, flags, _ = values
        if kind != _PT_LOAD:
            continue
        if memory_size > limits.max_virtual_size:
            raise MalformedFileError(
                f"a loadable segment of 0x{memory_size:x} bytes is over Limits.max_virtual_size"
            )
        if file_size > memory_size:
            raise MalformedFileError("a loadable segment has more file bytes than memory bytes")
        if file_offset > len(data):
            raise MalformedFileError("a loadable segment starts past the end of the file")
        clipped = min(file_size, len(data) - file_offset)
        loads.append(
            ElfRange(
                f"LOAD{len(loads)}", address, file_offset, clipped, memory_size, bool(flags & _PF_X)
            )
        )
    ordered = sorted(loads, key=lambda load: load.virtual_address)
    for previous, current in itertools.pairwise(ordered):
        if current.virtual_address < previous.virtual_address + previous.memory_size:
            # The kernel maps later segments over earlier ones; no linker emits this.
            raise MalformedFileError("loadable segments overlap in memory")
    return tuple(loads)


def _read_sections(
    data: bytes, bits: int, offset: int, count: int, limits: Limits, warnings: list[str]
) -> tuple[ElfRange, ...]:
    section_format = _SECTION_FORMATS[bits]
    size = struct.calcsize(section_format)
    sections: list[ElfRange] = []
    for index in range(count):
        _, kind, flags, address, file_offset, file_size = struct.unpack_from(
            section_format, data, offset + index * size
        )[:6]
        if kind == _SHT_NOBITS or kind == 0:
            continue
        if file_size > limits.max_virtual_size:
            raise MalformedFileError(f"section {index} of 0x{file_size:x} bytes is absurdly large")
        if file_offset + file_size > len(data):
            warnings.append(f"section {index} is cut short by the end of the file")
            file_size = max(0, len(data) - file_offset)
        executable = bool(flags & _SHF_EXECINSTR)
        allocated = bool(flags & _SHF_ALLOC)
        sections.append(
            ElfRange(
                f"section{index}",
                address if allocated else 0,
                file_offset,
                file_size,
                file_size,
                executable,
            )
        )
    ordered = sorted((s for s in sections if s.file_size), key=lambda s: s.offset)
    for previous, current in itertools.pairwise(ordered):
        if current.offset < previous.offset + previous.file_size:
            warnings.append("sections overlap in the file")
            break
    return tuple(sections)


def build_elf_image(
    binary: lief.ELF.Binary, header: ElfHeader, data: bytes
) -> tuple[CodeImage, tuple[str, ...]]:
    warnings: list[str] = []
    ranges = header.loads
    if not ranges:
        # Relocatable objects have no program headers; their allocated sections are the code.
        ranges = tuple(s for s in header.sections if s.executable)
        warnings.append("no loadable segments: addresses are section addresses (object file)")
    segments = tuple(
        Segment(r.name, r.virtual_address, data[r.offset : r.offset + r.file_size], r.executable)
        for r in ranges
        if r.file_size
    )
    entry_points = [int(binary.header.entrypoint)]
    for function in (*binary.ctor_functions, *binary.dtor_functions):
        entry_points.append(int(function.address))
    valid_entries = [a for a in entry_points if a and a != (1 << header.bits) - 1]
    exception_starts, eh_warning = _eh_frame_starts(binary, header)
    if eh_warning:
        warnings.append(eh_warning)
    image = CodeImage(
        arch=header.arch,
        bits=header.bits,
        image_base=int(binary.imagebase),
        segments=segments,
        entry_points=tuple(dict.fromkeys(valid_entries)),
        symbol_functions=_symbol_functions(binary),
        export_addresses=tuple(sorted({address for _, address in elf_exports(binary)})),
        exception_starts=exception_starts,
        import_slots={
            address: f"{library}!{name}" for library, name, address in elf_imports(binary)
        },
        got_address=_got_address(binary),
        plt_ranges=_plt_ranges(binary),
    )
    return image, tuple(warnings)


def _got_address(binary: lief.ELF.Binary) -> int | None:
    """_GLOBAL_OFFSET_TABLE_: DT_PLTGOT, or the .got.plt section when there is no dynamic entry.

    i386 PIC code loads this address into its GOT register (``__x86.get_pc_thunk``) and
    addresses jump tables and data relative to it; the ABI places it at the start of
    .got.plt, which is what DT_PLTGOT names.
    """
    got_entry = binary.get(lief.ELF.DynamicEntry.TAG.PLTGOT)
    if got_entry is not None and got_entry.value:
        return int(got_entry.value)
    section = binary.get_section(".got.plt")
    if section is not None and section.virtual_address:
        return int(section.virtual_address)
    return None


def _plt_ranges(binary: lief.ELF.Binary) -> tuple[tuple[int, int], ...]:
    """[start, end) of the PLT sections (absent when the section headers were removed)."""
    found: list[tuple[int, int]] = []
    for section_name in _PLT_SECTIONS:
        section = binary.get_section(section_name)
        if section is not None and section.virtual_address and section.size:
            start = int(section.virtual_address)
            found.append((start, start + int(section.size)))
    return tuple(sorted(found))


def _symbol_functions(binary: lief.ELF.Binary) -> tuple[SymbolFunction, ...]:
    found: dict[int, SymbolFunction] = {}
    function_types = (lief.ELF.Symbol.TYPE.FUNC, lief.ELF.Symbol.TYPE.GNU_IFUNC)
    for symbol in (*binary.symtab_symbols, *binary.dynamic_symbols):
        if symbol.type not in function_types or not symbol.value or symbol.shndx == 0:
            continue
        address = int(symbol.value)
        found.setdefault(
            address, SymbolFunction(clean_text(symbol.name), address, int(symbol.size))
        )
    return tuple(sorted(found.values(), key=lambda function: function.address))


def elf_exports(binary: lief.ELF.Binary) -> list[tuple[str, int]]:
    """(name, address) of defined global/weak dynamic FUNC symbols with default visibility."""
    exported: dict[tuple[str, int], None] = {}
    for symbol in binary.dynamic_symbols:
        if (
            symbol.type == lief.ELF.Symbol.TYPE.FUNC
            and symbol.exported
            and symbol.value
            and symbol.shndx != 0
        ):
            exported[(clean_text(symbol.name), int(symbol.value))] = None
    return list(exported)


def _library_of_versions(binary: lief.ELF.Binary) -> dict[str, str]:
    """Version name (GLIBC_2.2.5) -> library (libc.so.6), from the version requirements."""
    libraries: dict[str, str] = {}
    for requirement in binary.symbols_version_requirement:
        for auxiliary in requirement.get_auxiliary_symbols():
            libraries[str(auxiliary.name)] = clean_text(requirement.name)
    return libraries


def elf_imports(binary: lief.ELF.Binary) -> list[tuple[str, str, int]]:
    """(library, name, address): the PLT stub address when one is found, else the GOT slot."""
    needed = [clean_text(name) for name in binary.libraries]
    version_libraries = _library_of_versions(binary)
    slot_names: dict[int, tuple[str, str]] = {}
    for relocation in (*binary.pltgot_relocations, *binary.dynamic_relocations):
        symbol = relocation.symbol
        if symbol is None or not symbol.name or symbol.shndx != 0:
            continue
        library = needed[0] if len(needed) == 1 else "unknown"
        if symbol.has_version and symbol.symbol_version.has_auxiliary_version:
            version = str(symbol.symbol_version.symbol_version_auxiliary.name)
            library = version_libraries.get(version, library)
        slot_names.setdefault(int(relocation.address), (library, clean_text(symbol.name)))
    stubs = _plt_stubs(binary, set(slot_names))
    found: dict[tuple[str, str], int] = {}
    for slot, (library, name) in slot_names.items():
        found.setdefault((library, name), stubs.get(slot, slot))
    return [(library, name, address) for (library, name), address in found.items()]


def _plt_stubs(binary: lief.ELF.Binary, slots: set[int]) -> dict[int, int]:
    """GOT slot -> address of the PLT stub that jumps through it."""
    got_entry = binary.get(lief.ELF.DynamicEntry.TAG.PLTGOT)
    got_base = int(got_entry.value) if got_entry is not None else 0
    stubs: dict[int, int] = {}
    for section_name in _PLT_SECTIONS:
        section = binary.get_section(section_name)
        if section is None:
            continue
        content = bytes(section.content)
        for match in _PLT_JUMP.finditer(content):
            (displacement,) = struct.unpack("<i", match.group(2))
            stub = int(section.virtual_address) + match.start()
            if match.group(1) == b"\xa3":
                slot = got_base + displacement
            elif binary.header.identity_class == lief.ELF.Header.CLASS.ELF64:
                slot = stub + (match.end() - match.start()) + displacement
            else:
                slot = displacement & 0xFFFFFFFF
            if slot in slots:
                stubs.setdefault(slot, stub)
    return stubs


def _eh_frame_starts(binary: lief.ELF.Binary, header: ElfHeader) -> tuple[tuple[int, ...], str]:
    """Function starts from the .eh_frame_hdr binary-search table (one entry per FDE)."""
    section = binary.get_section(".eh_frame_hdr")
    if section is None:
        return (), ""
    content = bytes(section.content)
    if len(content) < 12 or content[0] != 1:
        return (), "unreadable .eh_frame_hdr; no unwind function starts"
    frame_pointer_encoding, count_encoding, table_encoding = content[1], content[2], content[3]
    pointer_size = {0x03: 4, 0x0B: 4, 0x04: 8, 0x0C: 8}.get(frame_pointer_encoding & 0x0F)
    if (
        pointer_size is None
        or count_encoding != _DW_EH_PE_UDATA4
        or table_encoding != _DW_EH_PE_DATAREL_SDATA4
    ):
        return (), "unsupported .eh_frame_hdr encoding; no unwind function starts"
    table_offset = 4 + pointer_size + 4
    (count,) = struct.unpack_from("<I", content, 4 + pointer_size)
    # Each FDE is one function (or a cold part of one); more entries than bytes/8 is a lie.
    count = min(count, (len(content) - table_offset) // 8)
    base = int(section.virtual_address)
    mask = (1 << header.bits) - 1
    starts = {
        (base + location) & mask
        for location, _ in struct.iter_unpack(
            "<ii", content[table_offset : table_offset + 8 * count]
        )
    }
    return tuple(sorted(starts)), ""
