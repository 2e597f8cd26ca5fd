"""Memory and time of analysing one sample (``earmark.extract.analyze_file``), each run in a
fresh process so that one file's peak cannot hide another's.

Per run: the process's peak RSS (``resource.getrusage`` maxrss) before and after the analysis
and their difference (the analysis's own jump over the interpreter and libraries), CPU and wall
seconds; in a separate run with ``tracemalloc`` on (slower, so not timed), the Python heap's
peak during the analysis and what the analysis keeps after it (features, shared caches).

Usage:
    python -m bench.analysis_memory                    # three corpus DLLs of different sizes
    python -m bench.analysis_memory FILE... --repeat 3
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

from bench.common import corpus_root, render_table

# ~500, ~1,600 and ~3,400 functions: the small, middle and large end of the PE corpus DLLs.
DEFAULT_FILES = (
    "pe/regex/2024.11.6/_regex.cp38-win_amd64.pyd",
    "pe/zstandard/0.19.0/_cffi.cp38-win_amd64.pyd",
    "pe/pillow/11.0.0/_imaging.cp39-win_amd64.pyd",
)


def _child(path: str, trace: bool) -> dict[str, float]:
    from earmark.extract import analyze_file

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace:
        tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    features = analyze_file(path)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "functions": len(features.functions),
        "wall": wall,
        "cpu": cpu,
        "rss_before_mb": rss_before / 1024,
        "rss_peak_mb": rss_after / 1024,
    }
    if trace:
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        result["traced_peak_mb"] = peak / 1e6
        result["traced_kept_mb"] = current / 1e6
    return result


def _run(path: str, trace: bool) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.analysis_memory", "--child", path]
    if trace:
        command.append("--trace")
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(output)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per file (median)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.trace)))
        return
    files = args.files or [str(corpus_root() / name) for name in DEFAULT_FILES]
    rows = []
    for path in files:
        runs = [_run(path, trace=False) for _ in range(args.repeat)]
        traced = _run(path, trace=True)
        rows.append(
            [
                Path(path).name,
                int(runs[0]["functions"]),
                round(statistics.median(r["rss_before_mb"] for r in runs)),
                round(statistics.median(r["rss_peak_mb"] for r in runs)),
                round(statistics.median(r["rss_peak_mb"] - r["rss_before_mb"] for r in runs)),
                round(traced["traced_peak_mb"]),
                round(traced["traced_kept_mb"]),
                f"{statistics.median(r['cpu'] for r in runs):.2f}",
                f"{statistics.median(r['wall'] for r in runs):.2f}",
            ]
        )
    print(
        render_table(
            [
                "file",
                "functions",
                "RSS before MB",
                "RSS peak MB",
                "RSS jump MB",
                "traced peak MB",
                "traced kept MB",
                "CPU s",
                "wall s",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
