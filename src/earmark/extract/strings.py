"""Printable ASCII and UTF-16LE string runs with their file offsets, as ``strings -n N`` finds them.

One compiled ``re`` pass per encoding over the whole file: the regex engine scans in C, so a
10 MB sample takes tens of milliseconds rather than seconds in a Python loop per byte. Where the
compiled core is built (``earmark.extract.disasm.ACCELERATOR``), its ``string_runs`` does both
scans and the merge in one call instead: the UTF-16LE regex tries its pair at every byte, and
the two scans cost ~0.7 of an ingest worker's ~8 CPU s on the PE bench (a) KB against ~0.2 s
(docs/benchmarks.md, "Ingest worker CPU (2)"). The regex scans stay the reference; the tests
compare the two.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Iterator

from earmark.config import Limits
from earmark.extract import disasm
from earmark.model.sample import StringRef

# Characters kept from one string. Longer printable runs are embedded scripts, base64 blobs or
# padding; their first 1024 characters carry whatever an indicator search needs.
MAX_STRING_LENGTH = 1024

# Printable ASCII plus tab: what `strings` prints; control characters never reach a StringRef.
_PRINTABLE = rb"[\x20-\x7e\t]"


def _ascii_pattern(min_length: int) -> re.Pattern[bytes]:
    return re.compile(_PRINTABLE + b"{%d,}" % min_length)


def _utf16_pattern(min_length: int) -> re.Pattern[bytes]:
    # A printable ASCII character followed by a zero byte: Latin text stored as UTF-16LE,
    # which is how Windows programs keep wide-string literals.
    return re.compile(b"(?:" + _PRINTABLE + b"\x00){%d,}" % min_length)


def _ascii_runs(data: bytes, min_length: int) -> Iterator[StringRef]:
    for match in _ascii_pattern(min_length).finditer(data):
        text = match.group()[:MAX_STRING_LENGTH].decode("ascii")
        yield StringRef(offset=match.start(), encoding="ascii", value=text)


def _utf16_runs(data: bytes, min_length: int) -> Iterator[StringRef]:
    for match in _utf16_pattern(min_length).finditer(data):
        text = match.group()[: 2 * MAX_STRING_LENGTH].decode("utf-16-le")
        yield StringRef(offset=match.start(), encoding="utf-16le", value=text)


def extract_strings(data: bytes, limits: Limits) -> tuple[tuple[StringRef, ...], bool]:
    """All ASCII and UTF-16LE runs of at least ``limits.min_string_length`` characters, in
    file-offset order, at most ``limits.max_strings``. The flag says whether the cap was hit."""
    cap = limits.max_strings
    accelerator = disasm.ACCELERATOR
    # A minimum under one character (empty runs) is left to the regex scans' own answer.
    if accelerator is not None and limits.min_string_length >= 1:
        runs = accelerator.string_runs(data, limits.min_string_length, MAX_STRING_LENGTH, cap + 1)
        found = tuple(
            StringRef(offset, "utf-16le" if wide else "ascii", text) for offset, wide, text in runs
        )
        return found[:cap], len(found) > cap
    # Each encoding alone cannot contribute more than the cap, so each stream is cut there
    # before merging; the merge then keeps the first `cap` by offset.
    ascii_runs = itertools.islice(_ascii_runs(data, limits.min_string_length), cap + 1)
    utf16_runs = itertools.islice(_utf16_runs(data, limits.min_string_length), cap + 1)
    merged = heapq.merge(ascii_runs, utf16_runs, key=lambda string: string.offset)
    found = tuple(itertools.islice(merged, cap + 1))
    return found[:cap], len(found) > cap
