"""String extraction: offsets point at the bytes, UTF-16LE literals are found, limits hold.

Each test runs on both scans: the compiled ``string_runs`` and the regex reference
(``disasm.ACCELERATOR`` set to None), and the compiled one is compared with the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.config import DEFAULT_LIMITS, Limits
from earmark.extract import disasm
from earmark.extract.strings import MAX_STRING_LENGTH, extract_strings
from earmark.model.sample import StringRef
from fixtures.build import FixtureBuilder


@pytest.fixture(autouse=True, params=["compiled", "regex"])
def _scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.param == "compiled" and disasm.ACCELERATOR is None:
        pytest.skip("the _native extension is not built")
    if request.param == "regex":
        monkeypatch.setattr(disasm, "ACCELERATOR", None)
    yield


def _regex_strings(data: bytes, limits: Limits) -> tuple[tuple[StringRef, ...], bool]:
    saved = disasm.ACCELERATOR
    disasm.ACCELERATOR = None
    try:
        return extract_strings(data, limits)
    finally:
        disasm.ACCELERATOR = saved


def _encoded(string: StringRef) -> bytes:
    return string.value.encode("ascii" if string.encoding == "ascii" else "utf-16-le")


def test_fixture_literals_found_at_their_offsets(builder: FixtureBuilder) -> None:
    for toolchain in ("mingw64", "mingw32"):
        data = builder.build("meta_hello.c", toolchain, "O2").stripped.read_bytes()
        strings, capped = extract_strings(data, DEFAULT_LIMITS)
        assert not capped
        by_value = {(s.value, s.encoding): s for s in strings}
        ascii_marker = by_value[("EARMARK-ASCII-MARKER-7f3a", "ascii")]
        wide_marker = by_value[("EARMARK-WIDE-MARKER-91c2", "utf-16le")]
        assert data.find(b"EARMARK-ASCII-MARKER-7f3a") == ascii_marker.offset
        assert data.find("EARMARK-WIDE-MARKER-91c2".encode("utf-16-le")) == wide_marker.offset


def test_known_layout() -> None:
    data = b"\x01\x02hello world\x00\xff" + "wide text".encode("utf-16-le") + b"\x00\x00abc\x00"
    strings, _ = extract_strings(data, DEFAULT_LIMITS)
    assert strings == (
        StringRef(2, "ascii", "hello world"),
        StringRef(15, "utf-16le", "wide text"),
    )


def test_cap_and_minimum_length() -> None:
    data = b"\x00".join(b"string%04d" % index for index in range(100)) + b"\x00tiny\x00"
    limits = dataclasses.replace(DEFAULT_LIMITS, max_strings=10)
    strings, capped = extract_strings(data, limits)
    assert capped and len(strings) == 10
    assert [s.value for s in strings] == [f"string{index:04d}" for index in range(10)]
    all_strings, _ = extract_strings(data, DEFAULT_LIMITS)
    assert "tiny" not in {s.value for s in all_strings}


def test_long_runs_are_cut() -> None:
    strings, _ = extract_strings(b"A" * (MAX_STRING_LENGTH * 3), DEFAULT_LIMITS)
    assert len(strings) == 1 and len(strings[0].value) == MAX_STRING_LENGTH


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_every_string_is_the_bytes_at_its_offset(data: bytes) -> None:
    strings, _ = extract_strings(data, DEFAULT_LIMITS)
    offsets = [s.offset for s in strings]
    assert offsets == sorted(offsets)
    for string in strings:
        assert len(string.value) >= DEFAULT_LIMITS.min_string_length
        encoded = _encoded(string)
        assert data[string.offset : string.offset + len(encoded)] == encoded
        assert all(" " <= ch <= "~" or ch == "\t" for ch in string.value)


def _compiled_only() -> None:
    if disasm.ACCELERATOR is None:
        pytest.skip("compares the compiled scan with the regex one")


def test_fixture_builds_give_the_reference_strings(builder: FixtureBuilder) -> None:
    _compiled_only()
    for source, toolchain in (("meta_hello.c", "mingw64"), ("fx_codec.c", "gcc32")):
        data = builder.build(source, toolchain, "O2").stripped.read_bytes()
        strings = extract_strings(data, DEFAULT_LIMITS)
        assert strings[0], "the build should hold strings"
        assert strings == _regex_strings(data, DEFAULT_LIMITS)


# Bytes where runs start, end and touch often: printable letters, zeros, tabs and a few others.
_RUN_BYTES = st.lists(st.sampled_from(b"aZ~ \t\x00\x00\x00\x01\x7f\xff"), max_size=600).map(bytes)


@settings(max_examples=300, deadline=None)
@given(_RUN_BYTES, st.integers(1, 6), st.integers(0, 12))
def test_same_strings_as_the_regex_scan(data: bytes, min_length: int, max_strings: int) -> None:
    _compiled_only()
    limits = dataclasses.replace(
        DEFAULT_LIMITS, min_string_length=min_length, max_strings=max_strings
    )
    assert extract_strings(data, limits) == _regex_strings(data, limits)
    assert extract_strings(data, DEFAULT_LIMITS) == _regex_strings(data, DEFAULT_LIMITS)
