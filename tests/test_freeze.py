"""Frozen features files: identical round trip, refusal of foreign, damaged, bomb-like and
incompatible files."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earmark import freeze
from earmark.errors import FeaturesFileError, FeaturesVersionError
from earmark.extract import analyze_file
from earmark.freeze import dump_features, features_from_bytes, features_to_bytes, load_features
from earmark.model.sample import (
    ElfInfo,
    FunctionFeatures,
    PeInfo,
    SampleFeatures,
    Section,
    StringRef,
)
from fixtures.build import FixtureBuilder

_finite = st.floats(allow_nan=False)
_sections = st.lists(st.builds(Section, entropy=_finite), max_size=3).map(tuple)
_features = st.builds(
    SampleFeatures,
    analysis_seconds=_finite,
    sections=_sections,
    pe=st.none() | st.from_type(PeInfo),
    elf=st.none() | st.from_type(ElfInfo),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_features)
def test_round_trip_of_generated_features(features: SampleFeatures) -> None:
    assert features_from_bytes(features_to_bytes(features)) == features


@pytest.mark.parametrize("toolchain", ["mingw64", "gcc32"])
def test_round_trip_of_a_real_sample(
    builder: FixtureBuilder, tmp_path: Path, toolchain: str
) -> None:
    features = analyze_file(builder.build("meta_hello.c", toolchain, "O2").stripped)
    path = tmp_path / "sample.emf"
    dump_features(features, path)
    assert load_features(path) == features
    assert path.read_bytes().startswith(freeze.MAGIC)


def _sample_blob() -> bytes:
    features = SampleFeatures(
        "1.0",
        "0.1.0",
        "a" * 64,
        "b" * 40,
        "c" * 32,
        1,
        "elf",
        "x86_64",
        64,
        0,
        (),
        None,
        (),
        (),
        (),
        (),
        (),
        None,
        None,
        (),
        0.0,
    )
    return features_to_bytes(features)


def test_wrong_magic_and_truncation_are_refused() -> None:
    blob = _sample_blob()
    with pytest.raises(FeaturesFileError):
        features_from_bytes(b"NOTOURS!" + blob[8:])
    for cut in (0, 4, 23, 30, len(blob) - 1):
        with pytest.raises(FeaturesFileError):
            features_from_bytes(blob[:cut])


def test_damage_is_detected() -> None:
    blob = bytearray(_sample_blob())
    blob[-3] ^= 0xFF
    with pytest.raises(FeaturesFileError, match="damaged"):
        features_from_bytes(bytes(blob))


def test_incompatible_major_version_is_refused() -> None:
    blob = bytearray(_sample_blob())
    struct.pack_into("<H", blob, 8, 99)
    with pytest.raises(FeaturesVersionError):
        features_from_bytes(bytes(blob))


def test_newer_minor_version_with_unknown_field_is_read() -> None:
    blob = _sample_blob()
    payload = zlib.decompress(blob[24:]).replace(
        b'{"format_version"', b'{"future":1,"format_version"'
    )
    compressed = zlib.compress(payload)
    header = struct.pack("<8sHHQI", freeze.MAGIC, 1, 7, len(payload), zlib.crc32(compressed))
    assert features_from_bytes(header + compressed) == features_from_bytes(blob)


def test_decompression_bomb_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = zlib.compress(b"[" + b" " * 5_000_000 + b"]")
    # Declared small, actually large: decompression stops at the declared size.
    header = struct.pack("<8sHHQI", freeze.MAGIC, 1, 0, 100, zlib.crc32(bomb))
    with pytest.raises(FeaturesFileError, match="length"):
        features_from_bytes(header + bomb)
    # Declared over the limit: refused before decompressing.
    monkeypatch.setattr(freeze, "MAX_PAYLOAD_BYTES", 1000)
    header = struct.pack("<8sHHQI", freeze.MAGIC, 1, 0, 5_000_002, zlib.crc32(bomb))
    with pytest.raises(FeaturesFileError, match="refused"):
        features_from_bytes(header + bomb)


def test_well_formed_json_of_the_wrong_shape_is_refused() -> None:
    blob = _sample_blob()
    payload = zlib.decompress(blob[24:]).replace(b'"bits":64', b'"bits":"64"')
    compressed = zlib.compress(payload)
    header = struct.pack("<8sHHQI", freeze.MAGIC, 1, 0, len(payload), zlib.crc32(compressed))
    with pytest.raises(FeaturesFileError):
        features_from_bytes(header + compressed)


def test_missing_file_is_a_features_error(tmp_path: Path) -> None:
    with pytest.raises(FeaturesFileError):
        load_features(tmp_path / "absent.emf")


def test_features_are_replaceable_values() -> None:
    original = features_from_bytes(_sample_blob())
    changed = dataclasses.replace(original, size=2)
    assert features_from_bytes(features_to_bytes(changed)).size == 2


# Any character, lone surrogates included: sample strings decoded from UTF-16 may hold them.
_any_text = st.text(st.characters(blacklist_categories=()), max_size=8)
_odd_strings = st.lists(
    st.builds(StringRef, offset=st.integers(-(2**70), 2**70), value=_any_text), max_size=4
).map(tuple)


def _checked_tree_walk(payload: bytes) -> SampleFeatures:
    """The stdlib reading of a payload: the reference for the msgspec path."""
    decoded = freeze._from_plain(SampleFeatures, json.loads(payload))
    assert isinstance(decoded, SampleFeatures)
    return decoded


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_features, _odd_strings)
def test_msgspec_reading_equals_the_checked_tree_walk(
    features: SampleFeatures, strings: tuple[StringRef, ...]
) -> None:
    features = dataclasses.replace(features, strings=strings)
    blob = features_to_bytes(features)
    payload = zlib.decompress(blob[24:])
    read = features_from_bytes(blob)
    assert read == _checked_tree_walk(payload) == features
    assert features_to_bytes(read) == blob


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_damaged_json_msgspec_accepts_reads_the_same(data: st.DataObject) -> None:
    """Whatever msgspec accepts of a damaged payload, the checked walk reads the same; what it
    refuses is left to the checked walk (``features_from_bytes``)."""
    payload = bytearray(zlib.decompress(_string_blob("w\u00e9x")[24:]))
    # Mostly digits and string characters: damage there often still parses, so msgspec's
    # acceptance of odd numbers and strings is what gets compared.
    targets = [i for i, byte in enumerate(payload) if chr(byte).isalnum()]
    for _ in range(data.draw(st.integers(1, 3))):
        position = data.draw(st.sampled_from(targets) | st.integers(0, len(payload) - 1))
        payload[position] = data.draw(st.sampled_from(b'0123456789-.eE"\\ ax{[:,'))
    try:
        fast = freeze._typed_decoder().decode(bytes(payload))
    except (msgspec.MsgspecError, ValueError):
        return
    assert fast == _checked_tree_walk(bytes(payload))


def _string_blob(odd: str) -> bytes:
    features = features_from_bytes(_sample_blob())
    strings = (StringRef(16, "ascii", "hello"), StringRef(40, "utf-16le", odd))
    section = Section(".text", 4096, 100, 1024, 512, 6.5, ("read", "execute"))
    return features_to_bytes(dataclasses.replace(features, strings=strings, sections=(section,)))


def test_lone_surrogates_are_read_exactly() -> None:
    read = features_from_bytes(_string_blob("w\ud800x"))
    assert read.strings[1].value == "w\ud800x"


def _emptied(features: SampleFeatures) -> SampleFeatures:
    functions = tuple(dataclasses.replace(f, normalized=()) for f in features.functions)
    return dataclasses.replace(features, functions=functions)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_features, _odd_strings)
def test_reading_without_instructions_empties_only_the_tokens(
    features: SampleFeatures, strings: tuple[StringRef, ...]
) -> None:
    # With lone surrogates in the strings msgspec refuses the payload: the stdlib path then
    # drops the tokens itself, so both paths are covered.
    features = dataclasses.replace(features, strings=strings)
    blob = features_to_bytes(features)
    assert features_from_bytes(blob, instructions=False) == _emptied(features)


def test_real_sample_without_instructions(builder: FixtureBuilder) -> None:
    features = analyze_file(builder.build("meta_hello.c", "mingw64", "O2").stripped)
    assert any(function.normalized for function in features.functions)
    outline = features_from_bytes(features_to_bytes(features), instructions=False)
    assert outline == _emptied(features)
    assert all(type(function) is FunctionFeatures for function in outline.functions)


def test_damaged_file_without_instructions_is_refused() -> None:
    blob = _sample_blob()
    payload = zlib.decompress(blob[24:]).replace(b'"bits":64', b'"bits":"64"')
    compressed = zlib.compress(payload)
    header = struct.pack("<8sHHQI", freeze.MAGIC, 1, 0, len(payload), zlib.crc32(compressed))
    with pytest.raises(FeaturesFileError):
        features_from_bytes(header + compressed, instructions=False)


def test_invalid_deflate_stream_with_a_matching_checksum_is_refused() -> None:
    blob = _sample_blob()
    payload_size = struct.unpack_from("<Q", blob, 12)[0]
    stream = bytearray(blob[24:])
    stream[2:12] = b"\xff" * 10  # past the zlib header: invalid code lengths
    header = struct.pack("<8sHHQI", freeze.MAGIC, 1, 0, payload_size, zlib.crc32(stream))
    with pytest.raises(FeaturesFileError, match=r"damaged \(error\)"):
        features_from_bytes(header + bytes(stream))


# Floats of every magnitude and kind: msgspec writes some of them unlike ``float.__repr__``.
_any_float = st.floats() | st.sampled_from([1e-5, 1e16, 1e-4, 9.999e15, -0.0, float("nan")])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_features, _odd_strings, st.lists(_any_float, max_size=3), _any_float)
def test_fast_encoding_writes_the_reference_text(
    features: SampleFeatures,
    strings: tuple[StringRef, ...],
    entropies: list[float],
    seconds: float,
) -> None:
    """The payload is the stdlib encoder's text byte for byte, whatever the strings (DEL,
    non-ASCII, astral, lone surrogates) and floats (exponent forms, NaN, infinities)."""
    sections = tuple(Section(".text", 4096, 100, 1024, 512, e, ("read",)) for e in entropies)
    features = dataclasses.replace(
        features, strings=strings, sections=sections, analysis_seconds=seconds
    )
    assert freeze._json_payload(features) == freeze._stdlib_payload(features)


def test_fast_encoding_of_a_real_sample(builder: FixtureBuilder) -> None:
    features = analyze_file(builder.build("meta_hello.c", "mingw64", "O2").stripped)
    odd = StringRef(8, "utf-16le", "\x7fcaf\u00e9 \U0001f600")
    for changed in (features, dataclasses.replace(features, strings=(*features.strings, odd))):
        payload = freeze._json_payload(changed)
        assert payload == freeze._stdlib_payload(changed)
        assert payload.isascii() and b"\x7f" not in payload
