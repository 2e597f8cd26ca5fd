"""Metadata correctness on session-built PE32/PE32+/ELF32/ELF64 files, checked against an
independent computation or the toolchain's own tools; Rich header on a patched-in header and,
when the development corpus is present, on real MSVC binaries."""

from __future__ import annotations

import hashlib
import struct
import subprocess
from pathlib import Path

import lief
import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.config import DEFAULT_LIMITS
from earmark.extract import analyze_bytes, analyze_file, disasm
from earmark.extract.metadata import shannon_entropy
from earmark.extract.pe_metadata import parse_rich_header
from fixtures.build import FixtureBuilder

CORPUS_PE = Path.home() / ".cache" / "earmark-corpus" / "pe"


def _independent_imphash(path: Path) -> str:
    """The pefile/VirusTotal recipe written out: lower-case dll without extension, lower-case
    function (ordinals as ord<N>), joined by commas, MD5."""
    binary = lief.PE.parse(str(path))
    assert binary is not None
    parts = []
    for library in binary.imports:
        dll = library.name.lower()
        stem, _, extension = dll.rpartition(".")
        if extension in ("dll", "ocx", "sys"):
            dll = stem
        for entry in library.entries:
            function = f"ord{entry.ordinal}" if entry.is_ordinal else entry.name.lower()
            parts.append(f"{dll}.{function}")
    return hashlib.md5(",".join(parts).encode()).hexdigest()


@pytest.mark.parametrize("toolchain", ["mingw32", "mingw64"])
def test_pe_metadata(builder: FixtureBuilder, toolchain: str) -> None:
    build = builder.build("meta_hello.c", toolchain, "O2")
    features = analyze_file(build.stripped)
    data = build.stripped.read_bytes()
    assert features.sha256 == hashlib.sha256(data).hexdigest()
    assert features.md5 == hashlib.md5(data).hexdigest()
    assert features.size == len(data)
    assert features.tlsh is not None and features.tlsh.startswith("T1")
    pe = features.pe
    assert pe is not None and features.elf is None
    assert pe.imphash == _independent_imphash(build.stripped)
    imports = {f"{item.library}!{item.name}" for item in features.imports}
    assert {"kernel32.dll!GetTickCount", "kernel32.dll!GetModuleHandleA"} <= imports
    assert all(item.address > features.image_base for item in features.imports)
    assert pe.subsystem == "WINDOWS_CUI"
    assert "EXECUTABLE_IMAGE" in pe.characteristics
    text = next(section for section in features.sections if section.name == ".text")
    assert {"execute", "code"} <= set(text.flags)
    assert 4.0 < text.entropy < 8.0
    for section in features.sections:
        assert section.raw_offset + section.raw_size <= len(data)


def test_pe_imphash_matches_pefile_when_installed(builder: FixtureBuilder) -> None:
    pefile = pytest.importorskip("pefile")
    build = builder.build("meta_hello.c", "mingw64", "Os")
    features = analyze_file(build.stripped)
    assert features.pe is not None
    assert features.pe.imphash == pefile.PE(str(build.stripped)).get_imphash()


def test_pe_codeview_pdb_record(builder: FixtureBuilder, tmp_path: Path) -> None:
    pdb = tmp_path / "meta.pdb"
    build = builder.build("meta_hello.c", "mingw64", "O2", extra_flags=(f"-Wl,--pdb={pdb}",))
    features = analyze_file(build.unstripped)
    assert features.pe is not None
    assert features.pe.pdb_path is not None and features.pe.pdb_path.endswith("meta.pdb")
    assert features.pe.pdb_age == 1
    # GUID: the first field is little-endian in the file, as every PDB tool prints it.
    data = build.unstripped.read_bytes()
    record = data.find(b"RSDS")
    guid_bytes = data[record + 4 : record + 20]
    assert features.pe.pdb_guid is not None
    assert features.pe.pdb_guid.replace("-", "").startswith(guid_bytes[3::-1].hex())


def _insert_rich_header(data: bytes, comp_ids: list[tuple[int, int]], key_delta: int = 0) -> bytes:
    """Move the PE header down and put a Rich header (with its correct key) before it."""
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    dans_at = 0x80
    body = b"".join(struct.pack("<II", comp_id, count) for comp_id, count in comp_ids)
    checksum = dans_at
    for position in range(dans_at):
        if 0x3C <= position < 0x40:
            continue
        byte = data[position] if position < pe_offset else 0
        checksum += ((byte << (position % 32)) | (byte >> (32 - position % 32))) & 0xFFFFFFFF
    for comp_id, count in comp_ids:
        shift = count % 32
        checksum += ((comp_id << shift) | (comp_id >> (32 - shift))) & 0xFFFFFFFF
    key = (checksum + key_delta) & 0xFFFFFFFF
    plain = b"DanS" + b"\0" * 12 + body
    encoded = bytes(
        b ^ k for b, k in zip(plain, struct.pack("<I", key) * (len(plain) // 4), strict=True)
    )
    rich = encoded + b"Rich" + struct.pack("<I", key)
    new_pe_offset = dans_at + len(rich) + 8
    (size_of_optional,) = struct.unpack_from("<H", data, pe_offset + 20)
    (sections,) = struct.unpack_from("<H", data, pe_offset + 6)
    headers_end = pe_offset + 24 + size_of_optional + 40 * sections
    headers = data[pe_offset:headers_end]
    first_raw = min(
        struct.unpack_from("<I", data, pe_offset + 24 + size_of_optional + 40 * i + 20)[0]
        for i in range(sections)
        if struct.unpack_from("<I", data, pe_offset + 24 + size_of_optional + 40 * i + 20)[0]
    )
    assert new_pe_offset + len(headers) <= first_raw, "no room in the header area"
    prefix = bytearray(data[:dans_at])
    struct.pack_into("<I", prefix, 0x3C, new_pe_offset)
    block = bytes(prefix) + rich + b"\0" * 8 + headers
    return block + b"\0" * (first_raw - len(block)) + data[first_raw:]


def test_rich_header_decoded_and_checksum_checked(builder: FixtureBuilder) -> None:
    data = builder.build("meta_hello.c", "mingw64", "O2").stripped.read_bytes()
    comp_ids = [((0x0104 << 16) | 30159, 12), ((0x0105 << 16) | 30159, 3), ((0x0001 << 16), 40)]
    patched = _insert_rich_header(data, comp_ids)
    features = analyze_bytes(patched, DEFAULT_LIMITS)
    assert features.pe is not None
    rich = features.pe.rich_header
    assert rich is not None and rich.checksum_valid
    decoded = [(e.product_id, e.build, e.count) for e in rich.entries]
    assert decoded == [(0x104, 30159, 12), (0x105, 30159, 3), (1, 0, 40)]
    forged = parse_rich_header(_insert_rich_header(data, comp_ids, key_delta=1))
    assert forged is not None and not forged.checksum_valid


@pytest.mark.skipif(not CORPUS_PE.exists(), reason="development corpus not present")
def test_rich_header_on_real_msvc_binaries_matches_pefile() -> None:
    pefile = pytest.importorskip("pefile")
    files = sorted(CORPUS_PE.rglob("*.pyd"))[:15]
    assert files
    for path in files:
        rich = parse_rich_header(path.read_bytes())
        reference = pefile.PE(str(path), fast_load=True).parse_rich_header()
        assert rich is not None and reference is not None
        assert rich.checksum_valid and rich.key == reference["checksum"]
        values = reference["values"]
        pairs = list(zip(values[::2], values[1::2], strict=True))
        assert [((e.product_id << 16) | e.build, e.count) for e in rich.entries] == pairs


@pytest.mark.parametrize(("toolchain", "bits"), [("gcc64", 64), ("gcc32", 32), ("clang64", 64)])
def test_elf_metadata(builder: FixtureBuilder, toolchain: str, bits: int) -> None:
    build = builder.build("meta_hello.c", toolchain, "O2")
    features = analyze_file(build.stripped)
    elf = features.elf
    assert elf is not None and features.pe is None and features.bits == bits
    assert elf.elf_type == "DYN"
    assert elf.interpreter is not None and "ld-linux" in elf.interpreter
    assert "libc.so.6" in elf.needed
    notes = subprocess.run(
        ["readelf", "-n", str(build.stripped)], capture_output=True, text=True, check=True
    ).stdout
    assert elf.build_id is not None and f"Build ID: {elf.build_id}" in notes
    assert any(("GCC" in line) or ("clang" in line) for line in elf.comment)
    imports = {item.name for item in features.imports}
    assert "printf" in imports  # clang -O2 folds the malloc/free pair away
    assert all(item.library == "libc.so.6" for item in features.imports if item.name == "printf")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=300) | st.lists(st.sampled_from(b"\x00\x01\xff"), max_size=40).map(bytes))
def test_compiled_byte_counts_give_numpy_entropy(data: bytes) -> None:
    """Section entropy from the compiled byte counts equals the numpy reference, bit for bit."""
    if disasm.ACCELERATOR is None:
        pytest.skip("the _native extension is not built")
    compiled = shannon_entropy(data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(disasm, "ACCELERATOR", None)
        assert shannon_entropy(data) == compiled
    if data:
        counts = numpy.frombuffer(disasm.ACCELERATOR.byte_counts(data), dtype=numpy.int64)
        reference = numpy.bincount(numpy.frombuffer(data, dtype=numpy.uint8), minlength=256)
        assert counts.tolist() == reference.tolist()
