"""ELF metadata for toolchain evidence: ABI, type, interpreter, needed libraries, build id,
``.comment`` compiler strings, sections, imports and exports."""

from __future__ import annotations

import lief

from earmark.extract.elf_image import elf_exports, elf_imports
from earmark.extract.metadata import clean_text, shannon_entropy
from earmark.model.sample import ElfInfo, Export, Import, Section

# .comment holds one string per compiler/linker that touched the file; real files have 1-5.
MAX_COMMENT_STRINGS = 32
# Bytes of .comment read; real ones are under 200 bytes.
MAX_COMMENT_BYTES = 64 * 1024
# Needed libraries kept; large programs link ~100.
MAX_NEEDED_LIBRARIES = 1024

_SECTION_FLAGS = (
    (lief.ELF.Section.FLAGS.ALLOC, "read"),
    (lief.ELF.Section.FLAGS.WRITE, "write"),
    (lief.ELF.Section.FLAGS.EXECINSTR, "execute"),
)


def elf_sections(binary: lief.ELF.Binary, data: bytes) -> tuple[Section, ...]:
    sections: list[Section] = []
    for section in binary.sections:
        if section.type == lief.ELF.Section.TYPE.SHT_NULL_:
            continue
        offset, size = int(section.offset), int(section.size)
        present = section.type != lief.ELF.Section.TYPE.NOBITS
        content = data[offset : offset + size] if present else b""
        flags = tuple(name for flag, name in _SECTION_FLAGS if section.has(flag))
        if section.type == lief.ELF.Section.TYPE.NOBITS:
            flags += ("uninitialized_data",)
        elif section.has(lief.ELF.Section.FLAGS.EXECINSTR):
            flags += ("code",)
        sections.append(
            Section(
                name=clean_text(section.name, 64),
                virtual_address=int(section.virtual_address),
                virtual_size=size,
                raw_offset=offset if present else 0,
                raw_size=len(content),
                entropy=shannon_entropy(content),
                flags=flags,
            )
        )
    return tuple(sections)


def elf_import_list(binary: lief.ELF.Binary) -> tuple[Import, ...]:
    return tuple(
        Import(library, name, address)
        for library, name, address in sorted(elf_imports(binary), key=lambda item: item[2])
    )


def elf_export_list(binary: lief.ELF.Binary) -> tuple[Export, ...]:
    return tuple(Export(name, address, None) for name, address in elf_exports(binary))


def elf_info(binary: lief.ELF.Binary) -> ElfInfo:
    header = binary.header
    return ElfInfo(
        os_abi=str(header.identity_os_abi).rsplit(".", 1)[-1],
        elf_type=str(header.file_type).rsplit(".", 1)[-1],
        interpreter=clean_text(binary.interpreter) if binary.has_interpreter else None,
        needed=tuple(clean_text(name) for name in list(binary.libraries)[:MAX_NEEDED_LIBRARIES]),
        build_id=_build_id(binary),
        comment=_comment_strings(binary),
    )


def _build_id(binary: lief.ELF.Binary) -> str | None:
    for note in binary.notes:
        if note.type == lief.ELF.Note.TYPE.GNU_BUILD_ID:
            # A GNU build id is 16 (md5) or 20 (sha1) bytes; cap hostile ones.
            return bytes(note.description)[:64].hex()
    return None


def _comment_strings(binary: lief.ELF.Binary) -> tuple[str, ...]:
    section = binary.get_section(".comment")
    if section is None or section.type == lief.ELF.Section.TYPE.NOBITS:
        return ()
    raw = bytes(section.content)[:MAX_COMMENT_BYTES]
    strings = dict.fromkeys(clean_text(part) for part in raw.split(b"\0") if part.strip())
    return tuple(strings)[:MAX_COMMENT_STRINGS]
