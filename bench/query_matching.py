"""Cost of attributing a query once its features exist (``attribute_sample``), on the PE (a) KB.

One process attributes the (a) queries (the newest release of each project) and the (c)
queries (whole third-party DLLs) against the KB of setting (a), files of at most 1 MB
(``bench.index_build --build-pe-a``: 101 samples, 38.9k functions). The first pass analyses
each query and then attributes it, as ``bench.attribution_pe`` and a process serving one
query after another do, so first-use costs and the collector's work after an analysis are
in it; the later passes attribute the same features again (decoded from their frozen bytes
outside the timing) and give the steady cost. Analysis time is not counted.

Per setting it prints mean / p50 / p95 of the CPU and wall seconds of the first pass and of
each query's best pass. ``--documents DIR`` writes every first-pass case as JSON
(``render_case_json``), so two trees can be checked with ``diff -r`` for identical results.

    python -m bench.query_matching --db /tmp/pe-a.db --build-pe-a --passes 3
    python -m bench.query_matching --db /tmp/pe-a.db --documents /tmp/cases --json /tmp/q.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.common import (
    Stopwatch,
    lifetime_peak_rss_bytes,
    load_release_corpus,
    split_all_but_newest,
    split_third_party_queries,
)
from bench.index_build import build_pe_a


def _quantile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "p50": round(statistics.median(values), 4),
        "p95": round(_quantile(values, 0.95), 4),
    }


def measure(db: Path, passes: int, documents: Path | None) -> dict[str, object]:
    from earmark.attribution import attribute_sample, open_knowledge_base
    from earmark.extract import analyze_file
    from earmark.freeze import features_from_bytes, features_to_bytes
    from earmark.report.json_report import render_case_json

    files = [f for f in load_release_corpus("pe") if f.size <= 1_000_000]
    settings = {
        "a": split_all_but_newest(files).queries,
        "c": split_third_party_queries(files).queries,
    }
    result: dict[str, object] = {}
    with open_knowledge_base(str(db)) as kb:
        # Index, feature stage and artefact statistics loaded before any timing.
        kb.index()
        kb.feature_candidates()
        kb.artefact_stats()
        for setting, queries in settings.items():
            frozen: list[bytes] = []
            cpu: list[list[float]] = []
            wall: list[list[float]] = []
            for position, query in enumerate(queries):
                features = analyze_file(query.path)
                with Stopwatch() as watch:
                    case = attribute_sample(kb, features, top=100)
                cpu.append([watch.cpu])
                wall.append([watch.wall])
                frozen.append(features_to_bytes(features))
                if documents is not None:
                    documents.mkdir(parents=True, exist_ok=True)
                    (documents / f"{setting}_{position:02d}.json").write_text(
                        render_case_json(case)
                    )
                del features, case
            for _ in range(passes - 1):
                for position, blob in enumerate(frozen):
                    features = features_from_bytes(blob)
                    with Stopwatch() as watch:
                        attribute_sample(kb, features, top=100)
                    cpu[position].append(watch.cpu)
                    wall[position].append(watch.wall)
            result[setting] = {
                "queries": len(queries),
                "first_pass_cpu": _summary([times[0] for times in cpu]),
                "first_pass_wall": _summary([times[0] for times in wall]),
                "best_pass_cpu": _summary([min(times) for times in cpu]),
                "best_pass_wall": _summary([min(times) for times in wall]),
            }
    result["process_peak_rss_mb"] = round(lifetime_peak_rss_bytes() / 1e6)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True, help="SQLite KB of PE setting (a)")
    parser.add_argument("--build-pe-a", action="store_true", help="ingest the PE (a) KB first")
    parser.add_argument("--passes", type=int, default=3, help="attributions of each query")
    parser.add_argument("--documents", type=Path, help="write each first-pass case as JSON here")
    parser.add_argument("--json", type=Path, help="write the summary as JSON here")
    arguments = parser.parse_args()
    if arguments.build_pe_a and not arguments.db.exists():
        build_pe_a(arguments.db)
    result = measure(arguments.db, max(arguments.passes, 1), arguments.documents)
    for setting in ("a", "c"):
        summary = result[setting]
        assert isinstance(summary, dict)
        print(f"setting {setting}: {summary['queries']} queries")
        for name in ("first_pass_cpu", "first_pass_wall", "best_pass_cpu", "best_pass_wall"):
            values = summary[name]
            print(f"  {name:16} mean {values['mean']:.4f}  p50 {values['p50']:.4f}  "
                  f"p95 {values['p95']:.4f} s")  # fmt: skip
    print(f"process peak RSS {result['process_peak_rss_mb']} MB")
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
