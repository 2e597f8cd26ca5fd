"""The one entry point from raw bytes to a parsed sample: cheap sanity checks first, then LIEF.

Order matters for hostile input: size and magic are checked before anything is parsed, then the
header geometry (section count, overlapping or absurd ranges) is checked with ``struct`` on the
raw bytes, and only then is LIEF asked to parse. Any LIEF failure becomes a ``MalformedFileError``
(``raise ... from e``), so callers see only ``InputError`` subclasses for bad samples.

LIEF is touched here and in the format modules this one dispatches to (``pe_image``,
``pe_metadata``, ``elf_image``, ``elf_metadata``); nothing above ``earmark.extract`` sees it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import lief

from earmark.config import Limits
from earmark.errors import (
    EmptyFileError,
    FileTooLargeError,
    MalformedFileError,
    UnsupportedFormatError,
)
from earmark.extract import elf_image, pe_image
from earmark.extract.image import CodeImage
from earmark.model.sample import SampleFormat

# LIEF logs parse complaints to stderr by default; a library must not write to the terminal,
# and its complaints about hostile files are expected, so they are turned off once.
lief.logging.disable()

_PE_MAGIC = b"MZ"
_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True, slots=True)
class LoadedSample:
    """A parsed sample: its code image plus the LIEF object the metadata modules read."""

    format: SampleFormat
    image: CodeImage
    binary: lief.PE.Binary | lief.ELF.Binary
    header: pe_image.PeHeader | elf_image.ElfHeader  # what the raw-byte checks read
    warnings: tuple[str, ...]


def detect_format(data: bytes, limits: Limits) -> SampleFormat:
    """Size and magic checks only: no parsing. Raises the matching ``InputError``."""
    if len(data) == 0:
        raise EmptyFileError("the file is empty")
    if len(data) > limits.max_file_bytes:
        raise FileTooLargeError(
            f"the file has {len(data)} bytes, over the limit of {limits.max_file_bytes} "
            "(Limits.max_file_bytes)"
        )
    if data.startswith(_ELF_MAGIC):
        return "elf"
    if data.startswith(_PE_MAGIC):
        return "pe"
    raise UnsupportedFormatError("not a PE or ELF file (unknown magic bytes)")


def load_sample(data: bytes, limits: Limits) -> LoadedSample:
    """Check, parse and map ``data``; every refusal is an ``InputError`` subclass."""
    sample_format = detect_format(data, limits)
    if sample_format == "pe":
        header = pe_image.check_pe_header(data, limits)
        binary = _parse_pe(data)
        with parser_failures_as_malformed("PE"):
            image, image_warnings = pe_image.build_pe_image(binary, header, data)
        warnings = header.warnings + image_warnings
        return LoadedSample("pe", image, binary, header, warnings)
    elf_header = elf_image.check_elf_header(data, limits)
    elf_binary = _parse_elf(data)
    with parser_failures_as_malformed("ELF"):
        image, image_warnings = elf_image.build_elf_image(elf_binary, elf_header, data)
    warnings = elf_header.warnings + image_warnings
    return LoadedSample("elf", image, elf_binary, elf_header, warnings)


@contextmanager
def parser_failures_as_malformed(what: str) -> Iterator[None]:
    """Turn LIEF's failures while reading an already parsed object into MalformedFileError.

    LIEF's bindings raise SystemError/RuntimeError (nanobind) or ValueError (enum conversion of
    an undocumented value) when a getter meets a field that the parse let through. For
    undocumented enum values in lists (symbol types, flags) LIEF only emits a RuntimeWarning and
    returns an unnamed value, which compares unequal to every known one: that is the behaviour
    we want, so those warnings are silenced here rather than surfacing per symbol.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    except (SystemError, RuntimeError, ValueError) as e:
        raise MalformedFileError(
            f"the {what} parser failed on this file: {type(e).__name__}"
        ) from e


def _parse_pe(data: bytes) -> lief.PE.Binary:
    config = lief.PE.ParserConfig()
    # .pdata gives function starts on x64; LIEF skips it unless asked.
    config.parse_exceptions = True
    try:
        binary = lief.PE.parse(data, config)
    except Exception as e:  # LIEF raises assorted internal types on hostile input
        raise MalformedFileError(f"the PE parser failed: {type(e).__name__}") from e
    if binary is None:
        raise MalformedFileError("the PE parser could not read this file")
    return binary


def _parse_elf(data: bytes) -> lief.ELF.Binary:
    try:
        binary = lief.ELF.parse(data)
    except Exception as e:  # LIEF raises assorted internal types on hostile input
        raise MalformedFileError(f"the ELF parser failed: {type(e).__name__}") from e
    if binary is None:
        raise MalformedFileError("the ELF parser could not read this file")
    return binary
