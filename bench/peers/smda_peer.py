"""Run SMDA (the disassembler behind MCRIT) on a file: function starts and seconds.

SMDA is used with its default configuration, as MCRIT uses it, except for the per-file time
budget. Its own timeout is cooperative (checked between analysis steps), which is how MCRIT
bounds it too; a file that hits it yields ``status == "timeout"`` and the functions found so far.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.peers import PeerUnavailableError, quiet_peer_output

if TYPE_CHECKING:
    from smda.common.SmdaReport import SmdaReport

# Per-file budget. The largest corpus file (a 12 MB OpenSSL-in-a-DLL) takes SMDA ~60 s on one
# core; 300 s is SMDA's own default and leaves room for slower machines without letting one
# pathological file stall a benchmark.
SMDA_TIMEOUT_SECONDS = 300


@dataclass(frozen=True, slots=True)
class SmdaResult:
    path: Path
    status: str  # "ok", "timeout" or "error" (SMDA's own vocabulary)
    function_starts: tuple[int, ...]  # virtual addresses, sorted
    instruction_count: int
    seconds: float  # wall time of the disassembly, as measured around SMDA's call
    message: str  # SMDA's status message, or the exception text on error


def _require_smda() -> tuple[Any, Any]:
    quiet_peer_output()
    try:
        from smda.Disassembler import Disassembler
        from smda.SmdaConfig import SmdaConfig
    except ImportError as error:
        raise PeerUnavailableError("SMDA is not installed: pip install -e '.[bench]'") from error
    return Disassembler, SmdaConfig


def disassemble_with_smda(
    path: Path, timeout_seconds: int = SMDA_TIMEOUT_SECONDS
) -> tuple[SmdaReport, float]:
    """SMDA's report for ``path`` and the wall seconds it took. SMDA turns most failures into
    a report with status "error" itself; the rest propagate (MemoryError, KeyboardInterrupt)."""
    disassembler_class, config_class = _require_smda()
    config = config_class()
    config.TIMEOUT = timeout_seconds
    started = time.perf_counter()
    report = disassembler_class(config).disassembleFile(str(path))
    return report, time.perf_counter() - started


def run_smda(path: Path, timeout_seconds: int = SMDA_TIMEOUT_SECONDS) -> SmdaResult:
    """Function starts SMDA recovers from ``path``; failures become a result with status "error"."""
    try:
        report, seconds = disassemble_with_smda(path, timeout_seconds)
    except PeerUnavailableError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # SMDA is a third-party parser fed hostile files: one file's
        # crash must not end the benchmark; the error is recorded in the result instead.
        return SmdaResult(path, "error", (), 0, 0.0, f"{type(error).__name__}: {error}")
    starts: tuple[int, ...] = ()
    instruction_count = 0
    if report.status != "error" and report.xcfg:
        starts = tuple(sorted(fn.offset for fn in report.getFunctions() if fn.offset is not None))
        instruction_count = int(report.num_instructions)
    message = str(report.message or "").strip().splitlines()
    return SmdaResult(
        path=path,
        status=str(report.status),
        function_starts=starts,
        instruction_count=instruction_count,
        seconds=seconds,
        message=message[-1] if message else "",
    )
