"""Handing freed C-heap memory back to the operating system between units of work.

glibc keeps memory that Python and the native libraries (lief, capstone, numpy) free on its
heap for reuse, and gives the top of the heap back only past ``M_TRIM_THRESHOLD``. After a
sample's analysis the freed instruction tables, parse trees and temporary arrays leave holes
below live blocks, so a process that analyses many samples stays near its largest sample's
size. ``malloc_trim(0)`` releases every whole free page, wherever it sits in the heap.

PE bench (a), one process running the 23 queries (analysis and attribution each): RSS after
the last query 272 -> 243 MB with a trim after each (docs/benchmarks.md, "Query process
memory"). A trim costs about a millisecond, but the pages it hands back are faulted in again
by the next unit of work, so analyses trim only past a slack (``return_free_memory_past``).
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Final

__all__ = [
    "ANALYSIS_TRIM_SLACK_BYTES",
    "LARGE_BLOCK_BYTES",
    "cyclic_collector_paused",
    "map_large_blocks",
    "return_free_memory",
    "return_free_memory_past",
]

# Growth of the resident set since the last trim that a finished analysis may leave for the
# next one before the free heap is handed back (``return_free_memory_past``). A trim after
# every analysis handed back the pages the next one faulted in again: over the 103 PE bench
# (a) KB files in one process (an ingest worker's loop), 158-161k page faults and 5.30-5.33
# CPU s against 47k and 4.93-4.96 s at 16 MiB, with the same peak (ru_maxrss 165 -> 167 MiB)
# and 1 MiB more RSS after; never trimming faulted 24-41k times (4.62-4.73 s) but kept 9 MiB.
ANALYSIS_TRIM_SLACK_BYTES: Final = 16 << 20

# Blocks from this size on are always their own mapping (glibc ``M_MMAP_THRESHOLD``), handed
# back to the system the moment they are freed. glibc's default threshold starts at 128 KiB
# but rises to the size of every mapped block freed (up to 32 MiB), so after the KB build's
# first 10 MB function table each later numpy column below that size was carved from the
# heap, and freed columns left holes under live ones that ``malloc_trim`` cannot hand back.
# PE bench (a) KB: ``prepare`` peak over the RSS before it 70 -> 55 MB and glibc's heap after
# it 54 -> 28 MB at 1 MiB (128 KiB: the same peak); the measurements are in
# docs/benchmarks.md, "Index build memory (2)". It stays for the rest of the process: set
# back to 32 MiB after each build, the PE bench process peaked at 221 instead of 212 MiB.
# The cost is paid by analyses run after a build in the same process (queries, and ingest
# workers forked after it), whose large temporaries are then fresh mappings each time:
# ~4 % more analysis CPU (130 corpus PE files, medians 9.0 -> 9.4 CPU s). 4 MiB costs about
# half that at the same process peak, but 2.5-3 MB more at the builds' own peaks.
LARGE_BLOCK_BYTES: Final = 1 << 20
_M_MMAP_THRESHOLD: Final = -3  # glibc malloc.h


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The C library the process already runs on, found by the dynamic linker.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None  # musl and other C libraries without malloc_trim
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def return_free_memory() -> bool:
    """Give the C heap's free pages back to the system; False where the C library has no
    ``malloc_trim`` (musl, macOS, Windows), where freed memory simply stays with the process."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:  # Linux: pages, the second field
            return int(statm.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return None


_trimmed_at: list[int] = []  # resident bytes after this process's last trim here


def return_free_memory_past(slack: int) -> bool:
    """``return_free_memory`` once the resident set has grown more than ``slack`` bytes past
    what it was after the last trim made here (or at the first call), so that work repeated
    unit after unit reuses the pages the last unit freed; True when it trimmed."""
    resident = _resident_bytes()
    if resident is None or _malloc_trim() is None:
        return False
    if not _trimmed_at:
        _trimmed_at.append(resident)
    if resident - _trimmed_at[0] <= slack:
        return False
    return_free_memory()
    _trimmed_at[0] = _resident_bytes() or resident
    return True


@cache
def map_large_blocks() -> bool:
    """Fix glibc's mapping threshold at LARGE_BLOCK_BYTES for the rest of the process, so
    large arrays never leave holes in the heap (see there); False where the C library has no
    ``mallopt`` threshold (not glibc). Once per process: the setting stays."""
    if _malloc_trim() is None:  # malloc_trim and M_MMAP_THRESHOLD: glibc's malloc
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES))


@contextmanager
def cyclic_collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for one allocation-heavy unit of work.

    Function recovery, code evidence and the KB build allocate 10^5..10^6 tuples and strings,
    none of them in a reference cycle, and each allocation burst set off generation scans that
    walked every live object: 30-35 % of recovery time, 0.6 of 2.6 CPU s of ``prepare``, and
    ~20 ms of every PE bench query's attribution (docs/benchmarks.md). Reference counting still
    frees everything at once; the collector is switched back on afterwards only if it was on,
    so nested pauses and callers that run with it off are left as they were.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
