"""Function search across optimisation levels and compilers: earmark vs MCRIT, same run.

For each pair of builds (X, Y) of one library, every source function present in both is a
query: take its code in stripped X, rank the functions of stripped Y, and see where the same
source function lands. Ground truth comes from the unstripped builds' symbols (functions.tsv);
stripping keeps addresses, so a symbol's address in X/Y names the function in the stripped copy.

Settings (as in Marcelli et al., USENIX Security 2022):
- standard: the true function + 100 random wrong ones from Y (fixed seed, same draw for every
  engine); Recall@1 and MRR@10; AUC over (true, wrong) scores;
- full pool: every eligible function of Y as a candidate.

Fairness: queries and the pool are limited to functions whose start *every* engine recovered
(each engine runs its own function recovery on the stripped file), so all engines answer the
same questions; how many starts each engine recovered is reported separately.

Usage:  python -m bench.function_search [--projects zlib zstd brotli] [--quick] [--jobs 2]
                                         [--update-doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from bench.common import (
    RankOutcome,
    Stopwatch,
    XcompBuild,
    load_xcomp_build,
    mean_reciprocal_rank,
    rank_outcome,
    recall_at_k,
    render_table,
    roc_auc,
    xcomp_build_dir,
)
from bench.peers.mcrit_peer import FunctionSignatures, McritFunctionHasher

PROJECTS = ("zlib", "zstd", "brotli")
COMPILERS = ("gcc", "clang")
# Cross-optimisation pairs per compiler, and the cross-compiler pair, as the task defines them.
CROSS_OPTIMISATION = (("O0", "O3"), ("O1", "O3"), ("O2", "Os"))
CROSS_COMPILER = (("gcc-O2", "clang-O2"),)
QUICK_PAIRS = (("gcc-O0", "gcc-O3"), ("gcc-O2", "gcc-Os"), ("gcc-O2", "clang-O2"))

# Smallest function (symbol size in bytes, in both builds) used as a query or candidate.
# 40 bytes is about 10 x86-64 instructions: MCRIT computes no MinHash at or below 10
# instructions (MINHASH_FN_MIN_INS), and smaller functions (getters, thunks) are
# interchangeable across a library, so ranking them measures luck rather than similarity.
MIN_FUNCTION_BYTES = 40
# Standard setting of the literature: 1 true + 100 wrong candidates per query.
WRONG_CANDIDATES = 100
SEED = 20220810  # fixed so every run and every engine draws the same wrong candidates
QUICK_MAX_QUERIES = 60  # per pair under --quick
SECTION_TITLE = "## Function search"

Scores = Callable[[str, int, str, Sequence[int]], np.ndarray]


# --------------------------------------------------------------------------- earmark side


def earmark_available() -> bool:
    try:
        from earmark.extract import analyze_file  # noqa: F401
    except ImportError:
        return False
    return True


def load_similarity() -> Callable[[Any, Any], float] | None:
    """earmark's richer function scorer, when another part of earmark provides one."""
    try:
        module = importlib.import_module("earmark.index.similarity")
    except ImportError:
        return None
    similarity: Callable[[Any, Any], float] | None = getattr(module, "function_similarity", None)
    return similarity


def score_pairs_minhash(query_fn: Any, candidate_fns: Sequence[Any]) -> np.ndarray:
    """Estimated Jaccard of the normalised-instruction shingles: share of equal MinHash slots."""
    query = np.asarray(query_fn.minhash, dtype=np.uint32)
    if query.size == 0 or not candidate_fns:
        return np.zeros(len(candidate_fns))
    matrix = np.zeros((len(candidate_fns), query.size), dtype=np.uint32)
    present = np.zeros(len(candidate_fns), dtype=bool)
    for row, candidate in enumerate(candidate_fns):
        if len(candidate.minhash) == query.size:
            matrix[row] = candidate.minhash
            present[row] = True
    return np.where(present, (matrix == query).mean(axis=1), 0.0)


def make_score_pairs(
    similarity: Callable[[Any, Any], float],
) -> Callable[[Any, Sequence[Any]], np.ndarray]:
    def score_pairs(query_fn: Any, candidate_fns: Sequence[Any]) -> np.ndarray:
        return np.array(
            [similarity(query_fn, candidate) for candidate in candidate_fns], dtype=np.float64
        )

    return score_pairs


def extract_with_earmark(path: Path) -> tuple[dict[int, Any], float, str]:
    """earmark's functions of one file by address, wall seconds, and "ok" or the error text."""
    from earmark.errors import InputError
    from earmark.extract import analyze_file

    with Stopwatch() as watch:
        try:
            features = analyze_file(path)
        except InputError as error:
            return {}, watch.wall, f"error: {error}"
    return {function.address: function for function in features.functions}, watch.wall, "ok"


def hash_with_mcrit(path: Path) -> FunctionSignatures:
    return McritFunctionHasher().hash_file(path)


# --------------------------------------------------------------------------- the run


@dataclass
class BuildAnalysis:
    build: XcompBuild
    stripped: Path
    earmark_functions: dict[int, Any] = field(default_factory=dict)
    earmark_seconds: float = 0.0
    earmark_status: str = "not run"
    mcrit: FunctionSignatures | None = None


@dataclass(frozen=True, slots=True)
class EngineResult:
    engine: str
    standard: tuple[RankOutcome, ...]
    full_pool: tuple[RankOutcome, ...]
    true_scores: tuple[float, ...]
    wrong_scores: tuple[float, ...]
    seconds: float

    def row(self, pair: str, pool_size: int) -> list[object]:
        return [
            pair,
            self.engine,
            len(self.standard),
            pool_size,
            recall_at_k(self.standard, 1),
            mean_reciprocal_rank(self.standard, 10),
            recall_at_k(self.full_pool, 1),
            mean_reciprocal_rank(self.full_pool, 10),
            roc_auc(self.true_scores, self.wrong_scores),
            round(self.seconds, 2),
        ]


RESULT_HEADERS = (
    "pair", "engine", "queries", "pool", "R@1 (1+100)", "MRR@10 (1+100)",
    "R@1 (pool)", "MRR@10 (pool)", "AUC", "score s",
)  # fmt: skip


def strip_copy(library: Path, destination: Path) -> Path:
    """Stripped copy (symbols removed, addresses unchanged) — what an analyst would be given."""
    subprocess.run(["strip", "-o", str(destination), str(library)], check=True, capture_output=True)
    return destination


def analyse_builds(
    builds: Sequence[XcompBuild], workdir: Path, jobs: int, with_earmark: bool
) -> dict[str, BuildAnalysis]:
    analyses: dict[str, BuildAnalysis] = {}
    for build in builds:
        stripped = strip_copy(build.library, workdir / f"{build.project}-{build.name}.so")
        analyses[build.name] = BuildAnalysis(build, stripped)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        mcrit_jobs = {
            name: pool.submit(hash_with_mcrit, a.stripped) for name, a in analyses.items()
        }
        earmark_jobs = (
            {name: pool.submit(extract_with_earmark, a.stripped) for name, a in analyses.items()}
            if with_earmark
            else {}
        )
        for name, analysis in analyses.items():
            analysis.mcrit = mcrit_jobs[name].result()
            if name in earmark_jobs:
                functions, seconds, status = earmark_jobs[name].result()
                analysis.earmark_functions, analysis.earmark_seconds = functions, seconds
                analysis.earmark_status = status
    return analyses


def engine_starts(analysis: BuildAnalysis, with_earmark: bool) -> list[frozenset[int]]:
    assert analysis.mcrit is not None
    starts = [analysis.mcrit.function_starts]
    if with_earmark:
        starts.append(frozenset(analysis.earmark_functions))
    return starts


def coverage_rows(
    project: str, analyses: dict[str, BuildAnalysis], with_earmark: bool
) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, analysis in analyses.items():
        truth = {f.address for f in analysis.build.representatives(MIN_FUNCTION_BYTES).values()}
        assert analysis.mcrit is not None
        mcrit = analysis.mcrit
        rows.append([
            f"{project} {name}", "mcrit/smda", mcrit.status, len(mcrit.function_starts),
            len(truth & mcrit.function_starts) / max(1, len(truth)),
            round(mcrit.disassembly_seconds + mcrit.hashing_seconds, 2),
        ])  # fmt: skip
        if with_earmark:
            found = frozenset(analysis.earmark_functions)
            rows.append([
                f"{project} {name}", "earmark", analysis.earmark_status, len(found),
                len(truth & found) / max(1, len(truth)), round(analysis.earmark_seconds, 2),
            ])  # fmt: skip
    return rows


def mcrit_scorer(analyses: dict[str, BuildAnalysis]) -> tuple[Scores, McritFunctionHasher]:
    hasher = McritFunctionHasher()
    matrices: dict[tuple[str, tuple[int, ...]], tuple[np.ndarray, np.ndarray]] = {}

    def scores(build_x: str, address: int, build_y: str, pool: Sequence[int]) -> np.ndarray:
        signatures_x, signatures_y = analyses[build_x].mcrit, analyses[build_y].mcrit
        assert signatures_x is not None and signatures_y is not None
        key = (build_y, tuple(pool))
        if key not in matrices:
            matrices[key] = hasher.signature_matrix([signatures_y.signatures.get(a) for a in pool])
        matrix, present = matrices[key]
        query = signatures_x.signatures.get(address)
        if query is None:  # MCRIT does not hash functions this small: it cannot rank them
            return np.zeros(len(pool))
        return hasher.score_against(np.frombuffer(query, dtype=matrix.dtype), matrix, present)

    return scores, hasher


def earmark_scorer(
    analyses: dict[str, BuildAnalysis], score_pairs: Callable[[Any, Sequence[Any]], np.ndarray]
) -> Scores:
    def scores(build_x: str, address: int, build_y: str, pool: Sequence[int]) -> np.ndarray:
        functions_y = analyses[build_y].earmark_functions
        return np.asarray(
            score_pairs(
                analyses[build_x].earmark_functions[address], [functions_y[a] for a in pool]
            )
        )

    return scores


def evaluate_pair(
    x: BuildAnalysis,
    y: BuildAnalysis,
    engines: dict[str, Scores],
    with_earmark: bool,
    max_queries: int | None,
) -> tuple[list[EngineResult], int, list[tuple[int, int]]]:
    """Rank Y's functions for every shared source function of X, for each engine."""
    truth_x = x.build.representatives(MIN_FUNCTION_BYTES)
    truth_y = y.build.representatives(MIN_FUNCTION_BYTES)
    recovered_x = frozenset.intersection(*engine_starts(x, with_earmark))
    recovered_y = frozenset.intersection(*engine_starts(y, with_earmark))
    pool = sorted({f.address for f in truth_y.values()} & recovered_y)
    pool_index = {address: index for index, address in enumerate(pool)}
    queries = sorted(
        (truth_x[key].address, truth_y[key].address)
        for key in truth_x.keys() & truth_y.keys()
        if truth_x[key].address in recovered_x and truth_y[key].address in pool_index
    )
    rng = np.random.default_rng(SEED)
    if max_queries is not None and len(queries) > max_queries:
        chosen = rng.choice(len(queries), size=max_queries, replace=False)
        queries = [queries[i] for i in sorted(chosen)]
    # One draw of wrong candidates per query, shared by every engine.
    draws: list[np.ndarray] = []
    for _, address_y in queries:
        wrong = np.array(
            [i for i in range(len(pool)) if i != pool_index[address_y]], dtype=np.int64
        )
        size = min(WRONG_CANDIDATES, wrong.size)
        draws.append(rng.choice(wrong, size=size, replace=False) if size else wrong)
    results: list[EngineResult] = []
    for engine, scores in engines.items():
        standard: list[RankOutcome] = []
        full: list[RankOutcome] = []
        true_scores: list[float] = []
        wrong_scores: list[float] = []
        with Stopwatch() as watch:
            for (address_x, address_y), drawn in zip(queries, draws, strict=True):
                pool_scores = scores(x.build.name, address_x, y.build.name, pool)
                true_position = pool_index[address_y]
                true_score = float(pool_scores[true_position])
                others = np.delete(pool_scores, true_position)
                full.append(rank_outcome(true_score, others))
                standard.append(rank_outcome(true_score, pool_scores[drawn]))
                true_scores.append(true_score)
                wrong_scores.extend(pool_scores[drawn].tolist())
        results.append(
            EngineResult(
                engine,
                tuple(standard),
                tuple(full),
                tuple(true_scores),
                tuple(wrong_scores),
                watch.wall,
            )
        )
    return results, len(pool), queries


def check_mcrit_vectorised_score(
    x: BuildAnalysis,
    y: BuildAnalysis,
    queries: Sequence[tuple[int, int]],
    hasher: McritFunctionHasher,
) -> None:
    """Our vectorised MCRIT score must equal MCRIT's own MinHash.calculateMinHashScore."""
    assert x.mcrit is not None and y.mcrit is not None
    for address_x, address_y in queries[:50]:
        first, second = x.mcrit.signatures.get(address_x), y.mcrit.signatures.get(address_y)
        if first is None or second is None:
            continue
        matrix, present = hasher.signature_matrix([second])
        ours = float(
            hasher.score_against(np.frombuffer(first, dtype=matrix.dtype), matrix, present)[0]
        )
        if abs(ours - hasher.score(first, second)) > 1e-9:
            raise AssertionError(f"vectorised MCRIT score {ours} differs from MCRIT's own score")


def pair_list(quick: bool) -> list[tuple[str, str]]:
    if quick:
        return list(QUICK_PAIRS)
    pairs = [(f"{c}-{a}", f"{c}-{b}") for c in COMPILERS for a, b in CROSS_OPTIMISATION]
    return pairs + list(CROSS_COMPILER)


def run_project(
    project: str, quick: bool, jobs: int, workdir: Path
) -> tuple[list[list[object]], list[list[object]]]:
    pairs = pair_list(quick)
    names = sorted({name for pair in pairs for name in pair})
    builds = [load_xcomp_build(xcomp_build_dir(project, name)) for name in names]
    with_earmark = earmark_available()
    analyses = analyse_builds(builds, workdir, jobs, with_earmark)
    mcrit_scores, hasher = mcrit_scorer(analyses)
    engines: dict[str, Scores] = {"mcrit minhash": mcrit_scores}
    if with_earmark:
        engines["earmark minhash"] = earmark_scorer(analyses, score_pairs_minhash)
        similarity = load_similarity()
        if similarity is not None:
            engines["earmark similarity"] = earmark_scorer(analyses, make_score_pairs(similarity))
    rows: list[list[object]] = []
    for name_x, name_y in pairs:
        results, pool_size, queries = evaluate_pair(
            analyses[name_x],
            analyses[name_y],
            engines,
            with_earmark,
            QUICK_MAX_QUERIES if quick else None,
        )
        check_mcrit_vectorised_score(analyses[name_x], analyses[name_y], queries, hasher)
        label = f"{project} {name_x}:{name_y}"
        pair_rows = [result.row(label, pool_size) for result in results]
        print(render_table(RESULT_HEADERS, pair_rows, markdown=False), end="\n\n", flush=True)
        rows.extend(pair_rows)
    coverage = coverage_rows(project, analyses, with_earmark)
    print(render_table(COVERAGE_HEADERS, coverage, markdown=False), end="\n\n", flush=True)
    return rows, coverage


def summary_rows(rows: Sequence[Sequence[object]]) -> list[list[object]]:
    """Per engine: mean over pairs of each metric, cross-optimisation and cross-compiler apart."""
    groups: dict[tuple[str, str], list[Sequence[object]]] = {}
    for row in rows:
        x, _, y = str(row[0]).split(" ")[1].partition(":")
        kind = "cross-compiler" if x.split("-")[0] != y.split("-")[0] else "cross-optimisation"
        groups.setdefault((kind, str(row[1])), []).append(row)
    summary: list[list[object]] = []
    for (kind, engine), members in sorted(groups.items()):
        means = [float(np.nanmean([float(str(m[i])) for m in members])) for i in range(4, 9)]
        summary.append([kind, engine, len(members), sum(int(str(m[2])) for m in members), *means])
    return summary


SUMMARY_HEADERS = (
    "setting", "engine", "pairs", "queries", "R@1 (1+100)", "MRR@10 (1+100)", "R@1 (pool)",
    "MRR@10 (pool)", "AUC",
)  # fmt: skip
COVERAGE_HEADERS = ("build", "engine", "status", "starts found", "truth recall", "analysis s")


def source_revision() -> str:
    """The project commit the numbers belong to ("+dirty" when the work tree has changes)."""
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty=+dirty"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent,
    )
    return described.stdout.strip() or "unknown"


def render_section(
    command: str,
    rows: Sequence[Sequence[object]],
    coverage: Sequence[Sequence[object]],
    seconds: float,
    jobs: int,
) -> str:
    notes = [
        SECTION_TITLE,
        "",
        f"Command: `{command}` (wall {seconds:.0f} s, {jobs} processes,",
        f"commit {source_revision()}).",
        "Produced by `bench/function_search.py`;",
        f"functions of at least {MIN_FUNCTION_BYTES} bytes in both builds, start-up stubs and gcc",
        "`.cold`/`.part` fragments excluded; queries and pool limited to starts every engine",
        f"recovered; 1+{WRONG_CANDIDATES} candidates drawn with seed {SEED};",
        "ties count as a random order.",
        "",
        "### Summary (mean over pairs)",
        "",
        render_table(SUMMARY_HEADERS, summary_rows(rows)),
        "",
        "### Per pair",
        "",
        render_table(RESULT_HEADERS, rows),
        "",
        "### Function starts recovered on the stripped builds",
        "",
        render_table(COVERAGE_HEADERS, coverage),
        "",
    ]
    return "\n".join(notes)


def update_document(document: Path, section: str) -> None:
    """Replace (or append) only the '## Function search' section; other sections are untouched."""
    text = document.read_text(encoding="utf-8") if document.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION_TITLE), None)
    if start is None:
        new_text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        new_text = "\n".join(
            [
                *lines[:start],
                section.rstrip("\n"),
                *([""] if end < len(lines) else []),
                *lines[end:],
            ]
        )
    document.write_text(new_text.rstrip("\n") + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--projects", nargs="+", choices=PROJECTS, default=list(PROJECTS))
    parser.add_argument(
        "--quick", action="store_true", help=f"3 pairs, at most {QUICK_MAX_QUERIES} queries each"
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes for disassembly (default 2)")
    parser.add_argument(
        "--update-doc", type=Path, help="write results into this markdown file's section"
    )
    args = parser.parse_args(argv)
    if not earmark_available():
        print(
            "earmark.extract.analyze_file is not available yet: measuring MCRIT only.",
            file=sys.stderr,
        )
    rows: list[list[object]] = []
    coverage: list[list[object]] = []
    with Stopwatch() as watch, tempfile.TemporaryDirectory(prefix="earmark-fsearch-") as tmp:
        for project in args.projects:
            project_rows, project_coverage = run_project(project, args.quick, args.jobs, Path(tmp))
            rows.extend(project_rows)
            coverage.extend(project_coverage)
    print(render_table(SUMMARY_HEADERS, summary_rows(rows), markdown=False))
    print(f"\nwall {watch.wall:.1f} s")
    if args.update_doc is not None:
        command = "python -m bench.function_search " + shlex.join(
            list(argv if argv is not None else sys.argv[1:])
        )
        update_document(
            args.update_doc, render_section(command.strip(), rows, coverage, watch.wall, args.jobs)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
