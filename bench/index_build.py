"""Cost of the index build (``KnowledgeBase.prepare``) on a copy of a knowledge base.

Each run is a fresh process on a fresh copy of the KB without its caches, so the build starts
from nothing, as after an ingest: CPU and wall seconds of ``prepare()``, the process's RSS
before it, its peak (``ru_maxrss``) and its RSS after, and a digest of every cache file the
build wrote (``<db>.index``, ``<db>.features``, ``<db>.artefacts``), which must not change
when only the build's speed or memory does.

    python -m bench.index_build --db /path/kb.db --runs 3
    python -m bench.index_build --db /path/kb.db --runs 3 --jobs 2   # decoding in 2 processes
    python -m bench.index_build --db /tmp/pe-a.db --build-pe-a   # ingest the PE bench KB first

``--build-pe-a`` ingests the KB part of the PE attribution benchmark's setting (a), files of
at most 1 MB (``bench.attribution_pe --max-file-mb 1.0``: 101 samples, 38.9k functions).

    python -m bench.index_build --pe-sequence

replays the earmark child of ``bench.attribution_pe --max-file-mb 1.0`` in this process
(settings (a) then (c): ingest, prepare, queries, each in a fresh temporary KB) and prints
the process peak (``ru_maxrss``, MiB) after every step that raised it, so a build's share
of the benchmark's process peak is seen in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import load_release_corpus, project_ingest_groups, split_all_but_newest


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 1e6


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux


def _cache_digest(db: Path) -> str:
    """Digest of the built caches beside ``db``: the function index, the feature stage, the
    artefact statistics. The row cache (``<db>.rows``) is left out: its files record the
    stored bytes they were made from, and those hold the analysis time."""
    digest = hashlib.sha256()
    for cache in sorted(db.parent.glob(db.name + ".*")):
        if cache.is_dir() and cache.suffix != ".rows":
            for item in sorted(cache.iterdir()):
                digest.update(item.name.encode())
                digest.update(item.read_bytes())
    return digest.hexdigest()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_once(source: Path, jobs: int = 1) -> dict[str, float | str]:
    """``prepare(jobs)`` on a copy of ``source`` (its caches left behind), in this process;
    with ``jobs`` > 1 the CPU of the build processes is reported apart (``workers_cpu_s``)."""
    from earmark.attribution import open_knowledge_base

    with tempfile.TemporaryDirectory(prefix="earmark-index-build-") as temporary:
        db = Path(temporary) / "kb.db"
        shutil.copy(source, db)
        with open_knowledge_base(str(db)) as kb:
            kb.store.revision()  # the connection and schema check, not the build
            before = _rss_mb()
            cpu, wall, workers = time.process_time(), time.perf_counter(), _children_cpu()
            kb.prepare(jobs=jobs)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            workers = _children_cpu() - workers
            after = _rss_mb()
        return {
            "cpu_s": round(cpu, 3),
            "workers_cpu_s": round(workers, 3),
            "wall_s": round(wall, 3),
            "rss_before_mb": round(before, 1),
            "peak_mb": round(_peak_mb(), 1),
            "peak_over_before_mb": round(_peak_mb() - before, 1),
            # the largest build process's peak (``ru_maxrss`` of waited children)
            "worker_peak_mb": round(
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
            ),
            "rss_after_mb": round(after, 1),
            "cache_digest": _cache_digest(db),
        }


def build_pe_a(db: Path) -> None:
    """Ingest the KB files of PE setting (a), files of at most 1 MB, into ``db``."""
    from earmark.attribution import open_knowledge_base
    from earmark.ingest import ingest_groups

    files = [f for f in load_release_corpus("pe") if f.size <= 1_000_000]
    groups = project_ingest_groups(split_all_but_newest(files).knowledge_base)
    with open_knowledge_base(str(db)) as kb:
        ingest_groups(kb.store, groups, jobs=2, rows=kb.row_spool())


def pe_sequence() -> None:
    """The PE bench's (a)+(c) earmark child, step by step, with the peak after each step."""
    from bench.attribution_pe import (
        EARMARK_INGEST_JOBS,
        EARMARK_TOP_HYPOTHESES,
        build_groups,
        earmark_ingest_groups,
    )

    def peak_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux

    last = peak_mib()

    def step(what: str) -> None:
        nonlocal last
        if peak_mib() > last + 0.5:
            print(f"{what:50s} peak {last:6.1f} -> {peak_mib():6.1f} MiB", flush=True)
        last = peak_mib()

    plan = argparse.Namespace(
        settings=["a", "c"],
        projects=None,
        limit_files=None,
        max_file_mb=1.0,
        goodware_third_party=False,
    )
    phases = build_groups(load_release_corpus("pe"), plan)[0]["phases"]
    step("plan")
    from earmark.attribution import attribute_sample, open_knowledge_base
    from earmark.extract import analyze_file
    from earmark.extract.lief_assembly import release_lief_assembly
    from earmark.ingest import ingest_groups

    release_lief_assembly()  # as the bench's engine process does
    step("imports")
    with (
        tempfile.TemporaryDirectory(prefix="earmark-pe-sequence-") as temporary,
        open_knowledge_base(str(Path(temporary) / "kb.db")) as kb,
    ):
        for phase in phases:
            setting = phase["setting"]
            groups = earmark_ingest_groups(phase)
            ingest_groups(kb.store, groups, jobs=EARMARK_INGEST_JOBS, rows=kb.row_spool())
            step(f"{setting} ingest")
            kb.prepare(jobs=EARMARK_INGEST_JOBS)
            step(f"{setting} prepare")
            for entry in phase["queries"]:
                features = analyze_file(Path(entry["path"]))
                step(f"{setting} analyse {Path(entry['path']).name}")
                attribute_sample(kb, features, top=EARMARK_TOP_HYPOTHESES, artefacts=True)
                step(f"{setting} attribute {Path(entry['path']).name}")
    print(f"process peak {peak_mib():.1f} MiB ({peak_mib() * 1.048576:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, help="SQLite KB to copy and build")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes, one build each")
    parser.add_argument("--build-pe-a", action="store_true", help="ingest the PE (a) KB first")
    parser.add_argument("--jobs", type=int, default=1, help="prepare(jobs=N): build processes")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--pe-sequence", action="store_true", help="replay the PE bench's (a)+(c) child"
    )
    arguments = parser.parse_args()
    if arguments.pe_sequence:
        pe_sequence()
        return
    if arguments.db is None:
        parser.error("--db is required")
    if arguments.one:
        print(json.dumps(measure_once(arguments.db, arguments.jobs)))
        return
    if arguments.build_pe_a and not arguments.db.exists():
        build_pe_a(arguments.db)
    runs = []
    for _ in range(arguments.runs):
        command = [sys.executable, "-m", "bench.index_build", "--db", str(arguments.db)]
        command += ["--jobs", str(arguments.jobs), "--one"]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(output.strip().splitlines()[-1]))
        print(runs[-1])
    digests = {run["cache_digest"] for run in runs}
    print(f"runs {len(runs)}; same caches in every run: {len(digests) == 1}")
    for name in ("cpu_s", "workers_cpu_s", "wall_s", "peak_over_before_mb", "rss_after_mb"):
        values = sorted(float(run[name]) for run in runs)
        print(f"{name}: min {values[0]} median {values[len(values) // 2]} max {values[-1]}")


if __name__ == "__main__":
    main()
