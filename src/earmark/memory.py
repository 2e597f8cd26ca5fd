"""Handing freed C-heap memory back to the operating system between units of work.

glibc keeps memory that Python and the native libraries (lief, capstone, numpy) free on its
heap for reuse, and gives the top of the heap back only past ``M_TRIM_THRESHOLD``. After a
sample's analysis the freed instruction tables, parse trees and temporary arrays leave holes
below live blocks, so a process that analyses many samples stays near its largest sample's
size. ``malloc_trim(0)`` releases every whole free page, wherever it sits in the heap.

PE bench (a), one process running the 23 queries (analysis and attribution each): RSS after
the last query 272 -> 243 MB with a trim after each (docs/benchmarks.md, "Query process
memory"). A trim costs about a millisecond.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache

__all__ = ["cyclic_collector_paused", "return_free_memory"]


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
