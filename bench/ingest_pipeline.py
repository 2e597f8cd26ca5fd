"""Cost of the ingest pipeline around the analysis, on the PE bench KB of setting (a).

The KB part of ``bench.attribution_pe --max-file-mb 1.0`` (101 files, 38.9k functions) is
ingested into a fresh SQLite KB the way that benchmark does it (one ``ingest_groups`` call, one
group per project, ``--jobs`` worker processes, the rows its workers make kept for the build),
then ``prepare(jobs)`` runs. Printed: ingest wall, the
parent's CPU, the workers' CPU (``RUSAGE_CHILDREN``), prepare wall and CPU, the indexing speed
(functions / (ingest wall + prepare wall)), and digests of what was stored: the frozen
features payloads (``analysis_seconds``, a timing, left out) and the function rows, by sha256
and address, which must not change when only the pipeline's speed does.

``--worker-parts`` instead times, in this process and without a profiler, what a worker does
per file: the analysis, then each step of the row preparation (features encoding, zlib
compression, the indicator search, the function rows). ``--worker-cpu`` runs exactly a
worker's call per file (``ingest._analyze``: analysis and row preparation, collector paused)
``--repeat`` times in this process and prints its CPU seconds and functions per CPU second:
the workers' cost without the pool's process start-ups and the other worker's competition.

    python -m bench.ingest_pipeline --db /tmp/ingest.db
    python -m bench.ingest_pipeline --worker-parts
    python -m bench.ingest_pipeline --worker-cpu --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import re
import resource
import shutil
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any

from bench.common import load_release_corpus, project_ingest_groups, split_all_but_newest

_HEADER_BYTES = 24  # earmark.freeze's header: magic, version, payload length, CRC-32


def _kb_groups() -> list[Any]:
    files = [f for f in load_release_corpus("pe") if f.size <= 1_000_000]
    return project_ingest_groups(split_all_but_newest(files).knowledge_base)


def _stored_digests(db: Path) -> tuple[str, str]:
    features, rows = hashlib.sha256(), hashlib.sha256()
    with sqlite3.connect(db) as connection:
        for sha256, blob in connection.execute(
            "SELECT sha256, features FROM samples ORDER BY sha256"
        ):
            payload = zlib.decompress(blob[_HEADER_BYTES:])
            features.update(sha256.encode())
            features.update(re.sub(rb'"analysis_seconds":[^,}]*', b"", payload))
        for row in connection.execute(
            "SELECT s.sha256, f.address, f.size, f.instruction_count, f.block_count,"
            " f.exact_hash, f.minhash FROM functions f JOIN samples s ON s.id = f.sample_id"
            " ORDER BY s.sha256, f.address"
        ):
            rows.update(repr(row).encode())
    return features.hexdigest()[:16], rows.hexdigest()[:16]


def measure_ingest(db: Path, jobs: int) -> None:
    from earmark.attribution import open_knowledge_base
    from earmark.ingest import ingest_groups

    for stale in db.parent.glob(db.name + "*"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    groups = _kb_groups()
    wall, cpu = time.perf_counter(), time.process_time()
    with open_knowledge_base(str(db)) as kb:
        ingest_groups(kb.store, groups, jobs=jobs, rows=kb.row_spool())
        ingest_wall, ingest_cpu = time.perf_counter() - wall, time.process_time() - cpu
        workers = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall, cpu = time.perf_counter(), time.process_time()
        kb.prepare(jobs=jobs)
        prepare_wall, prepare_cpu = time.perf_counter() - wall, time.process_time() - cpu
        functions = kb.store.stats().functions
    features, rows = _stored_digests(db)
    print(
        f"ingest wall {ingest_wall:.2f} s, parent CPU {ingest_cpu:.2f} s, workers CPU "
        f"{workers.ru_utime + workers.ru_stime:.2f} s (system {workers.ru_stime:.2f} s, "
        f"{workers.ru_minflt:,} page faults); prepare wall {prepare_wall:.2f} s, "
        f"CPU {prepare_cpu:.2f} s; {functions} functions, "
        f"{functions / (ingest_wall + prepare_wall):,.0f} functions/s; "
        f"features {features}, function rows {rows}"
    )


def measure_worker_parts() -> None:
    from earmark import freeze
    from earmark.config import DEFAULT_LIMITS
    from earmark.extract import analyze_bytes
    from earmark.intel import indicators_from_strings
    from earmark.store.rows import prepare_sample

    datas = [Path(p).read_bytes() for group in _kb_groups() for p in group.paths]
    seconds = dict.fromkeys(("analysis", "encoding", "compression", "indicators", "rows"), 0.0)
    for data in datas:
        start = time.process_time()
        features = analyze_bytes(data, DEFAULT_LIMITS)
        analysed = time.process_time()
        blob = freeze.features_to_bytes(features)
        frozen = time.process_time()
        indicators_from_strings(features.strings)
        searched = time.process_time()
        prepare_sample(features, blob)
        done = time.process_time()
        seconds["analysis"] += analysed - start
        seconds["indicators"] += searched - frozen
        seconds["rows"] += done - searched
        # Freezing is encoding then compression; the encoding alone is timed apart.
        encode_start = time.process_time()
        freeze._json_payload(features)
        encoding = time.process_time() - encode_start
        seconds["encoding"] += encoding
        seconds["compression"] += frozen - analysed - encoding
    print(f"{len(datas)} files, CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))


def measure_worker_cpu(repeat: int) -> None:
    from earmark.config import DEFAULT_LIMITS
    from earmark.extract import analyze_bytes
    from earmark.ingest import _analyze, _warm_before_fork
    from earmark.store.sql import FreezeCodec

    datas = [Path(p).read_bytes() for group in _kb_groups() for p in group.paths]
    codec = FreezeCodec()
    _warm_before_fork()  # as the parent does before the pool forks
    for _ in range(repeat):
        functions = 0
        before = resource.getrusage(resource.RUSAGE_SELF)
        cpu = time.process_time()
        for data in datas:
            result = _analyze(analyze_bytes, codec, data, DEFAULT_LIMITS)
            if isinstance(result, Exception):
                raise result
            functions += result[0].function_count
        cpu = time.process_time() - cpu
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before.ru_stime
        print(
            f"{len(datas)} files, {functions} functions: CPU {cpu:.2f} s (system {system:.2f} s), "
            f"{functions / cpu:,.0f} functions per CPU s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, help="SQLite KB to create (deleted first)")
    parser.add_argument("--jobs", type=int, default=2, help="ingest worker processes")
    parser.add_argument("--worker-parts", action="store_true", help="time a worker's steps")
    parser.add_argument(
        "--worker-cpu", action="store_true", help="a worker's CPU per file, in this process"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of --worker-cpu")
    arguments = parser.parse_args()
    if arguments.worker_parts:
        measure_worker_parts()
    elif arguments.worker_cpu:
        measure_worker_cpu(arguments.repeat)
    elif arguments.db is None:
        parser.error("--db is required unless --worker-parts or --worker-cpu")
    else:
        measure_ingest(arguments.db, arguments.jobs)


if __name__ == "__main__":
    main()
