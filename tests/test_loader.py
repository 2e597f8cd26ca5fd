"""Loader and CodeImage on real binaries built in the session: arch, segments, function starts
from symbols and unwind tables, import slots, all checked against toolchain truth."""

from __future__ import annotations

import re
import subprocess
from types import SimpleNamespace

import pytest

from earmark.config import DEFAULT_LIMITS
from earmark.errors import UnsupportedFormatError
from earmark.extract.image import UnwindRange
from earmark.extract.loader import detect_format, load_sample
from earmark.extract.pe_image import unwind_ranges
from fixtures.build import FixtureBuilder

TOOLCHAIN_SHAPES = {
    "gcc64": ("elf", "x86_64", 64),
    "clang64": ("elf", "x86_64", 64),
    "gcc32": ("elf", "x86", 32),
    "mingw64": ("pe", "x86_64", 64),
    "mingw32": ("pe", "x86", 32),
}


@pytest.mark.parametrize("toolchain", sorted(TOOLCHAIN_SHAPES))
def test_code_image_matches_the_toolchain(builder: FixtureBuilder, toolchain: str) -> None:
    build = builder.build("meta_hello.c", toolchain, "O2")
    loaded = load_sample(build.unstripped.read_bytes(), DEFAULT_LIMITS)
    image = loaded.image
    assert (loaded.format, image.arch, image.bits) == TOOLCHAIN_SHAPES[toolchain]
    assert any(segment.executable and segment.data for segment in image.segments)
    # i386 COFF names carry the cdecl underscore; compare undecorated names.
    prefix = "_" if toolchain == "mingw32" else ""
    names = {
        function.name.removeprefix(prefix): function.address for function in image.symbol_functions
    }
    assert "main" in names and "meta_checksum" in names
    # Every symbol address lies inside bytes the image maps.
    for address in names.values():
        assert any(
            s.virtual_address <= address < s.virtual_address + len(s.data) for s in image.segments
        )
    slot_names = set(image.import_slots.values())
    if loaded.format == "pe":
        assert {"kernel32.dll!GetTickCount", "kernel32.dll!GetModuleHandleA"} <= slot_names
    else:
        assert any(name.endswith("!printf") or name.endswith("!malloc") for name in slot_names)


def test_pe64_unwind_table_gives_function_starts(builder: FixtureBuilder) -> None:
    build = builder.build("meta_hello.c", "mingw64", "O2")
    image = load_sample(build.unstripped.read_bytes(), DEFAULT_LIMITS).image
    symbols = {function.name: function.address for function in image.symbol_functions}
    assert symbols["meta_checksum"] in image.exception_starts
    assert symbols["main"] in image.exception_starts
    # The stripped copy loses symbols but keeps .pdata.
    stripped = load_sample(build.stripped.read_bytes(), DEFAULT_LIMITS).image
    assert not stripped.symbol_functions
    assert set(stripped.exception_starts) == set(image.exception_starts)


@pytest.mark.parametrize("toolchain", ["gcc64", "gcc32", "clang64"])
def test_elf_eh_frame_starts_match_readelf(builder: FixtureBuilder, toolchain: str) -> None:
    build = builder.build("meta_hello.c", toolchain, "O2")
    image = load_sample(build.stripped.read_bytes(), DEFAULT_LIMITS).image
    readelf = subprocess.run(
        ["readelf", "--debug-dump=frames", str(build.stripped)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    truth = {int(match, 16) for match in re.findall(r"FDE cie=\w+ pc=([0-9a-f]+)\.\.", readelf)}
    assert truth and set(image.exception_starts) == truth


@pytest.mark.parametrize("toolchain", ["gcc64", "gcc32"])
def test_elf_plt_stubs_match_objdump(builder: FixtureBuilder, toolchain: str) -> None:
    build = builder.build("meta_hello.c", toolchain, "O0")
    image = load_sample(build.stripped.read_bytes(), DEFAULT_LIMITS).image
    listing = subprocess.run(
        ["objdump", "-d", str(build.stripped)], capture_output=True, text=True, check=True
    ).stdout
    truth = {
        int(address, 16): name
        for address, name in re.findall(r"^([0-9a-f]+) <(\w+)@plt>:", listing, re.MULTILINE)
    }
    assert truth
    for address, name in truth.items():
        assert image.import_slots[address].endswith(f"!{name}")


def test_detect_format_refuses_unknown_magic() -> None:
    with pytest.raises(UnsupportedFormatError):
        detect_format(b"#!/bin/sh\necho hi\n", DEFAULT_LIMITS)


@pytest.mark.parametrize("toolchain", ["gcc64", "gcc32", "clang64"])
def test_elf_got_address_and_plt_ranges_match_the_section_headers(
    builder: FixtureBuilder, toolchain: str
) -> None:
    build = builder.build("meta_hello.c", toolchain, "O2")
    image = load_sample(build.stripped.read_bytes(), DEFAULT_LIMITS).image
    listing = subprocess.run(
        ["readelf", "--wide", "--section-headers", str(build.stripped)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sections = {
        name: (int(address, 16), int(address, 16) + int(size, 16))
        for name, address, size in re.findall(
            r"\] (\.[\w.]+)\s+\w+\s+([0-9a-f]+) [0-9a-f]+ ([0-9a-f]+)", listing
        )
    }
    assert image.got_address == sections[".got.plt"][0]
    plt_names = [
        name
        for name in (".plt", ".plt.sec", ".plt.got")
        if name in sections and sections[name][1] > sections[name][0]
    ]
    assert plt_names
    assert set(image.plt_ranges) == {sections[name] for name in plt_names}


def _runtime_function(begin: int, end: int, chained_to: int | None = None) -> SimpleNamespace:
    """A stand-in for LIEF's RuntimeFunctionX64 with the fields the loader reads."""
    parent = None if chained_to is None else SimpleNamespace(rva_start=chained_to)
    return SimpleNamespace(
        rva_start=begin, rva_end=end, unwind_info=SimpleNamespace(chained=parent)
    )


def test_chained_pdata_entries_name_the_function_at_the_root_of_the_chain() -> None:
    binary = SimpleNamespace(
        exceptions=[
            _runtime_function(0x1000, 0x1010),
            _runtime_function(0x1010, 0x1020, chained_to=0x1000),
            _runtime_function(0x1800, 0x1810, chained_to=0x1010),  # a chain two links long
            _runtime_function(0x2000, 0x2010),
        ]
    )
    assert unwind_ranges(binary, 0x10000) == (  # type: ignore[arg-type]
        UnwindRange(0x11000, 0x11010, 0x11000),
        UnwindRange(0x11010, 0x11020, 0x11000),
        UnwindRange(0x11800, 0x11810, 0x11000),
        UnwindRange(0x12000, 0x12010, 0x12000),
    )


def test_a_chain_loop_in_hostile_pdata_ends() -> None:
    # Each entry names the other as its function: resolution stops after a bounded walk.
    binary = SimpleNamespace(
        exceptions=[
            _runtime_function(0x1000, 0x1010, chained_to=0x1010),
            _runtime_function(0x1010, 0x1020, chained_to=0x1000),
        ]
    )
    ranges = unwind_ranges(binary, 0)  # type: ignore[arg-type]
    assert [r.begin for r in ranges] == [0x1000, 0x1010]
    assert all(r.function in (0x1000, 0x1010) for r in ranges)
