"""Frozen features files: a ``SampleFeatures`` written once, read back identical (``==``).

Layout (see docs/features-format.md):

    offset  size  field
    0       8     magic b"EARMARKF"
    8       2     major version (uint16 LE)
    10      2     minor version (uint16 LE)
    12      8     length of the decompressed payload (uint64 LE)
    20      4     CRC-32 of the compressed payload (uint32 LE)
    24      ...   zlib-compressed UTF-8 JSON of the SampleFeatures tree

JSON because it is stdlib, diffable after ``zlib -d`` and exact for our value types (ints of any
size, floats by shortest repr, strings including lone surrogates). zlib rather than lzma: lzma
files are ~15% smaller on our fixtures but decompress several times slower, and a features
file is read far more often than written (every re-index and compare).
"""

from __future__ import annotations

import dataclasses
import json
import struct
import types
import typing
import zlib
from pathlib import Path
from typing import Any, Literal, Union

from earmark.errors import FeaturesFileError, FeaturesVersionError
from earmark.model.sample import FEATURES_FORMAT_VERSION, SampleFeatures

MAGIC = b"EARMARKF"
_HEADER = struct.Struct("<8sHHQI")
# Largest decompressed payload accepted. A 50k-function sample (Limits.max_functions) with
# 64-value MinHash and normalised tokens measures ~150 MB of JSON; 1 GiB leaves room and stops
# a decompression bomb long before memory runs out.
MAX_PAYLOAD_BYTES = 1024 * 1024 * 1024
# zlib level 6 is the default trade-off: level 9 gains ~1% size for ~2x write time.
_COMPRESSION_LEVEL = 6

def _version_numbers(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor or 0)


def features_to_bytes(features: SampleFeatures) -> bytes:
    payload = json.dumps(
        _to_plain(features), ensure_ascii=True, separators=(",", ":"), allow_nan=True
    ).encode("ascii")
    compressed = zlib.compress(payload, _COMPRESSION_LEVEL)
    major, minor = _version_numbers(FEATURES_FORMAT_VERSION)
    header = _HEADER.pack(MAGIC, major, minor, len(payload), zlib.crc32(compressed))
    return header + compressed


def features_from_bytes(blob: bytes) -> SampleFeatures:
    if len(blob) < _HEADER.size or not blob.startswith(MAGIC):
        raise FeaturesFileError("not an earmark features file (wrong magic)")
    _, major, minor, payload_size, checksum = _HEADER.unpack_from(blob)
    our_major, _ = _version_numbers(FEATURES_FORMAT_VERSION)
    if major != our_major:
        raise FeaturesVersionError(
            f"features file format {major}.{minor} cannot be read by this version "
            f"(reads {our_major}.x); analyse the sample again"
        )
    if payload_size > MAX_PAYLOAD_BYTES:
        raise FeaturesFileError(f"features file claims {payload_size} bytes of content; refused")
    compressed = blob[_HEADER.size :]
    if zlib.crc32(compressed) != checksum:
        raise FeaturesFileError("features file is damaged (checksum mismatch)")
    try:
        decompressor = zlib.decompressobj()
        # max_length bounds memory whatever the stream says: a bomb stops at the declared size.
        payload = decompressor.decompress(compressed, payload_size + 1)
        if len(payload) != payload_size or not decompressor.eof:
            raise FeaturesFileError("features file is damaged (length mismatch)")
        tree = json.loads(payload)
        features = _from_plain(SampleFeatures, tree)
    except (zlib.error, ValueError, TypeError, KeyError, RecursionError) as e:
        raise FeaturesFileError(f"features file is damaged ({type(e).__name__})") from e
    if not isinstance(features, SampleFeatures):
        raise FeaturesFileError("features file does not hold a sample")
    return features


def dump_features(features: SampleFeatures, path: str | Path) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a file behind."""
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_bytes(features_to_bytes(features))
    temporary.replace(target)


def load_features(path: str | Path) -> SampleFeatures:
    source = Path(path)
    try:
        size = source.stat().st_size
        if size > MAX_PAYLOAD_BYTES:
            raise FeaturesFileError(f"{source.name} is {size} bytes; too large for a features file")
        blob = source.read_bytes()
    except OSError as e:
        raise FeaturesFileError(f"cannot read {source.name}: {e.strerror or e}") from e
    return features_from_bytes(blob)


def _to_plain(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _to_plain(getattr(value, field.name)) for field in dataclasses.fields(value)
        }
    if isinstance(value, tuple):
        return [_to_plain(item) for item in value]
    return value


def _from_plain(kind: Any, value: Any) -> Any:
    """Rebuild a value of type ``kind`` from JSON, checking every type on the way: a damaged
    or foreign file raises instead of producing a half-typed model."""
    origin = typing.get_origin(kind)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise TypeError(f"{kind.__name__} is not an object")
        hints = typing.get_type_hints(kind)
        arguments = {}
        for field in dataclasses.fields(kind):
            if field.name in value:
                arguments[field.name] = _from_plain(hints[field.name], value[field.name])
            elif field.default is dataclasses.MISSING:
                raise KeyError(f"{kind.__name__}.{field.name}")
        # Keys we do not know come from a newer minor version; they are ignored by policy.
        return kind(**arguments)
    if origin is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, list):
            raise TypeError("expected an array")
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_from_plain(items[0], item) for item in value)
        if len(items) != len(value):
            raise TypeError("tuple length mismatch")
        return tuple(
            _from_plain(item_kind, item) for item_kind, item in zip(items, value, strict=True)
        )
    if origin in (Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _from_plain(option, value)
            except (TypeError, KeyError):
                continue
        raise TypeError(f"no type of {kind} matches")
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise TypeError(f"{value!r} is not one of {typing.get_args(kind)}")
        return value
    return _check_scalar(kind, value)


def _check_scalar(kind: Any, value: Any) -> Any:
    if kind is type(None):
        if value is not None:
            raise TypeError("expected null")
        return None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError("expected a number")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("expected an integer")
        return value
    if kind in (str, bool):
        if type(value) is not kind:
            raise TypeError(f"expected {kind.__name__}")
        return value
    raise TypeError(f"unsupported field type {kind!r}")  # a model change this module missed
