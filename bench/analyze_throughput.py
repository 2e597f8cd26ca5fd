"""Analysis throughput: earmark's whole extraction vs SMDA's disassembly, same files, same run.

earmark's figure is ``earmark.extract.analyze_file`` (LIEF parse, hashes + TLSH, strings,
function recovery with features, metadata); SMDA's is ``Disassembler.disassembleFile`` with
MCRIT's default configuration (bench/peers/smda_peer.py). Both run in this process, one file
at a time, on one core. CPU seconds (``time.process_time``) are the headline because the
benchmark machine is shared; wall seconds are reported too. A secondary figure runs earmark
over the same files in a 2-process pool (wall clock).

Function-start agreement per file: E = earmark's starts, S = SMDA's; |E∩S|/|S| (how much of
SMDA earmark finds) and |E∩S|/|E|. Unless ``--no-fixtures`` is given, both engines also run on
the stripped C fixtures (tests/fixtures) and are scored against the unstripped symbols.

Usage:
    python -m bench.analyze_throughput                 # newest release of each project
    python -m bench.analyze_throughput --all           # every PE file (sha256-deduplicated)
    python -m bench.analyze_throughput --projects bcrypt,pillow --limit 4
    options: --no-smda  --pool N (0: skip)  --no-fixtures  --no-split
             --no-native (earmark's pure-Python loops instead of the compiled ones)
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    CorpusFile,
    Stopwatch,
    deduplicate_by_sha256,
    load_release_corpus,
    render_table,
    version_sort_key,
)
from bench.peers import PeerUnavailableError
from bench.peers.smda_peer import SmdaResult, run_smda

from earmark.config import DEFAULT_LIMITS
from earmark.errors import EarmarkError
from earmark.extract import analyze_file, disasm
from earmark.extract.functions import recover_functions
from earmark.extract.loader import load_sample
from earmark.extract.metadata import hash_file
from earmark.extract.strings import extract_strings

ROOT = Path(__file__).resolve().parent.parent
MEGABYTE = 1_000_000
FIXTURE_SOURCES = ("fx_codec.c", "fx_dispatch.c")
FIXTURE_TOOLCHAINS = ("gcc64", "clang64", "gcc32", "mingw64", "mingw32")


@dataclass(frozen=True, slots=True)
class StageSeconds:
    """CPU seconds of earmark's stages, from a second, instrumented pass over the file."""

    parse: float  # size/magic/header checks + LIEF parse + code image
    hashes_strings: float  # md5/sha1/sha256/TLSH + ASCII/UTF-16 strings
    recovery: float  # function recovery + per-function features


@dataclass(frozen=True, slots=True)
class FileMeasurement:
    file: CorpusFile
    earmark_cpu: float
    earmark_wall: float
    earmark_starts: frozenset[int]
    earmark_error: str
    stages: StageSeconds | None
    smda: SmdaResult | None
    smda_cpu: float


def select_files(
    projects: Sequence[str] | None, limit: int | None, every_release: bool
) -> list[CorpusFile]:
    """Deduplicated corpus files: the newest release of each project, or all with --all."""
    files = deduplicate_by_sha256(load_release_corpus("pe"))
    if projects:
        files = [f for f in files if f.project in projects]
    if not every_release:
        newest: dict[str, str] = {}
        for corpus_file in files:
            current = newest.get(corpus_file.project)
            if current is None or version_sort_key(corpus_file.version) > version_sort_key(current):
                newest[corpus_file.project] = corpus_file.version
        files = [f for f in files if f.version == newest[f.project]]
    files.sort(key=lambda f: (f.project, version_sort_key(f.version), f.path.name))
    return files[:limit] if limit else files


def measure_earmark(path: Path) -> tuple[float, float, frozenset[int], str]:
    """(cpu, wall, function starts, error) of the whole extraction of one file."""
    starts: frozenset[int] = frozenset()
    error = ""
    with Stopwatch() as watch:
        try:
            starts = frozenset(f.address for f in analyze_file(path).functions)
        except EarmarkError as failure:  # a refused or timed-out file is a result, not a crash
            error = f"{type(failure).__name__}: {failure}"
    return watch.cpu, watch.wall, starts, error


def measure_stages(path: Path) -> StageSeconds | None:
    """CPU seconds per stage; metadata (sections, imports, Rich header) is the remainder."""
    data = path.read_bytes()
    try:
        started = time.process_time()
        loaded = load_sample(data, DEFAULT_LIMITS)
        parsed = time.process_time()
        hash_file(data)
        extract_strings(data, DEFAULT_LIMITS)
        stringed = time.process_time()
        recover_functions(loaded.image, DEFAULT_LIMITS, time.monotonic() + 3600)
        recovered = time.process_time()
    except EarmarkError:
        return None
    return StageSeconds(parsed - started, stringed - parsed, recovered - stringed)


def measure_file(corpus_file: CorpusFile, with_smda: bool, with_split: bool) -> FileMeasurement:
    cpu, wall, starts, error = measure_earmark(corpus_file.path)
    stages = measure_stages(corpus_file.path) if with_split and not error else None
    smda: SmdaResult | None = None
    smda_cpu = 0.0
    if with_smda:
        # SMDA's cyclic garbage is collected on SMDA's clock, and what survives is frozen out
        # of later collections: otherwise both were charged to earmark's next file, whose
        # collections traversed SMDA's heap (measured: earmark 0.94 MB/s beside SMDA vs
        # 1.26 MB/s alone, the difference all in the stage pass's unexplained remainder).
        with Stopwatch() as watch:
            smda = run_smda(corpus_file.path)
            gc.collect()
        smda_cpu = watch.cpu
        gc.freeze()
    return FileMeasurement(corpus_file, cpu, wall, starts, error, stages, smda, smda_cpu)


def _count_functions(path: Path) -> int:
    try:
        return len(analyze_file(path).functions)
    except EarmarkError:
        return 0


def pool_wall_seconds(files: Sequence[CorpusFile], workers: int) -> tuple[float, int]:
    """Wall seconds for earmark over ``files`` in a pool of ``workers`` processes."""
    paths = [f.path for f in sorted(files, key=lambda f: -f.size)]  # longest first: less idle
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_count_functions, paths[:workers]))  # start-up (imports) not counted
        started = time.perf_counter()
        functions = sum(pool.map(_count_functions, paths))
        return time.perf_counter() - started, functions


# --------------------------------------------------------------------------- reporting


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else float("nan")


def _agreement(measurements: Iterable[FileMeasurement]) -> tuple[float, float]:
    both = found_by_smda = found_by_earmark = 0
    for m in measurements:
        if m.smda is None or m.smda.status != "ok" or m.earmark_error:
            continue
        smda_starts = set(m.smda.function_starts)
        both += len(m.earmark_starts & smda_starts)
        found_by_smda += len(smda_starts)
        found_by_earmark += len(m.earmark_starts)
    return _rate(both, found_by_smda), _rate(both, found_by_earmark)


def summary_rows(measurements: Sequence[FileMeasurement]) -> list[list[object]]:
    groups: dict[str, list[FileMeasurement]] = defaultdict(list)
    for m in measurements:
        groups[m.file.project].append(m)
    rows: list[list[object]] = []
    for label, group in [*sorted(groups.items()), ("TOTAL", list(measurements))]:
        size = sum(m.file.size for m in group) / MEGABYTE
        e_cpu = sum(m.earmark_cpu for m in group)
        s_cpu = sum(m.smda_cpu for m in group)
        e_functions = sum(len(m.earmark_starts) for m in group)
        s_functions = sum(len(m.smda.function_starts) for m in group if m.smda is not None)
        recall_of_smda, share_in_smda = _agreement(group)
        rows.append(
            [
                label,
                len(group),
                round(size, 2),
                _rate(size, e_cpu),
                _rate(size, s_cpu),
                _rate(s_cpu, e_cpu) if s_cpu else "-",
                _rate(len(group), e_cpu),
                _rate(len(group), s_cpu),
                round(_rate(e_functions, e_cpu)),
                round(_rate(s_functions, s_cpu)) if s_cpu else "-",
                recall_of_smda,
                share_in_smda,
            ]
        )
    return rows


SUMMARY_HEADERS = (
    "project",
    "files",
    "MB",
    "earmark MB/s",
    "SMDA MB/s",
    "speed-up",
    "earmark samples/s",
    "SMDA samples/s",
    "earmark fn/s",
    "SMDA fn/s",
    "E∩S / S",  # share of SMDA's starts earmark also finds
    "E∩S / E",  # share of earmark's starts SMDA also finds
)


def stage_rows(measurements: Sequence[FileMeasurement]) -> list[list[object]]:
    timed = [m for m in measurements if m.stages is not None]
    parse = sum(m.stages.parse for m in timed if m.stages)
    strings = sum(m.stages.hashes_strings for m in timed if m.stages)
    recovery = sum(m.stages.recovery for m in timed if m.stages)
    total = sum(m.earmark_cpu for m in timed)
    rest = max(0.0, total - parse - strings - recovery)
    return [
        [name, seconds, _rate(seconds, total)]
        for name, seconds in (
            ("LIEF parse + code image", parse),
            ("hashes, TLSH, strings", strings),
            ("function recovery + features", recovery),
            ("metadata (remainder)", rest),
            ("analyze_file total", total),
        )
    ]


def fixture_rows(with_smda: bool) -> list[list[object]]:
    """Start recall/precision of both engines on the stripped fixtures, against symbols."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.build import TOOLCHAINS, FixtureBuilder
    from fixtures.truth import truth_functions

    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="earmark-throughput-") as out:
        builder = FixtureBuilder(Path(out))
        for toolchain in FIXTURE_TOOLCHAINS:
            if not TOOLCHAINS[toolchain].available():
                continue
            totals = {"earmark": [0, 0, 0], "SMDA": [0, 0, 0]}  # hits, truth, found
            for source in FIXTURE_SOURCES:
                build = builder.build(source, toolchain, "O2")
                truth = set(truth_functions(build.unstripped))
                engines: dict[str, set[int]] = {
                    "earmark": {f.address for f in analyze_file(build.stripped).functions}
                }
                if with_smda:
                    engines["SMDA"] = set(run_smda(build.stripped).function_starts)
                for engine, found in engines.items():
                    counts = totals[engine]
                    counts[0] += len(found & truth)
                    counts[1] += len(truth)
                    counts[2] += len(found)
            for engine, (hits, truth_count, found_count) in totals.items():
                if truth_count and (engine == "earmark" or with_smda):
                    rows.append(
                        [
                            toolchain,
                            engine,
                            _rate(hits, truth_count),
                            _rate(hits, found_count),
                        ]
                    )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--projects", help="comma-separated project names")
    parser.add_argument("--limit", type=int, help="at most N files")
    parser.add_argument("--all", action="store_true", help="every release, not only the newest")
    parser.add_argument("--no-smda", action="store_true", help="earmark only")
    parser.add_argument("--pool", type=int, default=2, help="workers for the pool figure (0: skip)")
    parser.add_argument("--no-fixtures", action="store_true", help="skip the fixture ground truth")
    parser.add_argument("--no-split", action="store_true", help="skip the per-stage timing pass")
    parser.add_argument(
        "--no-native",
        action="store_true",
        help="earmark's pure-Python loops (what a machine without a C compiler runs)",
    )
    args = parser.parse_args(argv)
    if args.no_native:
        disasm.ACCELERATOR = None
    projects = [p.strip() for p in args.projects.split(",")] if args.projects else None
    files = select_files(projects, args.limit, args.all)
    with_smda = not args.no_smda
    if files:  # imports and first-use set-up of both engines, not measured
        measure_earmark(files[0].path)
        if with_smda:
            try:
                run_smda(files[0].path)
            except PeerUnavailableError as error:
                print(f"SMDA unavailable ({error}); measuring earmark only", file=sys.stderr)
                with_smda = False
        gc.collect()
        gc.freeze()  # long-lived state of both engines: not traversed by the measured runs
    command = "python -m bench.analyze_throughput " + shlex.join(list(argv or sys.argv[1:]))
    print(f"# {command}")
    print(f"# {len(files)} files, {sum(f.size for f in files) / MEGABYTE:.1f} MB")
    loops = "compiled (_native)" if disasm.ACCELERATOR is not None else "pure Python"
    print(f"# earmark inner loops: {loops}")
    measurements: list[FileMeasurement] = []
    for corpus_file in files:
        m = measure_file(corpus_file, with_smda, not args.no_split)
        measurements.append(m)
        smda_text = (
            f"SMDA {m.smda_cpu:6.2f}s {len(m.smda.function_starts):5d} fn {m.smda.status}"
            if m.smda is not None
            else ""
        )
        print(
            f"{corpus_file.project:12s} {corpus_file.path.name[:32]:32s} "
            f"{corpus_file.size / MEGABYTE:6.2f} MB  earmark {m.earmark_cpu:6.2f}s "
            f"{len(m.earmark_starts):5d} fn {m.earmark_error}  {smda_text}",
            flush=True,
        )
    print("\nSingle core, CPU seconds (one file at a time, in-process):")
    print(render_table(SUMMARY_HEADERS, summary_rows(measurements)))
    if not args.no_split:
        print("\nearmark stages (CPU seconds, second pass):")
        print(render_table(("stage", "seconds", "share"), stage_rows(measurements)))
    wall_e = sum(m.earmark_wall for m in measurements)
    wall_s = sum(m.smda.seconds for m in measurements if m.smda is not None)
    size = sum(m.file.size for m in measurements) / MEGABYTE
    print(f"\nWall clock, single core: earmark {_rate(size, wall_e):.2f} MB/s", end="")
    print(f", SMDA {_rate(size, wall_s):.2f} MB/s" if with_smda else "")
    if args.pool > 0 and files:
        seconds, functions = pool_wall_seconds(files, args.pool)
        print(
            f"earmark, {args.pool}-process pool (wall): {_rate(size, seconds):.2f} MB/s, "
            f"{_rate(len(files), seconds):.2f} samples/s, {_rate(functions, seconds):.0f} fn/s"
        )
    if not args.no_fixtures:
        print("\nFunction starts on stripped fixtures (-O2) vs unstripped symbols:")
        print(render_table(("toolchain", "engine", "recall", "precision"), fixture_rows(with_smda)))
    gc.unfreeze()  # let interpreter shutdown free the frozen objects (LIEF reports leaks else)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
