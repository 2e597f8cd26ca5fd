"""Freed C-heap pages go back to the system when asked (glibc), and asking is harmless elsewhere."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from earmark import memory
from earmark.memory import (
    cyclic_collector_paused,
    return_free_memory,
    return_free_memory_past,
)

_GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


@pytest.mark.skipif(not _GLIBC, reason="malloc_trim is a glibc function")
def test_freed_heap_below_a_live_block_is_returned() -> None:
    blocks = [bytearray(2000) for _ in range(20_000)]  # ~40 MB of heap chunks, all touched
    pin = bytearray(2000)  # allocated after them: the heap top stays in use
    del blocks
    before = _resident_bytes()
    assert return_free_memory()
    assert before - _resident_bytes() > 20_000_000
    del pin


_LARGE_BLOCKS_CHILD = """
from pathlib import Path
from earmark.memory import LARGE_BLOCK_BYTES, map_large_blocks

def resident():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

assert map_large_blocks()
# A freed 16 MiB block raises glibc's own threshold to 16 MiB; the fixed one stays.
del_after = b"\\x01" * (16 << 20)
del del_after
size = 4 * LARGE_BLOCK_BYTES
blocks, pins = [], []
for _ in range(8):
    blocks.append(b"\\x01" * size)  # every page written
    pins.append(bytearray(4000))  # heap chunks after each block: no heap top to trim
before = resident()
del blocks  # no malloc_trim: each block is its own mapping, unmapped by free()
print(before - resident(), size)
"""


@pytest.mark.skipif(not _GLIBC, reason="M_MMAP_THRESHOLD is a glibc setting")
def test_large_blocks_go_back_to_the_system_when_freed() -> None:
    # In a fresh interpreter: glibc serves a large request from a free heap chunk big enough
    # before it maps one, and a long test session's heap has such chunks.
    child = subprocess.run(
        [sys.executable, "-c", _LARGE_BLOCKS_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    returned, size = map(int, child.stdout.split())
    assert returned > 6 * size


_SLACK_CHILD = """
from pathlib import Path
from earmark.memory import return_free_memory_past

def resident():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

slack = 8 << 20
assert not return_free_memory_past(slack)  # the first call: where growth is counted from
pin = bytearray(2000)
small = [bytearray(2000) for _ in range(1_000)]  # ~2 MB, within the slack
del small
assert not return_free_memory_past(slack)  # kept for the next unit of work
blocks = [bytearray(2000) for _ in range(20_000)]  # ~40 MB of heap chunks, all touched
pin2 = bytearray(2000)  # the heap top stays in use
del blocks
before = resident()
assert return_free_memory_past(slack)
returned = before - resident()
assert not return_free_memory_past(slack)  # counted from the trim now
print(returned)
"""


@pytest.mark.skipif(not _GLIBC, reason="malloc_trim is a glibc function")
def test_free_heap_is_returned_only_past_the_slack() -> None:
    # In a fresh interpreter, whose resident set only this code moves.
    child = subprocess.run(
        [sys.executable, "-c", _SLACK_CHILD], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    assert int(child.stdout) > 20_000_000


def test_nothing_is_trimmed_past_the_slack_without_malloc_trim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)  # musl, macOS, Windows
    assert not return_free_memory_past(0)
    assert not return_free_memory_past(0)


def test_return_free_memory_answers_whether_it_could() -> None:
    # glibc has malloc_trim; musl, macOS and Windows do not, and the call is then a no-op.
    assert return_free_memory() is _GLIBC


def test_collector_pause_restores_what_it_found() -> None:
    was_enabled = gc.isenabled()
    try:
        gc.enable()
        with cyclic_collector_paused():
            assert not gc.isenabled()
            with cyclic_collector_paused():  # nested pauses leave it off until the outer one ends
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert gc.isenabled()
        gc.disable()
        with cyclic_collector_paused():
            pass
        assert not gc.isenabled()  # a caller that runs with it off keeps it off
        gc.enable()
        with pytest.raises(RuntimeError), cyclic_collector_paused():
            raise RuntimeError("work failed")
        assert gc.isenabled()  # switched back on when the work fails, too
    finally:
        (gc.enable if was_enabled else gc.disable)()


def test_collector_pause_decorates_a_function() -> None:
    @cyclic_collector_paused()
    def inside() -> bool:
        return gc.isenabled()

    gc.enable()
    assert inside() is False
    assert gc.isenabled()
