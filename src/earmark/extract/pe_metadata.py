"""PE metadata for toolchain evidence: Rich header, PDB, imphash, signer, version info."""

from __future__ import annotations

import hashlib
import struct

import lief

from earmark.extract.metadata import clean_text, shannon_entropy
from earmark.extract.pe_image import PeHeader, pe_exports, pe_imports
from earmark.model.sample import Export, Import, PeInfo, RichEntry, RichHeader, Section, Signer

# Rich headers carry one 8-byte entry per (product, build) pair; MSVC links rarely exceed ~60.
MAX_RICH_ENTRIES = 512
# VS_VERSIONINFO strings kept; real files have ~12 (CompanyName, FileVersion, ...).
MAX_VERSION_STRINGS = 64
# Distinct resource languages kept; a real file has one to a few.
MAX_RESOURCE_LANGUAGES = 32
# Resource tree nodes walked when collecting languages; hostile trees can loop or be huge.
MAX_RESOURCE_NODES = 10_000

_SECTION_FLAGS = (
    (lief.PE.Section.CHARACTERISTICS.MEM_READ, "read"),
    (lief.PE.Section.CHARACTERISTICS.MEM_WRITE, "write"),
    (lief.PE.Section.CHARACTERISTICS.MEM_EXECUTE, "execute"),
    (lief.PE.Section.CHARACTERISTICS.CNT_CODE, "code"),
    (lief.PE.Section.CHARACTERISTICS.CNT_INITIALIZED_DATA, "initialized_data"),
    (lief.PE.Section.CHARACTERISTICS.CNT_UNINITIALIZED_DATA, "uninitialized_data"),
    (lief.PE.Section.CHARACTERISTICS.MEM_DISCARDABLE, "discardable"),
)


def pe_sections(binary: lief.PE.Binary, header: PeHeader, data: bytes) -> tuple[Section, ...]:
    sections: list[Section] = []
    for parsed, raw in zip(binary.sections, header.sections, strict=False):
        characteristics = int(parsed.characteristics)
        flags = tuple(name for flag, name in _SECTION_FLAGS if characteristics & int(flag))
        content = data[raw.raw_offset : raw.raw_offset + raw.raw_size]
        sections.append(
            Section(
                name=clean_text(_long_section_name(binary, str(parsed.name)), 64),
                virtual_address=header.image_base + raw.virtual_address,
                virtual_size=raw.virtual_size,
                raw_offset=raw.raw_offset,
                raw_size=raw.raw_size,
                entropy=shannon_entropy(content),
                flags=flags,
            )
        )
    return tuple(sections)


def _long_section_name(binary: lief.PE.Binary, name: str) -> str:
    """Resolve "/4"-style names (mingw debug sections) through the COFF string table."""
    if name.startswith("/") and name[1:].isdigit():
        entry = binary.find_coff_string(int(name[1:]))
        if entry is not None:
            return str(entry.string)
    return name


def pe_import_list(binary: lief.PE.Binary, image_base: int) -> tuple[Import, ...]:
    return tuple(
        Import(library, name, image_base + rva) for library, name, rva in pe_imports(binary)
    )


def pe_export_list(binary: lief.PE.Binary, image_base: int) -> tuple[Export, ...]:
    return tuple(
        Export(name, image_base + rva, ordinal) for name, rva, ordinal in pe_exports(binary)
    )


def _subsystem_name(value: int) -> str:
    try:
        return str(lief.PE.OptionalHeader.SUBSYSTEM(value).name)
    except ValueError:  # not a documented subsystem: keep the number for the analyst
        return f"0x{value:04x}"


def pe_info(binary: lief.PE.Binary, header: PeHeader, data: bytes) -> PeInfo:
    optional = binary.optional_header
    codeview = binary.codeview_pdb
    return PeInfo(
        timestamp=int(binary.header.time_date_stamps),
        linker_version=f"{optional.major_linker_version}.{optional.minor_linker_version}",
        os_version=(
            f"{optional.major_operating_system_version}.{optional.minor_operating_system_version}"
        ),
        subsystem=_subsystem_name(header.subsystem),
        characteristics=tuple(
            str(flag).rsplit(".", 1)[-1] for flag in binary.header.characteristics_list
        ),
        # PEFILE mode: the value pefile and VirusTotal publish, so it can be searched for.
        imphash=_imphash(binary),
        rich_header=parse_rich_header(data),
        pdb_path=clean_text(codeview.filename) if codeview is not None else None,
        pdb_guid=clean_text(codeview.guid, 64) if codeview is not None else None,
        pdb_age=int(codeview.age) if codeview is not None else None,
        signers=_signers(binary),
        version_info=_version_strings(binary),
        resource_languages=_resource_languages(binary),
    )


def _imphash(binary: lief.PE.Binary) -> str | None:
    if not binary.has_imports:
        return None
    # PEFILE mode: the value pefile and VirusTotal publish, so it can be searched for.
    return lief.PE.get_imphash(binary, lief.PE.IMPHASH_MODE.PEFILE) or None


def parse_rich_header(data: bytes) -> RichHeader | None:
    """Decode the Rich header between the DOS stub and the PE header, and check its key.

    Done on raw bytes because LIEF 1.0 decodes the entries but does not say whether the stored
    key matches the checksum, which is the forgery signal we want.
    """
    if len(data) < 0x40:
        return None
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    stub = data[: min(pe_offset, len(data))]
    rich_at = stub.rfind(b"Rich", 0x80)
    if rich_at < 0 or rich_at + 8 > len(stub):
        return None
    (key,) = struct.unpack_from("<I", stub, rich_at + 4)
    # Walk back over XOR-ed dwords until the decoded "DanS" start marker.
    dans_marker = struct.unpack("<I", b"DanS")[0]
    start = rich_at - 4
    while start >= 0x80 and (struct.unpack_from("<I", stub, start)[0] ^ key) != dans_marker:
        start -= 4
        if rich_at - start > 16 + 8 * MAX_RICH_ENTRIES:
            return None
    if start < 0x80:
        return None
    # After "DanS" come three zero (padding) dwords, then (comp_id, count) pairs.
    entries: list[RichEntry] = []
    for offset in range(start + 16, rich_at, 8):
        comp_id, count = (value ^ key for value in struct.unpack_from("<II", stub, offset))
        entries.append(RichEntry(product_id=comp_id >> 16, build=comp_id & 0xFFFF, count=count))
    return RichHeader(
        key=key, entries=tuple(entries), checksum_valid=rich_checksum(stub, start, entries) == key
    )


def rich_checksum(data: bytes, rich_start: int, entries: list[RichEntry]) -> int:
    """The linker's checksum: the DanS offset, plus every byte of the DOS header and stub before
    it rotated left by its position (e_lfanew excluded), plus each comp_id rotated by its count."""
    checksum = rich_start
    for position in range(rich_start):
        if 0x3C <= position < 0x40:
            continue
        checksum += _rotate_left(data[position], position)
    for entry in entries:
        checksum += _rotate_left((entry.product_id << 16) | entry.build, entry.count)
    return checksum & 0xFFFFFFFF


def _rotate_left(value: int, shift: int) -> int:
    shift %= 32
    return ((value << shift) | (value >> (32 - shift))) & 0xFFFFFFFF


def _signers(binary: lief.PE.Binary) -> tuple[Signer, ...]:
    signers: list[Signer] = []
    for signature in binary.signatures:
        for signer in signature.signers:
            certificate = signer.cert
            if certificate is None:
                continue
            signers.append(
                Signer(
                    subject=clean_text(certificate.subject),
                    issuer=clean_text(certificate.issuer),
                    serial=bytes(certificate.serial_number).hex(),
                    sha1=hashlib.sha1(bytes(certificate.raw)).hexdigest(),
                )
            )
    return tuple(signers)


def _version_strings(binary: lief.PE.Binary) -> tuple[tuple[str, str], ...]:
    manager = binary.resources_manager if binary.has_resources else None
    if not isinstance(manager, lief.PE.ResourcesManager) or not manager.has_version:
        return ()
    pairs: list[tuple[str, str]] = []
    for version in manager.version:
        string_info = version.string_file_info
        if string_info is None:
            continue
        for table in string_info.children:
            for entry in table.entries:
                pairs.append((clean_text(entry.key, 64), clean_text(entry.value)))
    return tuple(pairs[:MAX_VERSION_STRINGS])


def _resource_languages(binary: lief.PE.Binary) -> tuple[str, ...]:
    """Language ids of resource data leaves, as hex LCIDs ("0x0409" = en-US)."""
    if not binary.has_resources or binary.resources is None:
        return ()
    languages: dict[str, None] = {}
    pending = [binary.resources]
    visited = 0
    while pending and visited < MAX_RESOURCE_NODES and len(languages) < MAX_RESOURCE_LANGUAGES:
        node = pending.pop()
        visited += 1
        if node.is_data:
            languages[f"0x{int(node.id) & 0xFFFF:04x}"] = None
        else:
            pending.extend(node.childs)
    return tuple(sorted(languages))
