"""Memory of one query process: RSS at each step while it answers the PE bench queries in turn.

The process imports earmark, opens a knowledge base of setting (a) (every release but the newest,
files <= ``--max-file-mb``), loads what a query reads (function index, feature stage, artefact
statistics), then for each query of the chosen setting runs ``analyze_file`` and
``attribute_sample`` as ``earmark attribute`` does. It prints RSS (/proc/self/statm) after the
imports, after loading the KB and after each query, and the process's getrusage peak, in MB of
10^6 bytes. What a long-lived query process (``earmark serve``, a batch of attributions) keeps
between queries shows as the creep from the KB line to the last query.

The KB is built once (ingest and ``prepare`` in a child process, so the measured process never
ingested) and reused while it exists.

Usage:
    python -m bench.query_memory [--db /tmp/earmark-query-memory.db] [--setting a|c]
        [--max-file-mb 1.0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import (
    CorpusFile,
    current_rss_bytes,
    load_release_corpus,
    project_ingest_groups,
    split_all_but_newest,
    split_third_party_queries,
)

_MB = 1e6


def _rss_mb() -> float:
    return round(current_rss_bytes() / _MB, 1)


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _MB, 1)


@dataclass(frozen=True, slots=True)
class QueryStep:
    query: str
    functions: int
    analysis_s: float
    match_s: float
    rss_mb: float
    peak_mb: float


@dataclass(frozen=True, slots=True)
class QueryMemory:
    setting: str
    started_rss_mb: float  # bench.common and the corpus list only
    imported_rss_mb: float
    kb_loaded_rss_mb: float
    queries: list[QueryStep]
    query_cpu_s: float
    peak_mb: float


def _corpus(max_file_mb: float) -> list[CorpusFile]:
    return [f for f in load_release_corpus("pe") if f.size <= max_file_mb * _MB]


def _build(db: Path, max_file_mb: float) -> None:
    from earmark.attribution import open_knowledge_base
    from earmark.ingest import ingest_groups

    groups = project_ingest_groups(split_all_but_newest(_corpus(max_file_mb)).knowledge_base)
    with open_knowledge_base(str(db)) as kb:
        ingest_groups(kb.store, groups, jobs=2, rows=kb.row_spool())
        kb.prepare(jobs=2)


def _measure(db: Path, setting: str, max_file_mb: float, keep_lief: bool) -> QueryMemory:
    files = _corpus(max_file_mb)
    split = split_all_but_newest(files) if setting == "a" else split_third_party_queries(files)
    started = _rss_mb()
    from earmark.attribution import attribute_sample, open_knowledge_base
    from earmark.extract import analyze_file
    from earmark.extract.lief_assembly import release_lief_assembly

    if not keep_lief:
        release_lief_assembly()  # as the ``earmark`` command does in its process

    imported = _rss_mb()
    steps: list[QueryStep] = []
    cpu_started = time.process_time()
    with open_knowledge_base(str(db)) as kb:
        kb.index()
        kb.feature_candidates()
        kb.artefact_stats()
        loaded = _rss_mb()
        for file in split.queries:
            began = time.perf_counter()
            features = analyze_file(file.path)
            analysed = time.perf_counter()
            attribute_sample(kb, features, top=100)
            steps.append(QueryStep(
                query=f"{file.project}/{file.path.name}",
                functions=len(features.functions),
                analysis_s=round(analysed - began, 3),
                match_s=round(time.perf_counter() - analysed, 3),
                rss_mb=_rss_mb(),
                peak_mb=_peak_mb(),
            ))
    return QueryMemory(
        setting=setting,
        started_rss_mb=started,
        imported_rss_mb=imported,
        kb_loaded_rss_mb=loaded,
        queries=steps,
        query_cpu_s=round(time.process_time() - cpu_started, 2),
        peak_mb=_peak_mb(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db", type=Path, default=Path("/tmp/earmark-query-memory.db"))
    parser.add_argument("--setting", choices=["a", "c"], default="a")
    parser.add_argument("--max-file-mb", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--keep-lief-assembly",
        action="store_true",
        help="do not release LIEF's disassembler enums (earmark.extract.lief_assembly)",
    )
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.build_only:
        _build(args.db, args.max_file_mb)
        return 0
    if not args.db.exists():
        args.db.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "bench.query_memory", "--build-only", "--db",
                   str(args.db), "--max-file-mb", str(args.max_file_mb)]
        subprocess.run(command, check=True)
    result = _measure(args.db, args.setting, args.max_file_mb, args.keep_lief_assembly)
    print(f"after imports  rss {result.imported_rss_mb:6.1f} MB "
          f"(before earmark: {result.started_rss_mb:.1f})")
    print(f"KB loaded      rss {result.kb_loaded_rss_mb:6.1f} MB")
    for step in result.queries:
        print(f"{step.query[:46]:46} fn {step.functions:5} an {step.analysis_s:.3f} s "
              f"match {step.match_s:.3f} s  rss {step.rss_mb:6.1f}  peak {step.peak_mb:6.1f}")
    rss = [step.rss_mb for step in result.queries]
    print(f"after the last query rss {rss[-1]:.1f} MB, mean after a query "
          f"{sum(rss) / len(rss):.1f} MB, process peak {result.peak_mb:.1f} MB, "
          f"query CPU {result.query_cpu_s} s")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
