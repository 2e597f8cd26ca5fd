"""Attribution on the PE release corpus: earmark vs MCRIT on the same splits, in the same run.

Settings (splits from bench/common.py, sha256-deduplicated before splitting):
  (a) KB = every release but the newest of each project, queries = the newest release;
  (b) KB = the oldest release only, queries = the newest release (years of compiler/code drift);
  (c) KB = all project code, queries = whole third-party files (MSVC runtime DLLs, vendored
      libraries): nobody wrote them, so no project may get a high score.
Whole third-party files are never labelled as the project that shipped them (they are not its
code). ``--goodware-third-party`` is a documented earmark-only variant that ingests the
third-party files of the KB releases as goodware in (a)/(b); the default run does not.

Each engine runs in its own child process per group of settings ((a) then (c) share one growing
KB: (c)'s KB is (a)'s plus the newest releases), so the child's getrusage peak RSS belongs to one
engine. The parent computes every metric with the same code for both engines.

Usage:
  python -m bench.attribution_pe [--settings a,b,c] [--projects lz4 regex ...]
      [--limit-files N] [--max-file-mb MB] [--skip-mcrit] [--json OUT]
      [--update-doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bench.common import (
    AttributionSplit,
    CorpusFile,
    Stopwatch,
    lifetime_peak_rss_bytes,
    load_release_corpus,
    margin_true_vs_runner_up,
    rank_outcome_from_ranking,
    render_table,
    split_all_but_newest,
    split_oldest_only,
    split_third_party_queries,
    unwatched_memory,
    watch_peak_memory,
)

SECTION_TITLE = "## Attribution on the PE corpus"
ENGINES = ("earmark", "mcrit")
# Score from which an attribution of a third-party file counts as "high": 0.7 lies inside
# ICD-203's "likely" band (55-80 %); earmark's own verdict threshold (0.5) is reported as well.
HIGH_SCORE = 0.7
VERDICT_SCORE = 0.5
# Worker processes for earmark's ingest (the machine has 2 cores).
EARMARK_INGEST_JOBS = 2
# Hypotheses asked from earmark per query: more than the projects, so the ranking is complete.
EARMARK_TOP_HYPOTHESES = 100
UNKNOWN = "unknown"

# The protocol, written into docs/benchmarks.md with every run's tables.
PROTOCOL = f"""\
`bench/attribution_pe.py` on the development PE corpus (`pe/<project>/<version>/<file>`,
`labels_full.csv`). Files are deduplicated by sha256 before splitting (oldest copy kept).
- (a) KB = every release but the newest of each project, queries = the newest release;
- (b) KB = the oldest release only, queries = the newest (years of compiler and code drift);
- (c) KB = all project code, queries = the whole third-party files (MSVC runtime DLLs): the
  right answer is nobody; "high" = a project scoring ≥ {HIGH_SCORE} (inside ICD-203's "likely",
  55-80 %); files reaching earmark's verdict threshold ({VERDICT_SCORE}) are counted too.
Whole third-party files are never labelled as the project that shipped them (default run).
KB files are labelled family = actor = project (earmark: `ingest_groups`, one group per
project, through one pool of {EARMARK_INGEST_JOBS} worker processes (`--earmark-jobs`) into a
temporary SQLite KB; MCRIT: in-process, `MemoryStorage`, fake queue, MinHash pools off, see
bench/README.md).
Predicted project = top family hypothesis (earmark) / top family of
`getBestSampleMatchesPerFamily` (MCRIT); projects an engine does not list score 0; MRR and
top-1 count ties as a random order (bench/common.py). Margin = score(true project) −
score(best other project), negative when wrong. Top-1/MRR/margin means weight every project
equally (mean of per-project means).
Each engine runs in its own child process per group of settings ((a) then (c) grow one KB),
so "process peak RSS" is that engine's getrusage peak; "phase peak RSS" is sampled every 20 ms
during that setting (ingest, index build and queries); "PSS with workers" sums the
proportional set size of the engine's process and its worker processes (earmark's
{EARMARK_INGEST_JOBS} ingest workers; MCRIT has none) at each sample: pages the processes share
are split among them, so the sum is what the engine holds at once.
Indexing: earmark = the whole ingest
(analysis + store) plus the index build ("index build s" alone: function index + feature
candidate stage + artefact statistics, which `earmark ingest` builds too); MCRIT = SMDA
disassembly + storage + MinHash ("index build s" = storage + MinHash alone). Functions: each
engine's own count (earmark: stored functions; MCRIT: SMDA functions). Query latency:
earmark = `analyze_file` + `attribute_sample`, MCRIT = SMDA + `getMatchesForSmdaReport`;
"w/o analysis" leaves out the query's own analysis. CPU seconds include earmark's ingest
workers and stay comparable when other jobs load the machine. Times and memory come from
different runs of each engine's child: the timed runs sample no memory, and one more run with
the memory sampler gives every memory figure (its index walls are listed below the table; the
sampler's reads of /proc cost CPU that earmark's two busy workers share, single-process
MCRIT's idle second core absorbs; `--one-run` measures both in one run). With
`--earmark-repeats N`, earmark's child is timed N times per group of settings and the run with
the median index wall of the group's first setting is the one reported, every run's index walls
listed below the table (earmark's (a) index lasts seconds, MCRIT's minutes: one short run
measures the machine's moment as much as the engine).
"""


# --------------------------------------------------------------------------- plans


def _file_entry(corpus_file: CorpusFile, expected: str | None = None) -> dict[str, Any]:
    return {
        "path": str(corpus_file.path),
        "project": corpus_file.project,
        "version": corpus_file.version,
        "size": corpus_file.size,
        "expected": expected,
    }


def _limit(
    files: Sequence[CorpusFile], per_release: int | None, max_bytes: int | None
) -> list[CorpusFile]:
    """At most ``per_release`` files per (project, release), smallest first; none > max_bytes."""
    kept = [f for f in files if max_bytes is None or f.size <= max_bytes]
    if per_release is None:
        return kept
    groups: dict[tuple[str, str], list[CorpusFile]] = {}
    for corpus_file in sorted(kept, key=lambda f: (f.size, str(f.path))):
        groups.setdefault((corpus_file.project, corpus_file.version), []).append(corpus_file)
    return [f for group in groups.values() for f in group[:per_release]]


def _restrict(split: AttributionSplit, args: argparse.Namespace) -> AttributionSplit:
    max_bytes = int(args.max_file_mb * 1e6) if args.max_file_mb else None
    kb = _limit(split.knowledge_base, args.limit_files, max_bytes)
    queries = _limit(split.queries, args.limit_files, max_bytes)
    return AttributionSplit(split.name, tuple(kb), tuple(queries))


def build_groups(files: Sequence[CorpusFile], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Child-process plans: a list of phases, each adding KB files and then asking queries.

    (a) and (c) share a group because (c)'s KB is (a)'s plus the newest releases.
    """
    settings = set(args.settings)
    splits = {
        "a": split_all_but_newest(files),
        "b": split_oldest_only(files),
        "c": split_third_party_queries(files),
    }
    splits = {key: _restrict(split, args) for key, split in splits.items()}
    groups: list[dict[str, Any]] = []
    for group in (("a", "c"), ("b",)):
        phases, known = [], set[str]()
        for key in group:
            if key not in settings:
                continue
            split = splits[key]
            added = [f for f in split.knowledge_base if f.sha256 not in known]
            known.update(f.sha256 for f in added)
            goodware = []
            if args.goodware_third_party and key in ("a", "b"):
                releases = {(f.project, f.version) for f in split.knowledge_base}
                goodware = [
                    _file_entry(f)
                    for f in files
                    if f.is_third_party and (f.project, f.version) in releases
                ]
            phases.append(
                {
                    "setting": key,
                    "name": split.name,
                    "kb_total": len(split.knowledge_base),
                    "kb_projects": sorted({f.project for f in split.knowledge_base}),
                    "add": [_file_entry(f) for f in added],
                    "goodware": goodware,
                    "queries": [_file_entry(q, split.expected(q)) for q in split.queries],
                }
            )
        if phases:
            groups.append({"name": "+".join(str(p["setting"]) for p in phases), "phases": phases})
    return groups


# --------------------------------------------------------------------------- child: engines


def _children_cpu_seconds() -> float:
    """CPU seconds of finished child processes (earmark's ingest workers); the machine may be
    shared, and CPU seconds stay comparable when wall time is inflated by other load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _progress(engine: str, entry: dict[str, Any], seconds: float) -> None:
    print(
        f"  [{engine}] {entry['project']}/{entry['version']}/{Path(entry['path']).name}"
        f" {seconds:.1f}s",
        file=sys.stderr,
        flush=True,
    )


def earmark_ingest_groups(phase: dict[str, Any]) -> list[Any]:
    """The ``IngestGroup``s of a phase's KB part: one per project, one for goodware."""
    from earmark.ingest import IngestGroup, LabelTemplate

    by_project: dict[str, list[str]] = {}
    for entry in phase["add"]:
        by_project.setdefault(entry["project"], []).append(entry["path"])
    # One group per project and one for goodware, all through one pool (as one labelled
    # collection is imported): one pool start and one idle tail instead of one per group.
    groups = [
        IngestGroup(
            tuple(paths), LabelTemplate(actor=project, family=project, source="bench-pe")
        )
        for project, paths in sorted(by_project.items())
    ]
    if phase["goodware"]:
        goodware = tuple(e["path"] for e in phase["goodware"])
        groups.append(IngestGroup(goodware, LabelTemplate(goodware=True)))
    return groups


def _memory_watch(phase: dict[str, Any]) -> Any:
    """The memory sampler, or in a timing run (``sample_memory`` false) its null stand-in."""
    return watch_peak_memory if phase.get("sample_memory", True) else unwatched_memory


def _earmark_phase(kb: Any, phase: dict[str, Any]) -> dict[str, Any]:
    from earmark.attribution import attribute_sample
    from earmark.extract import analyze_file
    from earmark.ingest import ingest_groups

    groups = earmark_ingest_groups(phase)
    watch_memory = _memory_watch(phase)
    functions_before = kb.store.stats().functions
    workers_cpu_before = _children_cpu_seconds()
    with Stopwatch() as ingest_watch, watch_memory() as ingest_memory:
        summary = ingest_groups(kb.store, groups, jobs=phase["jobs"], rows=kb.row_spool())
    failures = [f"{o.name}: {o.error_type}" for o in summary.failures]
    ingest_workers_cpu = _children_cpu_seconds() - workers_cpu_before
    with Stopwatch() as build_watch, watch_memory() as build_memory:
        # Everything a query reads (function index and feature candidate stage), as
        # ``earmark ingest --jobs 2`` builds it: no query pays for index building.
        kb.prepare(jobs=phase["jobs"])
        index = kb.index()
    workers_cpu = _children_cpu_seconds() - workers_cpu_before
    stats = kb.store.stats()
    queries = []
    with watch_memory() as query_memory:
        for entry in phase["queries"]:
            with Stopwatch() as analysis_watch:
                features = analyze_file(Path(entry["path"]))
            with Stopwatch() as match_watch:
                case = attribute_sample(
                    kb, features, top=EARMARK_TOP_HYPOTHESES, artefacts=phase["artefacts"]
                )
            _progress("earmark", entry, analysis_watch.wall + match_watch.wall)
            families = [h for h in case.hypotheses if h.family is not None]
            queries.append(
                {
                    **entry,
                    "status": "ok",
                    "scores": {h.family: h.score for h in families},
                    "function_count": len(features.functions),
                    "analysis_seconds": analysis_watch.wall,
                    "match_seconds": match_watch.wall,
                    "cpu_seconds": analysis_watch.cpu + match_watch.cpu,
                    "detail": {
                        "verdict": case.verdict.summary,
                        "verdict_actor": case.verdict.actor,
                        "shared_library": any(
                            e.pivot == "shared-library" for e in case.evidence
                        ),
                        "looked_up": case.query.looked_up_functions,
                        "library": case.query.library_functions,
                        "distinctive": case.query.distinctive_functions,
                        "top": [
                            {
                                "family": h.family,
                                "score": round(h.score, 4),
                                "relation": h.relation,
                                "coverage": h.coverage,
                                "rare": h.rare_function_count,
                                "evidence": h.evidence_count,
                                "artefacts": h.artefact_count,
                            }
                            for h in families[:3]
                        ],
                    },
                }
            )
    return {
        "index": {
            "files": len(phase["add"]) + len(phase["goodware"]),
            "functions_added": stats.functions - functions_before,
            "functions_total": stats.functions,
            "indexed_functions": len(index),
            "wall_seconds": ingest_watch.wall + build_watch.wall,
            "ingest_seconds": ingest_watch.wall,
            "build_seconds": build_watch.wall,
            "cpu_seconds": ingest_watch.cpu + build_watch.cpu + workers_cpu,
            # this process and its ingest workers during the ingest alone
            "ingest_cpu_seconds": ingest_watch.cpu + ingest_workers_cpu,
            # ingest and index build alike (the stage build is the build's peak)
            "peak_rss_bytes": max(ingest_memory.peak_bytes, build_memory.peak_bytes),
            # with the ingest worker processes, which run beside this one
            "tree_peak_rss_bytes": max(ingest_memory.tree_peak_bytes, build_memory.tree_peak_bytes),
            "failures": failures,
        },
        "query_peak_rss_bytes": query_memory.peak_bytes,
        "query_tree_peak_rss_bytes": query_memory.tree_peak_bytes,
        "queries": queries,
    }


def _mcrit_phase(mcrit: Any, phase: dict[str, Any]) -> dict[str, Any]:
    start = len(mcrit.indexed)
    watch_memory = _memory_watch(phase)
    with Stopwatch() as watch, watch_memory() as memory:
        for entry in phase["add"]:
            mcrit.add_file(Path(entry["path"]), family=entry["project"], version=entry["version"])
    added = mcrit.indexed[start:]
    queries = []
    with watch_memory() as query_memory:
        for entry in phase["queries"]:
            with Stopwatch() as query_watch:
                result = mcrit.query_file(Path(entry["path"]))
            _progress("mcrit", entry, query_watch.wall)
            queries.append(
                {
                    **entry,
                    "status": result.status,
                    "scores": result.scores(),
                    "function_count": result.function_count,
                    "analysis_seconds": result.disassembly_seconds,
                    "match_seconds": result.matching_seconds,
                    "cpu_seconds": query_watch.cpu,
                    "detail": {},
                }
            )
    return {
        "index": {
            "files": len(added),
            "functions_added": sum(i.function_count for i in added),
            "functions_total": sum(i.function_count for i in mcrit.indexed),
            "indexed_functions": sum(i.minhashed_count for i in mcrit.indexed),
            "wall_seconds": watch.wall,
            "ingest_seconds": watch.wall,
            "build_seconds": sum(i.indexing_seconds for i in added),
            "cpu_seconds": watch.cpu,
            "peak_rss_bytes": memory.peak_bytes,
            "tree_peak_rss_bytes": memory.tree_peak_bytes,
            "failures": [str(i.path) for i in added if i.status == "error"],
        },
        "query_peak_rss_bytes": query_memory.peak_bytes,
        "query_tree_peak_rss_bytes": query_memory.tree_peak_bytes,
        "queries": queries,
    }


def run_child(engine: str, plan_path: Path, out_path: Path) -> None:
    """Run one engine over one group of phases; write its raw results as JSON."""
    group = json.loads(plan_path.read_text(encoding="utf-8"))
    phases_out = []
    with tempfile.TemporaryDirectory(prefix="earmark-bench-pe-") as temporary:
        if engine == "earmark":
            from earmark.attribution import open_knowledge_base
            from earmark.extract.lief_assembly import release_lief_assembly

            release_lief_assembly()  # as the ``earmark`` command does in its process

            with open_knowledge_base(str(Path(temporary) / "kb.db")) as kb:
                for phase in group["phases"]:
                    # Code-only runs (--code-only) leave the artefact pillar out.
                    phase = {
                        **phase,
                        "artefacts": group.get("artefacts", True),
                        "jobs": group.get("jobs", EARMARK_INGEST_JOBS),
                        "sample_memory": group.get("sample_memory", True),
                    }
                    phases_out.append({"setting": phase["setting"], **_earmark_phase(kb, phase)})
        else:
            from bench.peers.mcrit_peer import McritInProcess

            # SMDA logs every AVX-512 mnemonic it cannot escape at ERROR level, thousands per file.
            logging.getLogger("smda").setLevel(logging.CRITICAL)
            mcrit = McritInProcess()
            for phase in group["phases"]:
                phase = {**phase, "sample_memory": group.get("sample_memory", True)}
                phases_out.append({"setting": phase["setting"], **_mcrit_phase(mcrit, phase)})
    result = {
        "engine": engine,
        "phases": phases_out,
        "peak_rss_bytes": lifetime_peak_rss_bytes(),
        # ingest workers of earmark (largest one); getrusage gives the max over waited children
        "peak_child_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }
    out_path.write_text(json.dumps(result), encoding="utf-8")


# --------------------------------------------------------------------------- parent: metrics


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _query_metrics(query: dict[str, Any], universe: Sequence[str]) -> dict[str, Any]:
    scores: dict[str, float] = query["scores"]
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    predicted = ranked[0][0] if ranked and ranked[0][1] > 0 else UNKNOWN
    top_score = ranked[0][1] if ranked else 0.0
    truth = query["expected"]
    metrics: dict[str, Any] = {
        "file": f"{query['project']}/{query['version']}/{Path(query['path']).name}",
        "project": query["project"],
        "predicted": predicted,
        "top_score": top_score,
    }
    if truth is not None:
        outcome = rank_outcome_from_ranking(scores, truth, universe)
        metrics.update(
            hit=outcome.expected_hit_at(1),
            reciprocal_rank=outcome.expected_reciprocal_rank(),
            true_score=scores.get(truth, 0.0),
            margin=margin_true_vs_runner_up(scores, truth),
        )
    return metrics


def _per_project_mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    by_project: dict[str, list[float]] = {}
    for row in rows:
        by_project.setdefault(row["project"], []).append(row[key])
    return (
        float(np.mean([np.mean(values) for values in by_project.values()]))
        if by_project
        else float("nan")
    )


def summarise(
    engine_result: dict[str, Any], phase_plan: dict[str, Any], setting_phase: dict[str, Any]
) -> dict[str, Any]:
    """Metrics of one engine in one setting (project-weighted means and per-file rows)."""
    universe = phase_plan["kb_projects"]
    rows = [_query_metrics(q, universe) | {"query": q} for q in setting_phase["queries"]]
    total = [q["analysis_seconds"] + q["match_seconds"] for q in setting_phase["queries"]]
    match = [q["match_seconds"] for q in setting_phase["queries"]]
    index = setting_phase["index"]
    summary: dict[str, Any] = {
        "engine": engine_result["engine"],
        "setting": setting_phase["setting"],
        "queries": len(rows),
        "index": index,
        "functions_per_second": index["functions_added"] / index["wall_seconds"]
        if index["wall_seconds"]
        else float("nan"),
        "latency_total": {
            "mean": float(np.mean(total)) if total else float("nan"),
            "p50": _percentile(total, 50),
            "p95": _percentile(total, 95),
        },
        "latency_match": {
            "mean": float(np.mean(match)) if match else float("nan"),
            "p50": _percentile(match, 50),
            "p95": _percentile(match, 95),
        },
        "peak_rss_bytes": engine_result["peak_rss_bytes"],
        "index_cpu_seconds": index.get("cpu_seconds", float("nan")),
        "query_cpu_mean": float(
            np.mean([q.get("cpu_seconds", float("nan")) for q in setting_phase["queries"]])
        )
        if setting_phase["queries"]
        else float("nan"),
        "phase_peak_rss_bytes": max(index["peak_rss_bytes"], setting_phase["query_peak_rss_bytes"]),
        # Sum over this engine's processes (earmark's ingest workers included): older result
        # files without the figure give nan.
        "phase_tree_peak_rss_bytes": max(
            index.get("tree_peak_rss_bytes", float("nan")),
            setting_phase.get("query_tree_peak_rss_bytes", float("nan")),
        ),
        "rows": rows,
    }
    labelled = [r for r in rows if "hit" in r]
    # earmark also states a verdict (an authored actor, or "no known actor"); MCRIT has none.
    verdicts = [r["query"]["detail"].get("verdict_actor") for r in rows]
    has_verdict = bool(rows) and "verdict_actor" in rows[0]["query"]["detail"]
    if labelled:
        summary.update(
            top1=_per_project_mean(labelled, "hit"),
            top1_files=float(np.mean([r["hit"] for r in labelled])),
            mrr=_per_project_mean(labelled, "reciprocal_rank"),
            margin_mean=_per_project_mean(labelled, "margin"),
            margin_median=float(np.median([r["margin"] for r in labelled])),
            margin_min=float(min(r["margin"] for r in labelled)),
            verdict_right=sum(1 for r, v in zip(rows, verdicts, strict=True) if v == r["project"])
            if has_verdict
            else None,
            verdict_wrong=sum(
                1 for r, v in zip(rows, verdicts, strict=True) if v not in (None, r["project"])
            )
            if has_verdict
            else None,
        )
    else:
        summary.update(
            max_score=max((r["top_score"] for r in rows), default=0.0),
            high=sum(1 for r in rows if r["top_score"] >= HIGH_SCORE),
            verdict_level=sum(1 for r in rows if r["top_score"] >= VERDICT_SCORE),
            verdict_wrong=sum(1 for v in verdicts if v is not None) if has_verdict else None,
        )
    return summary


# --------------------------------------------------------------------------- parent: run, print


def run_engine(
    engine: str, group: dict[str, Any], work: Path, *, sample_memory: bool = True
) -> dict[str, Any]:
    """One child run of ``engine`` over ``group``'s settings; without ``sample_memory`` the
    child runs no memory sampler and its memory figures are zeros (a timing run)."""
    plan = work / f"plan-{group['name']}.json"
    out = work / f"{engine}-{group['name']}.json"
    plan.write_text(json.dumps(group | {"sample_memory": sample_memory}), encoding="utf-8")
    command = [sys.executable, "-m", "bench.attribution_pe", "--child", engine, str(plan), str(out)]
    with Stopwatch() as watch:
        subprocess.run(command, check=True)
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    result["child_wall_seconds"] = watch.wall
    return result


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Of several runs of one engine's child, the one whose first setting's index wall is the
    median (the lower middle one of an even count), with every run's index walls attached
    (``repeats``). earmark's index phase of (a) lasts ~4 s, so one run is at the mercy of a
    short slowdown of the machine, which MCRIT's minutes average out (docs/benchmarks.md)."""
    ordered = sorted(runs, key=lambda run: run["phases"][0]["index"]["wall_seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats"] = [
        {
            phase["setting"]: {
                "wall_seconds": phase["index"]["wall_seconds"],
                "functions_added": phase["index"]["functions_added"],
            }
            for phase in run["phases"]
        }
        for run in runs
    ]
    return chosen


# What a timing run leaves at zero: taken from the memory run (``with_memory_of``).
_PHASE_MEMORY_KEYS = ("query_peak_rss_bytes", "query_tree_peak_rss_bytes")
_INDEX_MEMORY_KEYS = ("peak_rss_bytes", "tree_peak_rss_bytes")
_RUN_MEMORY_KEYS = ("peak_rss_bytes", "peak_child_rss_bytes")


def with_memory_of(timed: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """``timed`` (a run without the memory sampler) with the memory figures of ``sampled`` (a
    run of the same engine and settings with it), the sampled run's index walls kept under
    ``memory_run``, and whether both runs gave every query the same scores
    (``memory_run_same_scores``: the engines are deterministic, so False means the two runs
    did not measure the same work).

    Why two runs: the sampler reads every process's proportional set size from /proc (~6 ms
    of CPU with two ingest workers) in a thread of the engine's process. On this 2-core
    machine that CPU and that thread's turns at the interpreter lock are taken from earmark's
    busy workers and writing process, while single-process MCRIT leaves the second core idle
    for it: PE (a) ingest, this process's CPU 0.58-0.72 s without the sampler against
    0.81-0.95 s with it (docs/benchmarks.md, "Timing runs without the memory sampler")."""
    merged = dict(timed)
    merged.update({key: sampled[key] for key in _RUN_MEMORY_KEYS if key in sampled})
    by_setting = {phase["setting"]: phase for phase in sampled["phases"]}
    phases, same = [], True
    for phase in timed["phases"]:
        other = by_setting[phase["setting"]]
        phase = dict(phase) | {key: other[key] for key in _PHASE_MEMORY_KEYS}
        phase["index"] = dict(phase["index"]) | {
            key: other["index"][key] for key in _INDEX_MEMORY_KEYS
        }
        same = same and [q["scores"] for q in phase["queries"]] == [
            q["scores"] for q in other["queries"]
        ]
        phases.append(phase)
    merged["phases"] = phases
    merged["memory_run"] = {
        phase["setting"]: {"wall_seconds": phase["index"]["wall_seconds"]}
        for phase in sampled["phases"]
    }
    merged["memory_run_same_scores"] = same
    return merged


def render_repeats(raw: Sequence[dict[str, Any]]) -> str:
    """Each setting's index wall over an engine's repeated runs (min / median / max), the
    index wall of its memory run, and a warning where the memory run's scores differed."""
    lines = []
    for result in raw:
        repeats = result.get("repeats", [])
        for setting in repeats[0] if len(repeats) >= 2 else ():
            walls = sorted(run[setting]["wall_seconds"] for run in repeats)
            added = repeats[0][setting]["functions_added"]
            median = walls[(len(walls) - 1) // 2]
            lines.append(
                f"{result['engine']} ({setting}) index wall over {len(walls)} runs: "
                f"{walls[0]:.3f} / {median:.3f} / {walls[-1]:.3f} s (min / median / max), "
                f"{added / walls[-1]:,.0f} / {added / median:,.0f} / {added / walls[0]:,.0f} "
                "functions/s"
            )
        for setting, memory_run in result.get("memory_run", {}).items():
            timed = next(p for p in result["phases"] if p["setting"] == setting)["index"]
            lines.append(
                f"{result['engine']} ({setting}) index wall {timed['wall_seconds']:.3f} s "
                f"without the memory sampler, {memory_run['wall_seconds']:.3f} s in the memory run"
            )
        if result.get("memory_run_same_scores") is False:
            lines.append(
                f"WARNING: {result['engine']}'s memory run gave other scores than its timed run"
            )
    return "\n".join(lines)


def _mb(value: float) -> str:
    return f"{value / 1e6:.0f}"


def summarise_run(
    groups: Sequence[dict[str, Any]], raw: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every engine x setting summary of a run (raw child results matched to their plan)."""
    summaries = []
    for result in raw:
        group = next(
            g
            for g in groups
            if g["name"] == result.get("group", g["name"])
            and [p["setting"] for p in g["phases"]] == [p["setting"] for p in result["phases"]]
        )
        for phase_plan, phase in zip(group["phases"], result["phases"], strict=True):
            summaries.append(summarise(result, phase_plan, phase))
    summaries.sort(key=lambda s: (s["setting"], ENGINES.index(s["engine"])))
    return summaries


def render_results(summaries: Sequence[dict[str, Any]], markdown: bool) -> str:
    blocks = []
    attributed = [s for s in summaries if "top1" in s]
    if attributed:
        rows = [
            [
                s["setting"],
                s["engine"],
                s["queries"],
                s["top1"],
                s["top1_files"],
                s["mrr"],
                s["margin_mean"],
                s["margin_median"],
                s["margin_min"],
                "-"
                if s["verdict_right"] is None
                else f"{s['verdict_right']} / {s['verdict_wrong']}",
            ]
            for s in attributed
        ]
        blocks.append(
            render_table(
                [
                    "setting",
                    "engine",
                    "queries",
                    "top-1 (per project)",
                    "top-1 (per file)",
                    "MRR",
                    "margin mean",
                    "margin median",
                    "margin min",
                    "verdict right / wrong",
                ],
                rows,
                markdown,
            )
        )
    third_party = [s for s in summaries if "max_score" in s]
    if third_party:
        rows = [
            [
                s["setting"],
                s["engine"],
                s["queries"],
                s["max_score"],
                s["high"],
                s["verdict_level"],
                "-" if s["verdict_wrong"] is None else s["verdict_wrong"],
            ]
            for s in third_party
        ]
        blocks.append(
            render_table(
                [
                    "setting",
                    "engine",
                    "third-party queries",
                    "max score any project",
                    f"files ≥ {HIGH_SCORE} (high)",
                    f"files ≥ {VERDICT_SCORE}",
                    "verdict names a project",
                ],
                rows,
                markdown,
            )
        )
    rows = [
        [
            s["setting"],
            s["engine"],
            s["index"]["files"],
            s["index"]["functions_added"],
            s["index"]["wall_seconds"],
            s["functions_per_second"],
            s["index_cpu_seconds"],
            s["index"]["build_seconds"],
            s["latency_total"]["mean"],
            s["latency_total"]["p50"],
            s["latency_total"]["p95"],
            s["latency_match"]["mean"],
            s["latency_match"]["p95"],
            s["query_cpu_mean"],
            _mb(s["phase_peak_rss_bytes"]),
            _mb(s["peak_rss_bytes"]),
            _mb(s["phase_tree_peak_rss_bytes"]),
        ]
        for s in summaries
    ]
    blocks.append(
        render_table(
            [
                "setting",
                "engine",
                "KB files added",
                "functions added",
                "index wall s",
                "functions/s",
                "index CPU s",
                "index build s",
                "query s mean",
                "p50",
                "p95",
                "query s w/o analysis mean",
                "p95",
                "query CPU s mean",
                "phase peak RSS MB",
                "process peak RSS MB",
                "phase peak PSS with workers MB",
            ],
            rows,
            markdown,
        )
    )
    return "\n\n".join(blocks)


def render_per_file(summaries: Sequence[dict[str, Any]], markdown: bool) -> str:
    """One row per (setting, query file): both engines side by side."""
    by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for summary in summaries:
        for row in summary["rows"]:
            by_key.setdefault((summary["setting"], row["file"]), {})[summary["engine"]] = row
    rows = []
    for (setting, file), engines in sorted(by_key.items()):
        cells: list[object] = [setting, file]
        for engine in ENGINES:
            row = engines.get(engine)
            if row is None:
                cells += ["-", "-", "-"]
                continue
            margin = row.get("margin")
            cells += [
                row["predicted"],
                round(row["top_score"], 3),
                "-" if margin is None else round(margin, 3),
            ]
        cells.append(next(iter(engines.values()))["query"]["function_count"])
        rows.append(cells)
    return render_table(
        [
            "setting",
            "query file",
            "earmark top",
            "score",
            "margin",
            "MCRIT top",
            "score",
            "margin",
            "functions (first engine)",
        ],
        rows,
        markdown,
    )


def explain_failures(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """earmark's misses (wrong top-1, or a high score on third-party code) with the evidence."""
    lines = []
    for summary in summaries:
        if summary["engine"] != "earmark":
            continue
        for row in summary["rows"]:
            wrong = row.get("hit", 1.0) < 1.0 or (
                "hit" not in row and row["top_score"] >= HIGH_SCORE
            )
            if not wrong:
                continue
            detail = row["query"]["detail"]
            top = (
                ", ".join(
                    f"{h['family']} {h['score']:.2f} ({h['relation']}, coverage {h['coverage']}, "
                    f"{h['rare']} rare fn, {h.get('artefacts', 0)} artefacts)"
                    for h in detail.get("top", [])
                )
                or "no hypothesis"
            )
            lines.append(
                f"- ({summary['setting']}) {row['file']}: "
                f"{row['query']['function_count']} functions, "
                f"{detail.get('looked_up')} looked up, {detail.get('library')} library-like, "
                f"{detail.get('distinctive')} distinctive; hypotheses: {top}; "
                f"verdict: {detail.get('verdict')}"
            )
    return lines


def update_doc(doc: Path, body: str) -> None:
    """Replace (or append) only this benchmark's generated text in the shared benchmarks
    document: from its section title to the section's first subsection (the hand-written
    analyses of earlier runs, kept) or the next section."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    start = text.find(SECTION_TITLE + "\n")
    section = f"{SECTION_TITLE}\n\n{body.strip()}\n"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        ends = [text.find(mark, start + len(SECTION_TITLE)) for mark in ("\n## ", "\n### ")]
        following = min((end for end in ends if end >= 0), default=-1)
        text = text[:start] + section + ("" if following < 0 else text[following:])
    doc.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--child", nargs=3, metavar=("ENGINE", "PLAN", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--settings", default="a,b,c", type=lambda text: text.split(","))
    parser.add_argument("--projects", nargs="*", help="only these projects (default: all)")
    parser.add_argument(
        "--limit-files", type=int, help="at most N files per project release (smallest first)"
    )
    parser.add_argument("--max-file-mb", type=float, help="leave out files larger than this")
    parser.add_argument("--skip-mcrit", action="store_true")
    parser.add_argument(
        "--code-only", action="store_true", help="earmark without its artefact pillar"
    )
    parser.add_argument(
        "--earmark-jobs",
        type=int,
        default=EARMARK_INGEST_JOBS,
        help=f"earmark's ingest workers and build processes (default {EARMARK_INGEST_JOBS}; "
        "1 analyses in the engine's own process)",
    )
    parser.add_argument(
        "--earmark-repeats",
        type=int,
        default=1,
        help="run earmark's child this many times per group and report the run with the median "
        "index wall of the group's first setting (every run's index walls are listed)",
    )
    parser.add_argument(
        "--one-run",
        action="store_true",
        help="time and sample memory in the same run of each engine (quicker; the memory "
        "sampler's CPU then slows earmark's parallel ingest, not single-process MCRIT)",
    )
    parser.add_argument(
        "--goodware-third-party",
        action="store_true",
        help="earmark-only variant: ingest KB releases' third-party files as goodware",
    )
    parser.add_argument(
        "--render", type=Path, help="re-print (and --update-doc) a saved --json run; no engines run"
    )
    parser.add_argument("--json", type=Path, help="write every result (per file too) here")
    parser.add_argument(
        "--notes", type=Path, help="markdown appended to the doc section (analysis of the run)"
    )
    parser.add_argument("--update-doc", type=Path, help=f"rewrite '{SECTION_TITLE}' in this file")
    args = parser.parse_args(argv)
    if args.child:
        engine, plan, out = args.child
        run_child(engine, Path(plan), Path(out))
        return 0
    unknown = set(args.settings) - {"a", "b", "c"}
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; use a, b, c")
    files = [] if args.render else load_release_corpus("pe")
    if args.projects:
        files = [f for f in files if f.project in set(args.projects)]
    command = "python -m bench.attribution_pe " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.render:
        saved = json.loads(args.render.read_text(encoding="utf-8"))
        groups, raw, command = saved["groups"], saved["raw"], saved["command"]
    else:
        groups = build_groups(files, args)
        if args.earmark_jobs < 1 or args.earmark_repeats < 1:
            parser.error("--earmark-jobs and --earmark-repeats must be at least 1")
        for group in groups:
            group["artefacts"] = not args.code_only
            group["jobs"] = args.earmark_jobs
        engines = ["earmark"] if args.skip_mcrit else list(ENGINES)
        raw = []
        with tempfile.TemporaryDirectory(prefix="bench-attribution-pe-") as temporary:
            for group in groups:
                for engine in engines:
                    repeats = args.earmark_repeats if engine == "earmark" else 1
                    print(f"[{engine}] settings {group['name']} ...", file=sys.stderr, flush=True)
                    work, sampled = Path(temporary), args.one_run
                    runs = [
                        run_engine(engine, group, work, sample_memory=sampled)
                        for _ in range(repeats)
                    ]
                    chosen = median_run(runs)
                    if not sampled:
                        print(f"[{engine}] memory run ...", file=sys.stderr, flush=True)
                        memory = run_engine(engine, group, work, sample_memory=True)
                        chosen = with_memory_of(chosen, memory)
                    raw.append(chosen | {"group": group["name"]})
    summaries = summarise_run(groups, raw)
    print(render_results(summaries, markdown=False))
    print(render_repeats(raw))
    print()
    print(render_per_file(summaries, markdown=False))
    failures = explain_failures(summaries)
    if failures:
        print("\nearmark misses:\n" + "\n".join(failures))
    if args.json:
        args.json.write_text(
            json.dumps(
                {"command": command, "summaries": summaries, "groups": groups, "raw": raw}, indent=1
            ),
            encoding="utf-8",
        )
    if args.update_doc:
        body = "\n\n".join(
            [
                PROTOCOL.strip(),
                f"Command: `{command.strip()}`",
                render_results(summaries, markdown=True),
                render_repeats(raw),
                render_per_file(summaries, markdown=True),
                ("earmark misses:\n\n" + "\n".join(failures))
                if failures
                else "earmark misses: none",
                args.notes.read_text(encoding="utf-8") if args.notes else "",
            ]
        )
        update_doc(args.update_doc, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
