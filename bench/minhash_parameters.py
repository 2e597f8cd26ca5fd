"""MinHash parameters from measurements: shingle n-gram sizes and permutation count.

MinHash-only function search on the xcomp cross-compilation builds, with the protocol of
``bench/function_search.py`` (same pairs, same minimum size, same 1+100 draw and seed, same
metric code): for every shingle choice (which n-gram sizes of the normalised instruction
stream form the set) the score of a (query, candidate) pair is either

- the exact Jaccard index of the two shingle sets (what MinHash estimates), or
- the MinHash estimate with 32, 64 or 128 permutations (share of equal signature slots).

The signature maths are a parametrised copy of ``earmark.extract.minhash`` (token ids,
FNV-style n-gram folding, multiply-shift permutations with the same blake2b-derived
coefficients, so the first k of 128 permutations are the k-permutation signature). The copy
is checked against earmark: with n-grams 1..3 and 64 permutations it must reproduce every
``FunctionFeatures.minhash`` that ``analyze_file`` stored, else the run stops.

Queries and pool are limited to function starts earmark recovered on the stripped builds
(``function_search`` also intersects with MCRIT's starts; MCRIT is not run here, so query
counts are a little higher). Choices are picked on zlib only; zstd and brotli are held out.
Cost = CPU seconds of shingling + signatures (best of ``--repeat``) per 1,000 functions,
over every function of the analysed builds (CPU, not wall: the machine is shared and wall
times of one choice varied by half between runs).

Usage:  python -m bench.minhash_parameters [--projects zlib zstd brotli] [--quick] [--jobs 2]
                                            [--update-doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from bench.common import (
    Stopwatch,
    load_xcomp_build,
    mean_reciprocal_rank,
    recall_at_k,
    render_table,
    xcomp_build_dir,
)
from bench.function_search import (
    MIN_FUNCTION_BYTES,
    PROJECTS,
    QUICK_MAX_QUERIES,
    SEED,
    WRONG_CANDIDATES,
    BuildAnalysis,
    EngineResult,
    Scores,
    evaluate_pair,
    extract_with_earmark,
    pair_list,
    source_revision,
    strip_copy,
)
from bench.peers.mcrit_peer import FunctionSignatures

from earmark.extract.minhash import (
    MIX_MULTIPLIER,
    NGRAM_MULTIPLIER,
    grouped_signatures,
    permutation_coefficients,
    token_id,
)
from earmark.index.function_index import DEFAULT_MIN_SIMILARITY
from earmark.model.sample import MINHASH_PERMUTATIONS

# The shingle choices compared: name -> n-gram sizes whose union forms a function's set.
SHINGLE_CHOICES: dict[str, tuple[int, ...]] = {
    "{1}": (1,),
    "{1,2}": (1, 2),
    "{1,2,3}": (1, 2, 3),
    "{2,3}": (2, 3),
    "{3}": (3,),
    "{1..4}": (1, 2, 3, 4),
    "{2..4}": (2, 3, 4),
}
CURRENT_CHOICE = "{1,2,3}"  # earmark.extract.minhash.NGRAM_SIZES today
PERMUTATION_COUNTS = (32, 64, 128)
SELECTION_PROJECT = "zlib"  # choices are made on zlib; the other projects are held out
SECTION_TITLE = "## MinHash parameters"
EXACT = "exact"

# earmark's own constants and permutations, so the current choice reproduces earmark's stored
# signatures bit for bit (checked at run time).
_TOKEN_IDS: dict[str, int] = {}


# --------------------------------------------------------------------------- signatures


_COEFFICIENTS = {count: permutation_coefficients(count) for count in PERMUTATION_COUNTS}


@dataclass(frozen=True, slots=True)
class ShingleSets:
    """Distinct shingles of many functions, laid end to end (function i: starts[i]:starts[i+1])."""

    shingles: npt.NDArray[np.uint32]
    starts: npt.NDArray[np.int64]

    def of(self, row: int) -> npt.NDArray[np.uint32]:
        return self.shingles[self.starts[row] : self.starts[row + 1]]

    def sizes(self) -> npt.NDArray[np.int64]:
        return np.diff(self.starts)


def shingle_sets(streams: Sequence[Sequence[str]], sizes: tuple[int, ...]) -> ShingleSets:
    """Distinct n-gram shingles (n in ``sizes``) of each stream, as earmark folds them."""
    count = len(streams)
    lengths = np.fromiter((len(s) for s in streams), dtype=np.int64, count=count)
    total = int(lengths.sum())
    # Ids of new tokens first, then a C-level dict lookup per token, as earmark does (a Python
    # call per token would make every choice look slower than earmark's own code).
    for token in set(itertools.chain.from_iterable(streams)).difference(_TOKEN_IDS):
        _TOKEN_IDS[token] = token_id(token)
    ids = np.fromiter(
        map(_TOKEN_IDS.__getitem__, itertools.chain.from_iterable(streams)),
        dtype=np.uint64,
        count=total,
    )
    ends = np.cumsum(lengths)
    owner = np.repeat(np.arange(count, dtype=np.int64), lengths)
    keys_parts: list[npt.NDArray[np.uint64]] = []
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the point
        for size in sizes:
            if total < size:
                continue
            folded = ids[: total - size + 1] ^ np.uint64(size)
            for shift in range(1, size):
                folded = folded * NGRAM_MULTIPLIER ^ ids[shift : total - size + 1 + shift]
            first_owner = owner[: total - size + 1]
            inside = np.arange(total - size + 1, dtype=np.int64) + size <= ends[first_owner]
            shingles = ((folded[inside] * MIX_MULTIPLIER) >> np.uint64(32)).astype(np.uint64)
            keys_parts.append((first_owner[inside].astype(np.uint64) << np.uint64(32)) | shingles)
    keys = np.concatenate(keys_parts) if keys_parts else np.zeros(0, dtype=np.uint64)
    keys.sort()
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if keys.size else keys
    per_stream = np.bincount((keys >> np.uint64(32)).astype(np.int64), minlength=count)
    starts = np.concatenate(([0], np.cumsum(per_stream))).astype(np.int64)
    return ShingleSets((keys & np.uint64(0xFFFFFFFF)).astype(np.uint32), starts)


def signatures(sets: ShingleSets, permutations: int) -> npt.NDArray[np.uint32]:
    """(functions, permutations) MinHash matrix, through earmark's own batched routine."""
    return grouped_signatures(sets.shingles, sets.sizes(), _COEFFICIENTS[permutations])


# --------------------------------------------------------------------------- scorers


@dataclass(frozen=True, slots=True)
class BuildShingles:
    """One build under one shingle choice: sets and 128-permutation signatures by address."""

    row_of: dict[int, int]
    sets: ShingleSets
    signatures: npt.NDArray[np.uint32]


def exact_scorer(builds: dict[str, BuildShingles]) -> Scores:
    """Exact Jaccard of the query's set against every pool function's set.

    One vectorised pass per query (pool vocabulary marked, hits counted per pool function)
    instead of Python set operations: ~10^4 queries x 10^3 candidates x 7 choices.
    """
    pools: dict[tuple[str, tuple[int, ...]], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def scores(build_x: str, address: int, build_y: str, pool: Sequence[int]) -> np.ndarray:
        key = (build_y, tuple(pool))
        if key not in pools:
            target = builds[build_y]
            rows = [target.row_of[a] for a in pool]
            members = [target.sets.of(r) for r in rows]
            concatenated = np.concatenate(members)
            vocabulary, inverse = np.unique(concatenated, return_inverse=True)
            owners = np.repeat(np.arange(len(rows)), [len(m) for m in members])
            sizes = np.array([len(m) for m in members], dtype=np.float64)
            pools[key] = (vocabulary, np.stack([inverse, owners]), sizes)
        vocabulary, inverse_and_owner, sizes = pools[key]
        query_builds = builds[build_x]
        query = query_builds.sets.of(query_builds.row_of[address])
        in_query = np.isin(vocabulary, query, assume_unique=True)
        hits = in_query[inverse_and_owner[0]]
        intersection = np.bincount(inverse_and_owner[1][hits], minlength=len(sizes))
        union = len(query) + sizes - intersection
        return np.divide(intersection, union, out=np.zeros(len(sizes)), where=union > 0)

    return scores


def estimate_scorer(builds: dict[str, BuildShingles], permutations: int) -> Scores:
    """Share of equal slots among the first ``permutations`` MinHash values."""
    pools: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    def scores(build_x: str, address: int, build_y: str, pool: Sequence[int]) -> np.ndarray:
        key = (build_y, tuple(pool))
        if key not in pools:
            target = builds[build_y]
            pools[key] = target.signatures[[target.row_of[a] for a in pool], :permutations]
        query_builds = builds[build_x]
        query = query_builds.signatures[query_builds.row_of[address], :permutations]
        return np.asarray((pools[key] == query).mean(axis=1))

    return scores


def engine_name(choice: str, scorer: str) -> str:
    return f"{choice} {scorer}"


def scorer_names() -> list[str]:
    return [EXACT, *(f"k={k}" for k in PERMUTATION_COUNTS)]


# --------------------------------------------------------------------------- the run


def analyse(
    project: str, names: Sequence[str], workdir: Path, jobs: int
) -> dict[str, BuildAnalysis]:
    """earmark's functions of each stripped build; its starts stand in for 'every engine'."""
    analyses: dict[str, BuildAnalysis] = {}
    for name in names:
        build = load_xcomp_build(xcomp_build_dir(project, name))
        analyses[name] = BuildAnalysis(
            build, strip_copy(build.library, workdir / f"{project}-{name}.so")
        )
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        jobs_by_name = {
            n: pool.submit(extract_with_earmark, a.stripped) for n, a in analyses.items()
        }
        for name, analysis in analyses.items():
            functions, seconds, status = jobs_by_name[name].result()
            if status != "ok":
                raise RuntimeError(f"{project} {name}: {status}")
            analysis.earmark_functions, analysis.earmark_seconds = functions, seconds
            analysis.earmark_status = status
            # evaluate_pair intersects earmark's starts with MCRIT's; MCRIT is not run here.
            analysis.mcrit = FunctionSignatures(
                analysis.stripped, "not run", {}, frozenset(functions), 0.0, 0.0
            )
    return analyses


def build_shingles(analysis: BuildAnalysis, sizes: tuple[int, ...]) -> BuildShingles:
    functions = list(analysis.earmark_functions.values())
    sets = shingle_sets([f.normalized for f in functions], sizes)
    return BuildShingles(
        {f.address: row for row, f in enumerate(functions)}, sets, signatures(sets, 128)
    )


def check_against_earmark(analysis: BuildAnalysis, current: BuildShingles) -> None:
    """The copy of the signature maths must equal what earmark stored, else nothing counts."""
    stored = np.array([f.minhash for f in analysis.earmark_functions.values()], dtype=np.uint32)
    if stored.shape[1] != MINHASH_PERMUTATIONS or not np.array_equal(
        stored, current.signatures[:, :MINHASH_PERMUTATIONS]
    ):
        raise AssertionError(f"{analysis.build.name}: signatures differ from earmark's minhash")


@dataclass(frozen=True, slots=True)
class PairResult:
    project: str
    pair: str
    queries: int
    by_engine: dict[str, EngineResult]


def run_project(
    project: str, quick: bool, jobs: int, workdir: Path
) -> tuple[list[PairResult], list[BuildAnalysis]]:
    pairs = pair_list(quick)
    names = sorted({name for pair in pairs for name in pair})
    analyses = analyse(project, names, workdir, jobs)
    engines: dict[str, Scores] = {}
    for choice, sizes in SHINGLE_CHOICES.items():
        per_build = {name: build_shingles(a, sizes) for name, a in analyses.items()}
        if choice == CURRENT_CHOICE:
            for name, analysis in analyses.items():
                check_against_earmark(analysis, per_build[name])
        engines[engine_name(choice, EXACT)] = exact_scorer(per_build)
        for permutations in PERMUTATION_COUNTS:
            engines[engine_name(choice, f"k={permutations}")] = estimate_scorer(
                per_build, permutations
            )
    results: list[PairResult] = []
    for name_x, name_y in pairs:
        outcomes, _, queries = evaluate_pair(
            analyses[name_x], analyses[name_y], engines, True,
            QUICK_MAX_QUERIES if quick else None,
        )  # fmt: skip
        results.append(
            PairResult(project, f"{name_x}:{name_y}", len(queries), {r.engine: r for r in outcomes})
        )
        print(f"{project} {name_x}:{name_y}: {len(queries)} queries", file=sys.stderr, flush=True)
    return results, list(analyses.values())


def mean_absolute_error(estimate: EngineResult, exact: EngineResult) -> float:
    estimated = np.array(estimate.true_scores + estimate.wrong_scores)
    truth = np.array(exact.true_scores + exact.wrong_scores)
    return float(np.mean(np.abs(estimated - truth)))


def share_above_floor(results: Sequence[PairResult], engine: str) -> list[object]:
    """Shares of true and of drawn wrong pairs scoring at least the index's match floor: how
    often the index would report the copy, and how often an unrelated function."""
    true = np.concatenate([r.by_engine[engine].true_scores for r in results])
    wrong = np.concatenate([r.by_engine[engine].wrong_scores for r in results])
    # Four decimals: the wrong-pair share is often below 0.001, and that is what matters.
    return [
        f"{np.mean(true >= DEFAULT_MIN_SIMILARITY):.4f}",
        f"{np.mean(wrong >= DEFAULT_MIN_SIMILARITY):.4f}",
    ]


def project_means(results: Sequence[PairResult], project: str, engine: str) -> tuple[float, float]:
    """Mean over the project's pairs of Recall@1 and MRR@10 (1+100 setting)."""
    members = [r.by_engine[engine] for r in results if r.project == project]
    return (
        float(np.mean([recall_at_k(m.standard, 1) for m in members])),
        float(np.mean([mean_reciprocal_rank(m.standard, 10) for m in members])),
    )


def measure_cost(
    streams: Sequence[Sequence[str]], repeat: int
) -> tuple[dict[tuple[str, int], float], dict[str, float], float]:
    """Seconds per 1,000 functions for each (choice, permutations); mean distinct shingles per
    function per choice; earmark's own stream_minhash_signatures for the current choice."""
    from earmark.extract.minhash import stream_minhash_signatures

    thousands = len(streams) / 1000
    cost: dict[tuple[str, int], float] = {}
    distinct: dict[str, float] = {}
    stream_minhash_signatures(streams)  # token ids memoised before anything is timed
    for choice, sizes in SHINGLE_CHOICES.items():
        for permutations in PERMUTATION_COUNTS:
            best = float("inf")
            for _ in range(repeat):
                with Stopwatch() as watch:
                    sets = shingle_sets(streams, sizes)
                    signatures(sets, permutations)
                best = min(best, watch.cpu)
            cost[(choice, permutations)] = best / thousands
            distinct[choice] = float(np.mean(sets.sizes()))
    reference = float("inf")
    for _ in range(repeat):
        with Stopwatch() as watch:
            stream_minhash_signatures(streams)
        reference = min(reference, watch.cpu)
    return cost, distinct, reference / thousands


# --------------------------------------------------------------------------- tables


def result_rows(
    results: Sequence[PairResult],
    projects: Sequence[str],
    cost: dict[tuple[str, int], float],
    distinct: dict[str, float],
) -> tuple[list[str], list[list[object]]]:
    """One row per (choice, scorer): per-project R@1/MRR@10, held-out mean, estimate error, cost."""
    held_out = [p for p in projects if p != SELECTION_PROJECT]
    held_results = [r for r in results if r.project in held_out]
    headers = ["shingles", "score"]
    for project in projects:
        headers += [f"{project} R@1", f"{project} MRR@10"]
    headers += ["held-out R@1", "held-out R@1 (pool)", "MAE vs exact", "R@1 - exact",
                "true >= floor", "wrong >= floor", "shingles/fn", "CPU ms / 1k fn"]  # fmt: skip
    rows: list[list[object]] = []
    for choice in SHINGLE_CHOICES:
        exact_engine = engine_name(choice, EXACT)
        exact_recall = np.mean([recall_at_k(r.by_engine[exact_engine].standard) for r in results])
        for scorer in scorer_names():
            engine = engine_name(choice, scorer)
            row: list[object] = [choice, scorer]
            for project in projects:
                row.extend(project_means(results, project, engine))
            row.append(
                float(np.mean([project_means(results, p, engine)[0] for p in held_out]))
                if held_out
                else float("nan")
            )
            row.append(
                float(np.mean([recall_at_k(r.by_engine[engine].full_pool) for r in held_results]))
                if held_results
                else float("nan")
            )
            if scorer == EXACT:
                row += ["-", "-"]
            else:
                row.append(
                    float(np.mean([
                        mean_absolute_error(r.by_engine[engine], r.by_engine[exact_engine])
                        for r in results
                    ]))
                )  # fmt: skip
                recall = np.mean([recall_at_k(r.by_engine[engine].standard) for r in results])
                row.append(float(recall - exact_recall))
            row += share_above_floor(results, engine)
            row.append(round(distinct[choice], 1))
            if scorer == EXACT:
                row.append("-")
            else:
                permutations = int(scorer.removeprefix("k="))
                row.append(round(cost[(choice, permutations)] * 1000, 1))
            rows.append(row)
    return headers, rows


def pick_on_selection_project(results: Sequence[PairResult]) -> str:
    """Shingle choice with the best zlib Recall@1 under the stored 64-permutation estimate."""
    return max(
        SHINGLE_CHOICES,
        key=lambda choice: project_means(
            results, SELECTION_PROJECT, engine_name(choice, f"k={MINHASH_PERMUTATIONS}")
        )[0],
    )


def per_pair_rows(results: Sequence[PairResult]) -> list[list[object]]:
    rows: list[list[object]] = []
    for result in results:
        row: list[object] = [f"{result.project} {result.pair}", result.queries]
        for choice in SHINGLE_CHOICES:
            row.append(recall_at_k(result.by_engine[engine_name(choice, "k=64")].standard))
        rows.append(row)
    return rows


def summary_text(
    results: Sequence[PairResult],
    projects: Sequence[str],
    cost: dict[tuple[str, int], float],
    pick: str,
) -> str:
    """The numbers the decision rests on, for the picked and the current choice (k=64)."""
    held_out = [p for p in projects if p != SELECTION_PROJECT]
    held = [r for r in results if r.project in held_out]
    k = MINHASH_PERMUTATIONS

    def recall(choice: str, scorer: str, members: Sequence[PairResult]) -> float:
        return float(np.mean([recall_at_k(r.by_engine[engine_name(choice, scorer)].standard)
                              for r in members]))  # fmt: skip

    def described(choice: str) -> str:
        zlib = [r for r in results if r.project == SELECTION_PROJECT]
        wrong = share_above_floor(results, engine_name(choice, f"k={k}"))[1]
        return (
            f"{choice}: {SELECTION_PROJECT} R@1 {recall(choice, f'k={k}', zlib):.3f}, held-out"
            f" R@1 {recall(choice, f'k={k}', held):.3f} (exact Jaccard"
            f" {recall(choice, EXACT, held):.3f}, k=128 {recall(choice, 'k=128', held):.3f}),"
            f" wrong pairs >= floor {wrong}, {cost[(choice, k)] * 1000:.0f} CPU ms / 1k fn"
        )

    if not held or pick == "-":
        return ""
    lines = [f"Summary (k={k}, means over pairs):", "", f"- picked {described(pick)};"]
    if pick != CURRENT_CHOICE:
        lines.append(f"- current {described(CURRENT_CHOICE)}.")
    return "\n".join(lines)


def render_section(
    command: str,
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    pair_rows: Sequence[Sequence[object]],
    pick: str,
    summary: str,
    reference_seconds: float,
    seconds: float,
) -> str:
    return "\n".join([
        SECTION_TITLE,
        "",
        f"Command: `{command}` (wall {seconds:.0f} s, commit {source_revision()}).",
        "Produced by `bench/minhash_parameters.py`: MinHash-only function search on the xcomp",
        "builds with the protocol of `bench/function_search.py` (same pairs, functions of at",
        f"least {MIN_FUNCTION_BYTES} bytes, 1+{WRONG_CANDIDATES} candidates, seed {SEED}), but",
        "queries and pool limited to earmark's recovered starts only (MCRIT not run). Score =",
        "exact Jaccard of the shingle sets, or the MinHash estimate with k permutations; means",
        "over each project's pairs; \"(pool)\": every eligible function of Y is a candidate.",
        "MAE = mean |estimate - exact| over the (query, candidate) pairs scored; true/wrong",
        ">= floor = share of true / drawn wrong pairs scoring at least",
        f"the index's match floor {DEFAULT_MIN_SIMILARITY} (all pairs pooled); cost = shingling",
        "+ signatures, CPU ms per 1,000 functions, best of the repeats (earmark's own",
        f"`stream_minhash_signatures`, {{1,2,3}} k=64: {reference_seconds * 1000:.1f} ms / 1k fn).",
        f"Choice made on {SELECTION_PROJECT} only (k=64 R@1): **{pick}**; the other projects are",
        "held out.",
        "",
        summary,
        "",
        render_table(headers, rows),
        "",
        "Recall@1 (1+100) per pair, k=64:",
        "",
        render_table(["pair", "queries", *SHINGLE_CHOICES], pair_rows),
        "",
    ])  # fmt: skip


def replace_section(document: Path, section: str) -> None:
    """Replace (or append) only this script's '## MinHash parameters' section."""
    text = document.read_text(encoding="utf-8") if document.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION_TITLE), None)
    if start is None:
        new_lines = [*lines, "", *section.rstrip("\n").splitlines()]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = ["", *lines[end:]] if end < len(lines) else []
        new_lines = [*lines[:start], *section.rstrip("\n").splitlines(), *tail]
    document.write_text("\n".join(new_lines).rstrip("\n") + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--projects", nargs="+", choices=PROJECTS, default=list(PROJECTS))
    parser.add_argument(
        "--quick", action="store_true", help=f"3 pairs, at most {QUICK_MAX_QUERIES} queries each"
    )
    parser.add_argument("--jobs", type=int, default=2, help="processes for disassembly (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timing repeats (best is kept)")
    parser.add_argument("--update-doc", type=Path, help="write the section into this markdown file")
    args = parser.parse_args(argv)
    results: list[PairResult] = []
    streams: list[tuple[str, ...]] = []
    with Stopwatch() as watch, tempfile.TemporaryDirectory(prefix="earmark-minhash-") as tmp:
        for project in args.projects:
            project_results, analyses = run_project(project, args.quick, args.jobs, Path(tmp))
            results.extend(project_results)
            for analysis in analyses:
                streams.extend(f.normalized for f in analysis.earmark_functions.values())
        cost, distinct, reference = measure_cost(streams, args.repeat)
    headers, rows = result_rows(results, args.projects, cost, distinct)
    pair_rows = per_pair_rows(results)
    pick = pick_on_selection_project(results) if SELECTION_PROJECT in args.projects else "-"
    summary = summary_text(results, args.projects, cost, pick)
    print(render_table(headers, rows, markdown=False))
    print()
    print(render_table(["pair", "queries", *SHINGLE_CHOICES], pair_rows, markdown=False))
    print(
        f"\npicked on {SELECTION_PROJECT}: {pick}; {len(streams)} functions timed; earmark"
        f" {{1,2,3}} k=64: {reference * 1000:.1f} ms / 1k fn; wall {watch.wall:.1f} s\n"
    )
    print(summary)
    if args.update_doc is not None:
        command = "python -m bench.minhash_parameters " + shlex.join(
            list(argv if argv is not None else sys.argv[1:])
        )
        section = render_section(
            command.strip(), headers, rows, pair_rows, pick, summary, reference, watch.wall
        )
        replace_section(args.update_doc, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
