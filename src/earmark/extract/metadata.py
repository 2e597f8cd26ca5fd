"""Format-neutral metadata: file hashes, TLSH, entropy, and the cleaning of untrusted text.

Every string read from a sample goes through ``clean_text`` before it reaches a model value, so
later stages (terminal, HTML, JSON) never see control characters or unbounded lengths.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy
import tlsh

from earmark.extract import disasm

# Longest text kept from any one sample field (PDB path, version string, section name...).
# Real PDB paths and version values stay under 260 characters (MAX_PATH); longer ones are junk
# or an attempt to bloat reports.
MAX_TEXT_LENGTH = 512

# TLSH needs at least 50 bytes with enough variety; below that py-tlsh returns "TNULL".
_TLSH_EMPTY = {"", "TNULL"}

# C0/C1 control characters and DEL; also the Unicode line/paragraph separators and bidi
# overrides that can reorder text shown to an analyst.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True, slots=True)
class FileHashes:
    md5: str
    sha1: str
    sha256: str
    size: int
    tlsh: str | None


def clean_text(raw: bytes | str, limit: int = MAX_TEXT_LENGTH) -> str:
    """Decode untrusted sample text, drop control characters and cap its length."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    # Cap before and after: the regex must not run over a megabyte of junk.
    text = _CONTROL_CHARACTERS.sub("", text[: limit * 4])
    return text[:limit]


def hash_file(data: bytes) -> FileHashes:
    digest = tlsh.hash(data) if len(data) >= 50 else ""
    return FileHashes(
        md5=hashlib.md5(data).hexdigest(),
        sha1=hashlib.sha1(data).hexdigest(),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        tlsh=None if digest in _TLSH_EMPTY else digest,
    )


def shannon_entropy(data: bytes) -> float:
    """Bits per byte (0..8); LIEF's value is not used so PE and ELF are measured the same way."""
    if not data:
        return 0.0
    accelerator = disasm.ACCELERATOR
    if accelerator is not None:
        # The same counts without numpy widening every byte to an int64 first (PE bench (a)
        # KB sections: ~0.028 -> ~0.006 CPU s); the tests compare the two.
        counts = numpy.frombuffer(accelerator.byte_counts(data), dtype=numpy.int64)
    else:
        counts = numpy.bincount(numpy.frombuffer(data, dtype=numpy.uint8), minlength=256)
    probabilities = counts[counts > 0] / len(data)
    # max() turns the -0.0 of a single-valued section into 0.0.
    return max(0.0, float(-(probabilities * numpy.log2(probabilities)).sum()))
