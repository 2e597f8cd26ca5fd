"""Hostile input: every refusal is a typed InputError, never a crash or a traceback."""

from __future__ import annotations

import dataclasses
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earmark.config import DEFAULT_LIMITS
from earmark.errors import (
    EmptyFileError,
    FileTooLargeError,
    InputError,
    MalformedFileError,
    UnsupportedFormatError,
)
from earmark.extract import analyze_bytes
from fixtures.build import FixtureBuilder


def _section_table(data: bytes) -> tuple[int, int]:
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    (count,) = struct.unpack_from("<H", data, pe_offset + 6)
    (optional_size,) = struct.unpack_from("<H", data, pe_offset + 20)
    return pe_offset + 24 + optional_size, count


class _Sample(bytes):
    """Fixture bytes with a short repr, so a hypothesis failure report stays readable."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@pytest.fixture(scope="module")
def small_pe(builder: FixtureBuilder) -> bytes:
    return _Sample(builder.build("meta_hello.c", "mingw32", "Os").stripped.read_bytes())


@pytest.fixture(scope="module")
def small_elf(builder: FixtureBuilder) -> bytes:
    return _Sample(builder.build("meta_hello.c", "gcc64", "Os").stripped.read_bytes())


def test_empty_file() -> None:
    with pytest.raises(EmptyFileError):
        analyze_bytes(b"", DEFAULT_LIMITS)


def test_file_over_the_size_limit(small_elf: bytes) -> None:
    with pytest.raises(FileTooLargeError):
        analyze_bytes(small_elf, dataclasses.replace(DEFAULT_LIMITS, max_file_bytes=1000))


@pytest.mark.parametrize(
    "data", [b"hello world", os.urandom(4096), b"\xcf\xfa\xed\xfe" + bytes(60)]
)
def test_wrong_magic(data: bytes) -> None:
    with pytest.raises(UnsupportedFormatError):
        analyze_bytes(data, DEFAULT_LIMITS)


def test_dos_only_executable(small_pe: bytes) -> None:
    data = bytearray(small_pe)
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    data[pe_offset : pe_offset + 4] = b"NE\0\0"
    with pytest.raises(UnsupportedFormatError):
        analyze_bytes(bytes(data), DEFAULT_LIMITS)


def test_other_machine(small_elf: bytes) -> None:
    data = bytearray(small_elf)
    struct.pack_into("<H", data, 18, 183)  # EM_AARCH64
    with pytest.raises(UnsupportedFormatError):
        analyze_bytes(bytes(data), DEFAULT_LIMITS)


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 0.999])
def test_truncated_files(small_pe: bytes, small_elf: bytes, fraction: float) -> None:
    for data in (small_pe, small_elf):
        cut = data[: max(1, int(len(data) * fraction))]
        try:
            features = analyze_bytes(cut, DEFAULT_LIMITS)
        except InputError:
            continue
        assert features.size == len(cut)


def test_random_bytes_behind_a_valid_magic() -> None:
    for magic in (b"MZ", b"\x7fELF"):
        for _ in range(20):
            with pytest.raises(InputError):
                analyze_bytes(magic + os.urandom(2000), DEFAULT_LIMITS)


def test_sections_overlapping_in_memory(small_pe: bytes) -> None:
    data = bytearray(small_pe)
    table, _ = _section_table(data)
    (first_address,) = struct.unpack_from("<I", data, table + 12)
    struct.pack_into("<I", data, table + 40 + 12, first_address + 0x10)  # 2nd inside 1st
    with pytest.raises(MalformedFileError, match="overlap"):
        analyze_bytes(bytes(data), DEFAULT_LIMITS)


def test_sections_sharing_file_bytes_only_warn(small_pe: bytes) -> None:
    data = bytearray(small_pe)
    table, _ = _section_table(data)
    (first_raw,) = struct.unpack_from("<I", data, table + 20)
    struct.pack_into("<I", data, table + 40 + 20, first_raw)
    features = analyze_bytes(bytes(data), DEFAULT_LIMITS)
    assert any("share file bytes" in warning for warning in features.warnings)


def test_code_mapped_above_two_to_the_63(small_elf: bytes) -> None:
    """A 64-bit ELF whose executable segment sits at 0x8000...: analysed, never an overflow."""
    data = bytearray(small_elf)
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        entry = phoff + index * phentsize
        p_type, p_flags = struct.unpack_from("<II", data, entry)
        if p_type == 1 and p_flags & 1:  # PT_LOAD, executable
            data[entry + 16 + 7] |= 0x80  # top byte of p_vaddr
            break
    else:
        pytest.fail("fixture has no executable PT_LOAD")
    features = analyze_bytes(bytes(data), DEFAULT_LIMITS)  # must not raise
    code = [f for f in features.functions if f.source != "symbol"]
    assert code and all(function.address >= 2**63 for function in code)


def test_huge_virtual_size(small_pe: bytes, small_elf: bytes) -> None:
    data = bytearray(small_pe)
    table, count = _section_table(data)
    struct.pack_into("<I", data, table + 40 * (count - 1) + 8, 0xFFFF0000)
    with pytest.raises(MalformedFileError, match="virtual size"):
        analyze_bytes(bytes(data), DEFAULT_LIMITS)
    elf = bytearray(small_elf)
    (program_offset,) = struct.unpack_from("<Q", elf, 32)
    for index in range(struct.unpack_from("<H", elf, 56)[0]):
        entry = program_offset + 56 * index
        if struct.unpack_from("<I", elf, entry)[0] == 1:  # PT_LOAD: set p_memsz
            struct.pack_into("<Q", elf, entry + 40, 1 << 40)
            break
    with pytest.raises(MalformedFileError, match="max_virtual_size"):
        analyze_bytes(bytes(elf), DEFAULT_LIMITS)


def test_too_many_sections(small_pe: bytes) -> None:
    data = bytearray(small_pe)
    (pe_offset,) = struct.unpack_from("<I", data, 0x3C)
    struct.pack_into("<H", data, pe_offset + 6, 5000)
    with pytest.raises(MalformedFileError, match="max_sections"):
        analyze_bytes(bytes(data), DEFAULT_LIMITS)


def test_section_past_end_of_file(small_pe: bytes) -> None:
    data = bytearray(small_pe)
    table, _ = _section_table(data)
    struct.pack_into("<I", data, table + 20, len(data) + 0x1000)
    with pytest.raises(MalformedFileError, match="past the end"):
        analyze_bytes(bytes(data), DEFAULT_LIMITS)


_mutations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=4095), st.integers(0, 255)),
    min_size=1,
    max_size=16,
)


def _analyze_or_refuse(data: bytes) -> None:
    """Either a typed refusal with its own exit code, or features describing these bytes."""
    try:
        features = analyze_bytes(data, DEFAULT_LIMITS)
    except InputError as error:
        assert error.exit_code >= InputError.exit_code
        return
    assert features.size == len(data)
    assert all(f.address >= 0 and f.size >= 0 for f in features.functions)


def _mutate(data: bytes, mutations: list[tuple[int, int]]) -> bytes:
    mutated = bytearray(data)
    for position, value in mutations:
        # Most of the interesting structure is in the first 4 KiB (headers, tables).
        mutated[position % len(mutated)] = value
    return bytes(mutated)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=_mutations)
def test_mutated_pe_raises_only_input_errors(
    small_pe: bytes, mutations: list[tuple[int, int]]
) -> None:
    _analyze_or_refuse(_mutate(small_pe, mutations))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=_mutations)
def test_mutated_elf_raises_only_input_errors(
    small_elf: bytes, mutations: list[tuple[int, int]]
) -> None:
    _analyze_or_refuse(_mutate(small_elf, mutations))
