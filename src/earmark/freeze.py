"""Frozen features files: a ``SampleFeatures`` written once, read back identical (``==``).

Layout (see docs/features-format.md):

    offset  size  field
    0       8     magic b"EARMARKF"
    8       2     major version (uint16 LE)
    10      2     minor version (uint16 LE)
    12      8     length of the decompressed payload (uint64 LE)
    20      4     CRC-32 of the compressed payload (uint32 LE)
    24      ...   zlib-compressed UTF-8 JSON of the SampleFeatures tree

JSON because it is diffable after ``zlib -d`` and exact for our value types (ints of any
size, floats by shortest repr, strings including lone surrogates). zlib rather than lzma: lzma
files are ~15% smaller on our fixtures but decompress several times slower, and a features
file is read far more often than written (every re-index and compare).

Reading decodes the JSON straight into the model with msgspec, which checks every type in C;
what msgspec refuses (lone surrogates, numbers past a float, damaged text) goes through the
stdlib parser and the checked tree walk below, which reads it or raises the typed error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import re
import struct
import types
import typing
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Union

import msgspec
from zlib_ng import zlib_ng

from earmark.errors import FeaturesFileError, FeaturesVersionError
from earmark.model.sample import FEATURES_FORMAT_VERSION, FunctionFeatures, SampleFeatures

MAGIC = b"EARMARKF"
_HEADER = struct.Struct("<8sHHQI")
# Largest decompressed payload accepted. A 50k-function sample (Limits.max_functions) with
# 64-value MinHash and normalised tokens measures ~150 MB of JSON; 1 GiB leaves room and stops
# a decompression bomb long before memory runs out.
MAX_PAYLOAD_BYTES = 1024 * 1024 * 1024
# Deflate level, written by zlib-ng: every ingested sample is frozen once, so compression is
# on the ingest path, and every re-index inflates it again. Stdlib zlib, 35 corpus KB DLLs
# (39 MB of JSON): level 1 0.19 s / 9.74 MB, 3 0.28 s / 8.66 MB, 6 0.60 s / 7.41 MB. PE bench
# (a) KB, 101 samples, 119 MB of JSON, deflate + zlib-ng inflate CPU s / stored MB: stdlib
# level 3 0.78 + 0.12 s / 26.2 MB; zlib-ng level 2 0.43 + 0.15 s / 27.1 MB, level 3 0.52 +
# 0.14 s / 24.7 MB, level 1 0.27 s / 38.3 MB. zlib-ng level 2 costs the least CPU in all for
# 3 % more bytes. Every deflate stream, whatever wrote it, inflates to the same payload.
_COMPRESSION_LEVEL = 2
# zlib-ng's error class (its type stub declares ``error`` as an instance, not a class).
_INFLATE_ERROR: Final = typing.cast(type[Exception], zlib_ng.error)


def _version_numbers(version: str) -> tuple[int, int]:
    major, _, minor = version.partition(".")
    return int(major), int(minor or 0)


def features_to_bytes(features: SampleFeatures) -> bytes:
    payload = _json_payload(features)
    compressed = zlib_ng.compress(payload, _COMPRESSION_LEVEL)
    major, minor = _version_numbers(FEATURES_FORMAT_VERSION)
    header = _HEADER.pack(MAGIC, major, minor, len(payload), zlib.crc32(compressed))
    return header + compressed


def _stdlib_payload(features: SampleFeatures) -> bytes:
    """The reference text of the payload (the file format is defined by it)."""
    # Dataclasses become objects through ``default`` while tuples go to json's C encoder as
    # they are (it writes tuples as arrays): the same text as converting the whole tree to
    # dicts and lists first, which measured 2/3 of the encoding time.
    return json.dumps(
        features,
        default=_dataclass_fields,
        ensure_ascii=True,
        separators=(",", ":"),
        allow_nan=True,
    ).encode("ascii")


# What ``json.dumps(ensure_ascii=True)`` escapes that msgspec writes as it is: DEL and every
# character past ASCII (as \uXXXX, astral ones as a surrogate pair).
_UNESCAPED: Final = re.compile("[\x7f-\U0010ffff]")
_MSGSPEC_ENCODER: Final = msgspec.json.Encoder()


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}"


def _json_payload(features: SampleFeatures) -> bytes:
    """``_stdlib_payload``'s bytes, written by msgspec where it writes the same text: ~7x
    faster (PE bench KB, 101 samples: 0.13 against 0.82 CPU s, a third of an ingest
    worker's time outside the analysis). msgspec writes dataclasses, tuples, ints, strings and
    ASCII escapes as json does; what differs is handled here: characters from DEL up are
    escaped afterwards (outside strings the text is ASCII), and floats it would write
    otherwise (exponent forms, non-finite values) and text it cannot write (lone
    surrogates) go to the stdlib encoder."""
    try:
        payload = _MSGSPEC_ENCODER.encode(features)
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
        return _stdlib_payload(features)
    if not all(_float_written_alike(value) for value in _floats_in(features)):
        return _stdlib_payload(features)
    if not payload.isascii() or b"\x7f" in payload:
        payload = _UNESCAPED.sub(_escaped, payload.decode("utf-8")).encode("ascii")
    return payload


def _float_written_alike(value: float) -> bool:
    """Whether msgspec writes ``value`` as json does (``float.__repr__``; msgspec differs in
    exponent forms, outside 1e-4 <= |value| < 1e16, and writes NaN and infinities as null)."""
    return math.isfinite(value) and _MSGSPEC_ENCODER.encode(value) == repr(value).encode()


def _floats_in(value: object) -> Iterator[float]:
    """The floats in a features tree, walking only the fields whose type can hold one (a
    section's entropy, the analysis time: not the functions or strings)."""
    if isinstance(value, float):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _floats_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _floats_in(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for name in _float_fields(type(value)):
            yield from _floats_in(getattr(value, name))


@functools.cache
def _float_fields(kind: type[Any]) -> tuple[str, ...]:
    """Fields of a model dataclass whose declared type can hold a float, directly or inside."""
    hints = typing.get_type_hints(kind)
    return tuple(
        field.name
        for field in dataclasses.fields(kind)
        if _may_hold_float(hints[field.name], frozenset({kind}))
    )


def _may_hold_float(hint: Any, seen: frozenset[Any]) -> bool:
    if hint is float or hint is Any:
        return True
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint not in seen and any(
            _may_hold_float(inner, seen | {hint}) for inner in typing.get_type_hints(hint).values()
        )
    return any(_may_hold_float(arg, seen) for arg in typing.get_args(hint) if arg is not Ellipsis)


def features_from_bytes(blob: bytes, *, instructions: bool = True) -> SampleFeatures:
    """The features frozen in ``blob``; with ``instructions=False`` every function's
    ``normalized`` is left empty, for builds that never read the instruction tokens (half of
    the JSON, and most of the objects a decoded sample is made of)."""
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
        # zlib-ng inflates a stream twice as fast as the stdlib's zlib (PE bench KB, 101
        # samples: 0.14 against 0.26 CPU s); files written earlier by the stdlib's zlib read
        # the same way.
        decompressor = zlib_ng.decompressobj()
        # max_length bounds memory whatever the stream says: a bomb stops at the declared size.
        payload = decompressor.decompress(compressed, payload_size + 1)
        if len(payload) != payload_size or not decompressor.eof:
            raise FeaturesFileError("features file is damaged (length mismatch)")
        features = _decode_payload(payload, instructions)
    except (_INFLATE_ERROR, ValueError, TypeError, KeyError, RecursionError) as e:
        raise FeaturesFileError(f"features file is damaged ({type(e).__name__})") from e
    if not isinstance(features, SampleFeatures):
        raise FeaturesFileError("features file does not hold a sample")
    return features


@functools.cache
def _typed_decoder() -> msgspec.json.Decoder[SampleFeatures]:
    """msgspec's decoder of the whole model, built once (it compiles the type tree)."""
    return msgspec.json.Decoder(SampleFeatures)


@dataclass(frozen=True, slots=True)
class _Outline:
    """What ``features_from_bytes(..., instructions=False)`` rebuilds: msgspec decodes into
    views of the two types whose functions have no ``normalized`` field, so the tokens are
    skipped in the JSON without being built (PE bench KB: 0.46 s against 0.77 s, and a decoded
    sample of 1,601 functions holds 8.9 MB instead of 20.8 MB), then copies them over."""

    decoder: msgspec.json.Decoder[Any]
    before: Callable[[Any], tuple[Any, ...]]  # function fields in front of ``normalized``
    after: Callable[[Any], tuple[Any, ...]]  # and behind it
    sample: Callable[[Any], tuple[Any, ...]]  # sample fields, ``functions`` left out
    functions_at: int  # position of ``functions`` among the sample fields


def _view_of(kind: type[Any], replaced: dict[str, Any]) -> type[Any]:
    """A dataclass with the fields of ``kind`` (names, types, defaults) but those in
    ``replaced``: given another type there, or left out where it maps to None."""
    hints = typing.get_type_hints(kind)
    fields: list[tuple[str, Any, Any]] = []
    for field in dataclasses.fields(kind):
        hint = replaced.get(field.name, hints[field.name])
        if hint is None:
            continue
        if field.default is dataclasses.MISSING:
            fields.append((field.name, hint, dataclasses.field()))
        else:
            fields.append((field.name, hint, dataclasses.field(default=field.default)))
    return dataclasses.make_dataclass(f"_{kind.__name__}View", fields, frozen=True, slots=True)


@functools.cache
def _outline() -> _Outline:
    function_view = _view_of(FunctionFeatures, {"normalized": None})
    sample_view = _view_of(SampleFeatures, {"functions": tuple[function_view, ...]})  # type: ignore[valid-type]
    function_names = [field.name for field in dataclasses.fields(FunctionFeatures)]
    cut = function_names.index("normalized")
    sample_names = [field.name for field in dataclasses.fields(SampleFeatures)]
    functions_at = sample_names.index("functions")
    del sample_names[functions_at]
    return _Outline(
        decoder=msgspec.json.Decoder(sample_view),
        before=operator.attrgetter(*function_names[:cut]),
        after=operator.attrgetter(*function_names[cut + 1 :]),
        sample=operator.attrgetter(*sample_names),
        functions_at=functions_at,
    )


def _without_instructions(payload: bytes) -> SampleFeatures:
    outline = _outline()
    view = outline.decoder.decode(payload)
    before, after = outline.before, outline.after
    # Positional: the field order of the model, which the getters follow.
    function = typing.cast(Callable[..., FunctionFeatures], FunctionFeatures)
    functions = tuple([function(*before(item), (), *after(item)) for item in view.functions])
    values = list(outline.sample(view))
    values.insert(outline.functions_at, functions)
    return SampleFeatures(*values)


def _decode_payload(payload: bytes, instructions: bool = True) -> Any:
    """The model from the JSON payload. msgspec decodes and checks types in one C pass: on
    the PE bench KB (101 samples, 119 MB of JSON) 0.77 s against 2.2 s for ``json.loads``
    plus ``_from_plain``, the same values (tests/test_freeze.py compares both paths); orjson
    was no faster than the stdlib parser on this payload (1.75 s against 1.40 s). Whatever
    msgspec refuses is read by the stdlib path, whose values and errors are the reference."""
    try:
        if not instructions:
            return _without_instructions(payload)
        return _typed_decoder().decode(payload)
    except (msgspec.MsgspecError, ValueError):
        # JSON holds lone surrogates (\udXXX escapes of undecodable UTF-16 strings) that
        # msgspec refuses, and ``json.loads`` reads payloads in UTF-16/32 as well.
        pass
    features = _from_plain(SampleFeatures, json.loads(payload))
    if instructions or not isinstance(features, SampleFeatures):
        return features
    return dataclasses.replace(
        features,
        functions=tuple(
            dataclasses.replace(function, normalized=()) for function in features.functions
        ),
    )


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


# Field names per model type, listed once (``dataclasses.fields`` per object is the cost that
# made the old tree conversion slow); the model has a dozen types, so this stays tiny.
_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {}


def _dataclass_fields(value: object) -> dict[str, Any]:
    """A model dataclass as the JSON object of its fields, in declaration order."""
    kind = type(value)
    names = _FIELD_NAMES.get(kind)
    if names is None:
        if not dataclasses.is_dataclass(value) or isinstance(value, type):
            raise TypeError(f"{kind.__name__} is not part of the features model")
        names = tuple(field.name for field in dataclasses.fields(value))
        _FIELD_NAMES[kind] = names
    return {name: getattr(value, name) for name in names}


# Builds the decoder of a type once (type hints resolved, fields listed, element checks chosen)
# and keeps it: resolving ``typing.get_type_hints`` per rebuilt object was ~90 % of the decode
# time (53k calls for one 5k-function sample). Keyed by the type object; the model's types are
# few and live for the whole process, so the cache never grows past a few dozen entries.
_Decoder = Callable[[Any], Any]
_DECODERS: dict[Any, _Decoder] = {}
_NOT_GIVEN: Final = object()


def _from_plain(kind: Any, value: Any) -> Any:
    """Rebuild a value of type ``kind`` from JSON, checking every type on the way: a damaged
    or foreign file raises instead of producing a half-typed model."""
    return _decoder_for(kind)(value)


def _decoder_for(kind: Any) -> _Decoder:
    decoder = _DECODERS.get(kind)
    if decoder is None:
        decoder = _build_decoder(kind)
        _DECODERS[kind] = decoder
    return decoder


def _build_decoder(kind: Any) -> _Decoder:
    origin = typing.get_origin(kind)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _dataclass_decoder(kind)
    if origin is tuple:
        return _tuple_decoder(typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return _union_decoder(kind)
    if origin is Literal:
        return _literal_decoder(typing.get_args(kind))
    return _scalar_decoder(kind)


def _dataclass_decoder(kind: type[Any]) -> _Decoder:
    hints = typing.get_type_hints(kind)
    fields = [
        (field.name, _decoder_for(hints[field.name]), field.default is dataclasses.MISSING)
        for field in dataclasses.fields(kind)
    ]

    def decode(value: Any) -> Any:
        if type(value) is not dict:
            raise TypeError(f"{kind.__name__} is not an object")
        arguments = {}
        for name, field_decoder, required in fields:
            item = value.get(name, _NOT_GIVEN)
            if item is not _NOT_GIVEN:
                arguments[name] = field_decoder(item)
            elif required:
                raise KeyError(f"{kind.__name__}.{name}")
        # Keys we do not know come from a newer minor version; they are ignored by policy.
        return kind(**arguments)

    return decode


def _tuple_decoder(items: tuple[Any, ...]) -> _Decoder:
    if len(items) == 2 and items[1] is Ellipsis:
        element = items[0]
        if element in (int, str):
            # The hot path (MinHash slots, tokens, calls): one C-level pass collects the
            # element types. JSON yields exact int/str/bool/float/None/list/dict, so ``type(x) is
            # int`` is the same check as ``_scalar_decoder`` (bool excluded).
            allowed = frozenset((element,))
            name = element.__name__

            def decode_uniform(value: Any) -> Any:
                if type(value) is not list:
                    raise TypeError("expected an array")
                if not allowed.issuperset(map(type, value)):
                    raise TypeError(f"expected {name} items")
                return tuple(value)

            return decode_uniform
        element_decoder = _decoder_for(element)

        def decode_variadic(value: Any) -> Any:
            if type(value) is not list:
                raise TypeError("expected an array")
            return tuple(map(element_decoder, value))

        return decode_variadic
    item_decoders = [_decoder_for(item) for item in items]

    def decode_fixed(value: Any) -> Any:
        if type(value) is not list:
            raise TypeError("expected an array")
        if len(item_decoders) != len(value):
            raise TypeError("tuple length mismatch")
        return tuple(
            item_decoder(item) for item_decoder, item in zip(item_decoders, value, strict=True)
        )

    return decode_fixed


def _union_decoder(kind: Any) -> _Decoder:
    options = [_decoder_for(option) for option in typing.get_args(kind)]

    def decode(value: Any) -> Any:
        for option in options:
            try:
                return option(value)
            except (TypeError, KeyError):
                continue
        raise TypeError(f"no type of {kind} matches")

    return decode


def _literal_decoder(allowed: tuple[Any, ...]) -> _Decoder:
    def decode(value: Any) -> Any:
        if value not in allowed:
            raise TypeError(f"{value!r} is not one of {allowed}")
        return value

    return decode


def _scalar_decoder(kind: Any) -> _Decoder:
    if kind is type(None):

        def decode_null(value: Any) -> Any:
            if value is not None:
                raise TypeError("expected null")
            return None

        return decode_null
    if kind is float:

        def decode_float(value: Any) -> Any:
            if type(value) is not float and type(value) is not int:
                raise TypeError("expected a number")
            return float(value)

        return decode_float
    if kind in (int, str, bool):
        name = kind.__name__

        def decode_exact(value: Any) -> Any:
            if type(value) is not kind:
                raise TypeError(f"expected {name}")
            return value

        return decode_exact
    raise TypeError(f"unsupported field type {kind!r}")  # a model change this module missed
