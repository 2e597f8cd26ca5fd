"""Shared pieces of the benchmarks: corpus loading, train/query splits, metrics, timing, memory.

Everything here is engine-neutral: earmark and its peers (SMDA, MCRIT) are measured with the same
loaders, the same splits and the same metric code, in the same run.

Corpus layout (see /work/shared/corpus/README.md):
    pe/<project>/<version>/<file>  + pe/labels_full.csv
    elf/<project>/<version>/<file> + elf/labels_full.csv
    xcomp/<project>/<compiler>-<opt>/<lib>.so + functions.tsv
"""

from __future__ import annotations

import csv
import os
import re
import resource
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_CORPUS = Path.home() / ".cache" / "earmark-corpus"

# `origin` value of labels_full.csv for a file written by the project itself; anything else
# ("msvc-runtime", "vendored-third-party") is a whole file of third-party code.
PROJECT_ORIGIN = "project"


def corpus_root() -> Path:
    """The corpus directory: $EARMARK_CORPUS, else ~/.cache/earmark-corpus."""
    return Path(os.environ.get("EARMARK_CORPUS", str(DEFAULT_CORPUS))).expanduser()


# --------------------------------------------------------------------------- corpus: PE / ELF


@dataclass(frozen=True, slots=True)
class CorpusFile:
    """One binary of the release corpus with its provenance label."""

    path: Path
    project: str  # the "author": upstream project that shipped the file
    version: str
    sha256: str
    size: int
    origin: str  # "project", or the kind of whole-file third-party code
    third_party_libs: str  # free text: libraries known to be statically linked / bundled

    @property
    def is_third_party(self) -> bool:
        """True when the whole file is someone else's code (runtime DLL, vendored library)."""
        return self.origin != PROJECT_ORIGIN


def version_sort_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order release strings numerically ("3.1.10" after "3.1.9"; "2018.11.22" works too).

    Written here rather than using packaging.version because some corpus versions are dates
    and PEP 440 parsing is not needed; mixed parts sort numbers before text.
    """
    parts = re.findall(r"\d+|[A-Za-z]+", version)
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in parts)


def load_release_corpus(kind: str = "pe", root: Path | None = None) -> list[CorpusFile]:
    """Read ``<root>/<kind>/labels_full.csv`` (kind "pe" or "elf"); missing files skipped."""
    base = (root or corpus_root()) / kind
    labels = base / "labels_full.csv"
    if not labels.is_file():
        raise FileNotFoundError(f"no corpus labels at {labels}; see /work/shared/corpus/README.md")
    files: list[CorpusFile] = []
    with labels.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            path = base / row["file"]
            if not path.is_file():
                continue
            files.append(
                CorpusFile(
                    path=path,
                    project=row["project"],
                    version=row["version"],
                    sha256=row["sha256"].lower(),
                    size=int(row["size"]),
                    origin=row["origin"],
                    third_party_libs=row.get("third_party_libs_known", ""),
                )
            )
    return files


def deduplicate_by_sha256(files: Iterable[CorpusFile]) -> list[CorpusFile]:
    """Keep one file per sha256: the one from the oldest release (then by path, for stability).

    Byte-identical files across releases would otherwise sit in both the knowledge base and the
    queries, and a trivially exact match would count as an attribution.
    """
    ordered = sorted(files, key=lambda f: (f.project, version_sort_key(f.version), str(f.path)))
    seen: set[str] = set()
    unique: list[CorpusFile] = []
    for corpus_file in ordered:
        if corpus_file.sha256 in seen:
            continue
        seen.add(corpus_file.sha256)
        unique.append(corpus_file)
    return unique


# --------------------------------------------------------------------------- corpus: xcomp

# Linker/C-runtime start-up code present in every build; it is not the library's code and is
# identical everywhere, so it would inflate function-search scores.
STARTUP_STUB_KEYS = frozenset(
    {
        "_init",
        "_fini",
        "crtstuff.c:deregister_tm_clones",
        "crtstuff.c:register_tm_clones",
        "crtstuff.c:__do_global_dtors_aux",
        "crtstuff.c:frame_dummy",
    }
)
# gcc clone suffixes that are fragments of a function, not a whole one (split-off cold paths,
# partial inlining); `.isra`/`.constprop` clones are whole functions and may stand for the base.
FRAGMENT_CLONE_SUFFIXES = (".cold", ".part")


@dataclass(frozen=True, slots=True)
class GroundTruthFunction:
    """One symbol of an unstripped xcomp build (functions.tsv)."""

    key: str  # "file.c:name" for local symbols, "name" for global ones; same key = same source
    base_key: str  # key with gcc clone suffixes removed
    address: int  # virtual address; identical in the stripped copy of the same build
    size: int

    @property
    def is_fragment(self) -> bool:
        return any(suffix in self.key[len(self.base_key) :] for suffix in FRAGMENT_CLONE_SUFFIXES)


@dataclass(frozen=True, slots=True)
class XcompBuild:
    project: str  # zlib, zstd, brotli
    compiler: str  # gcc, clang
    optimisation: str  # O0 .. Os
    library: Path  # unstripped .so
    functions: tuple[GroundTruthFunction, ...]

    @property
    def name(self) -> str:
        return f"{self.compiler}-{self.optimisation}"

    def representatives(self, min_size: int = 0) -> dict[str, GroundTruthFunction]:
        """One whole function per source function (base_key), start-up stubs left out.

        The symbol named exactly like its base wins; otherwise (gcc emitted only clones) the
        largest whole clone stands for it. Fragments (.cold/.part) never do.
        """
        chosen: dict[str, GroundTruthFunction] = {}
        for function in self.functions:
            if function.base_key in STARTUP_STUB_KEYS or function.is_fragment:
                continue
            if function.size < min_size:
                continue
            incumbent = chosen.get(function.base_key)
            if incumbent is None or (
                incumbent.key != incumbent.base_key
                and (function.key == function.base_key or function.size > incumbent.size)
            ):
                chosen[function.base_key] = function
        return chosen


def load_xcomp_build(build_dir: Path) -> XcompBuild:
    """Read ``<project>/<compiler>-<opt>/`` with its single ``.so`` and ``functions.tsv``."""
    libraries = sorted(build_dir.glob("*.so"))
    if len(libraries) != 1:
        raise FileNotFoundError(f"expected one .so in {build_dir}, found {len(libraries)}")
    compiler, _, optimisation = build_dir.name.partition("-")
    functions: list[GroundTruthFunction] = []
    with (build_dir / "functions.tsv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            functions.append(
                GroundTruthFunction(
                    key=row["key"],
                    base_key=row["base_key"],
                    address=int(row["addr"], 16),
                    size=int(row["size"]),
                )
            )
    return XcompBuild(build_dir.parent.name, compiler, optimisation, libraries[0], tuple(functions))


def xcomp_build_dir(project: str, build: str, root: Path | None = None) -> Path:
    return (root or corpus_root()) / "xcomp" / project / build


# --------------------------------------------------------------------------- attribution splits


@dataclass(frozen=True, slots=True)
class AttributionSplit:
    """Files to index (with their true author) and files to attribute.

    ``expected`` of a query is the project that should rank first, or None when no project in
    the knowledge base wrote the file (a whole third-party file): then a confident answer is wrong.
    """

    name: str
    knowledge_base: tuple[CorpusFile, ...]
    queries: tuple[CorpusFile, ...]

    def expected(self, query: CorpusFile) -> str | None:
        return None if query.is_third_party else query.project


def _releases_by_project(files: Sequence[CorpusFile]) -> dict[str, list[str]]:
    releases: dict[str, set[str]] = {}
    for corpus_file in files:
        releases.setdefault(corpus_file.project, set()).add(corpus_file.version)
    return {
        project: sorted(versions, key=version_sort_key) for project, versions in releases.items()
    }


def project_ingest_groups(files: Iterable[CorpusFile], source: str = "bench") -> list[Any]:
    """earmark ``IngestGroup``s of ``files``: one per project, labelled family = actor =
    project, in project order, for one ``ingest_groups`` call (as ``bench.attribution_pe``
    ingests its KB parts)."""
    from earmark.ingest import IngestGroup, LabelTemplate

    by_project: dict[str, list[str]] = {}
    for file in files:
        by_project.setdefault(file.project, []).append(str(file.path))
    return [
        IngestGroup(tuple(paths), LabelTemplate(actor=project, family=project, source=source))
        for project, paths in sorted(by_project.items())
    ]


def split_all_but_newest(files: Sequence[CorpusFile]) -> AttributionSplit:
    """Setting (a): KB = every release but the newest of each project; queries = the newest.

    Only project code takes part; projects with a single release are left out (nothing to learn).
    """
    project_files = deduplicate_by_sha256(f for f in files if not f.is_third_party)
    releases = _releases_by_project(project_files)
    kb = [
        f
        for f in project_files
        if len(releases[f.project]) > 1 and f.version != releases[f.project][-1]
    ]
    queries = [
        f
        for f in project_files
        if len(releases[f.project]) > 1 and f.version == releases[f.project][-1]
    ]
    return AttributionSplit("a: all releases but newest -> newest", tuple(kb), tuple(queries))


def split_oldest_only(files: Sequence[CorpusFile]) -> AttributionSplit:
    """Setting (b): KB = the oldest release of each project only; queries = the newest.

    The hardest drift: years of changes between what is known and what is asked.
    """
    project_files = deduplicate_by_sha256(f for f in files if not f.is_third_party)
    releases = _releases_by_project(project_files)
    kb = [
        f
        for f in project_files
        if len(releases[f.project]) > 1 and f.version == releases[f.project][0]
    ]
    queries = [
        f
        for f in project_files
        if len(releases[f.project]) > 1 and f.version == releases[f.project][-1]
    ]
    return AttributionSplit("b: oldest release only -> newest", tuple(kb), tuple(queries))


def split_third_party_queries(files: Sequence[CorpusFile]) -> AttributionSplit:
    """Setting (c): KB = all project code; queries = whole third-party files (expected: nobody).

    A project that merely shipped a runtime DLL or a vendored library did not write it; an
    engine that ranks that project first with a high score is fooled by the confounder.
    """
    unique = deduplicate_by_sha256(files)
    kb = [f for f in unique if not f.is_third_party]
    queries = [f for f in unique if f.is_third_party]
    return AttributionSplit("c: whole third-party files -> nobody", tuple(kb), tuple(queries))


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True, slots=True)
class RankOutcome:
    """Where the true item landed: ``better`` wrong items scored strictly higher, ``tied`` equal.

    Ties are resolved as a uniformly random order (the expectation is used, not one draw), so a
    scorer that gives everything the same score earns chance level, never a lucky rank 1.
    """

    better: int
    tied: int

    def expected_hit_at(self, k: int) -> float:
        """Probability that the true item is within the first k."""
        first, last = self.better + 1, self.better + self.tied + 1
        if first > k:
            return 0.0
        return (min(last, k) - first + 1) / (self.tied + 1)

    def expected_reciprocal_rank(self, cutoff: int | None = None) -> float:
        first, last = self.better + 1, self.better + self.tied + 1
        if cutoff is not None:
            last_counted = min(last, cutoff)
            if last_counted < first:
                return 0.0
        else:
            last_counted = last
        ranks = np.arange(first, last_counted + 1, dtype=np.float64)
        return float(np.sum(1.0 / ranks) / (self.tied + 1))


def rank_outcome(true_score: float, wrong_scores: Sequence[float] | np.ndarray) -> RankOutcome:
    """Compare the true item's score with the scores of every wrong candidate."""
    wrong = np.asarray(wrong_scores, dtype=np.float64)
    return RankOutcome(
        better=int(np.sum(wrong > true_score)), tied=int(np.sum(wrong == true_score))
    )


def rank_outcome_from_ranking(
    ranked: dict[str, float], truth: str, universe: Iterable[str]
) -> RankOutcome:
    """Outcome of a label ranking (e.g. families with scores); labels absent from it score 0."""
    true_score = ranked.get(truth, 0.0)
    wrong = [ranked.get(label, 0.0) for label in set(universe) | set(ranked) if label != truth]
    return rank_outcome(true_score, wrong)


def recall_at_k(outcomes: Sequence[RankOutcome], k: int = 1) -> float:
    """Mean probability that the true item is in the top k (Recall@1 = top-1 accuracy)."""
    if not outcomes:
        return float("nan")
    return float(np.mean([o.expected_hit_at(k) for o in outcomes]))


def mean_reciprocal_rank(outcomes: Sequence[RankOutcome], cutoff: int | None = None) -> float:
    """MRR; with a cutoff (MRR@10) ranks beyond it contribute 0."""
    if not outcomes:
        return float("nan")
    return float(np.mean([o.expected_reciprocal_rank(cutoff) for o in outcomes]))


def margin_true_vs_runner_up(ranked: dict[str, float], truth: str) -> float:
    """True label's score minus the best wrong label's score; negative when attribution failed."""
    true_score = ranked.get(truth, 0.0)
    wrong = [score for label, score in ranked.items() if label != truth]
    return true_score - (max(wrong) if wrong else 0.0)


def roc_auc(
    positive_scores: Sequence[float] | np.ndarray, negative_scores: Sequence[float] | np.ndarray
) -> float:
    """Area under the ROC curve = P(positive scores above negative), ties counted as one half.

    Mann-Whitney U over average ranks, in numpy so benchmarks need no scikit-learn.
    """
    positives = np.asarray(positive_scores, dtype=np.float64)
    negatives = np.asarray(negative_scores, dtype=np.float64)
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    pooled = np.concatenate([positives, negatives])
    _, inverse, counts = np.unique(pooled, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct value: ranks before it, plus the middle of its run.
    run_end = np.cumsum(counts)
    average_rank = run_end - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    positive_rank_sum = float(np.sum(ranks[: positives.size]))
    u_statistic = positive_rank_sum - positives.size * (positives.size + 1) / 2.0
    return u_statistic / (positives.size * negatives.size)


# --------------------------------------------------------------------------- time and memory


@dataclass(slots=True)
class Stopwatch:
    """Wall and CPU seconds of a block: ``with Stopwatch() as watch: ...; watch.wall``."""

    wall: float = 0.0
    cpu: float = 0.0
    _wall_start: float = field(default=0.0, repr=False)
    _cpu_start: float = field(default=0.0, repr=False)

    def __enter__(self) -> Stopwatch:
        self._wall_start = time.perf_counter()
        self._cpu_start = time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self._wall_start
        self.cpu = time.process_time() - self._cpu_start


def current_rss_bytes() -> int:
    """Resident set size now (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return int(psutil.Process().memory_info().rss)


class _Tree:
    """This process and its descendants for a sampler: listed again every TREE_LIST_SECONDS
    rather than at every sample (psutil finds children by reading every process's stat
    file: ~3 ms per sample with two workers, ~0.5 CPU s over the PE bench (a) ingest)."""

    def __init__(self) -> None:
        self._processes: list[Any] = []
        self._listed = float("-inf")

    def total(self, pss: bool) -> int:
        try:
            import psutil  # type: ignore[import-untyped]
        except ImportError:
            return current_rss_bytes()
        if time.monotonic() - self._listed >= TREE_LIST_SECONDS:
            me = psutil.Process()
            self._processes = [me, *me.children(recursive=True)]
            self._listed = time.monotonic()
        total = 0
        for process in self._processes:
            try:
                total += int(process.memory_full_info().pss if pss else process.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # ended since the listing
        return total


def process_tree_rss_bytes() -> int:
    """Proportional set size of this process plus every live descendant (worker pools), summed.

    PSS splits each page among the processes that share it, so forked workers' copy-on-write
    library pages are not counted once per process (a sum of RSS would) and the total is what
    the process tree holds at once. Without psutil, this process's RSS alone."""
    return _Tree().total(pss=True)


def lifetime_peak_rss_bytes() -> int:
    """Peak RSS of this process since it started (getrusage; Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# RSS sampling period. 20 ms catches allocations that live for a matching step (tens of ms)
# while costing well under 1% of one core.
MEMORY_SAMPLE_SECONDS = 0.02
# The tree's PSS is read when the summed RSS of the tree reaches a new high (by this much) and
# at least every TREE_PSS_SECONDS (copy-on-write turns a worker's shared pages private without
# changing any RSS). Read at every sample, it cost ~6 ms of CPU each with two ingest workers,
# 0.3 CPU s per second in the bench process, taken from the engine measured beside it.
TREE_PSS_STEP_BYTES = 1 << 20
TREE_PSS_SECONDS = 0.25
TREE_LIST_SECONDS = 0.2


@dataclass(slots=True)
class MemoryReading:
    start_bytes: int = 0
    peak_bytes: int = 0
    # Peak of process_tree_rss_bytes: this process and its worker processes together (PSS).
    tree_peak_bytes: int = 0

    @property
    def growth_bytes(self) -> int:
        """Peak above the level at the start of the block: what the block itself needed."""
        return max(0, self.peak_bytes - self.start_bytes)


@contextmanager
def watch_peak_memory(interval: float = MEMORY_SAMPLE_SECONDS) -> Iterator[MemoryReading]:
    """Sample RSS in a thread while the block runs; getrusage alone cannot give a per-phase peak.

    Two engines measured in one process each get their own reading this way.
    """
    reading = MemoryReading(start_bytes=current_rss_bytes())
    reading.peak_bytes = reading.start_bytes
    reading.tree_peak_bytes = process_tree_rss_bytes()
    stop = threading.Event()

    def sample() -> None:
        tree = _Tree()
        high, last = 0, time.monotonic()
        while not stop.wait(interval):
            reading.peak_bytes = max(reading.peak_bytes, current_rss_bytes())
            summed = tree.total(pss=False)
            if summed > high + TREE_PSS_STEP_BYTES or time.monotonic() - last >= TREE_PSS_SECONDS:
                high, last = max(high, summed), time.monotonic()
                reading.tree_peak_bytes = max(reading.tree_peak_bytes, tree.total(pss=True))

    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    sampler.start()
    try:
        yield reading
    finally:
        stop.set()
        sampler.join()
        reading.peak_bytes = max(reading.peak_bytes, current_rss_bytes())
        reading.tree_peak_bytes = max(reading.tree_peak_bytes, process_tree_rss_bytes())


@contextmanager
def unwatched_memory() -> Iterator[MemoryReading]:
    """``watch_peak_memory``'s place in a run that only times: no sampler thread, and a reading
    of zeros that must not be reported (a run with the sampler gives the memory figures)."""
    yield MemoryReading()


# --------------------------------------------------------------------------- tables


def format_cell(value: object, digits: int = 3) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], markdown: bool = True
) -> str:
    """A plain-text or GitHub-markdown table with columns padded to their widest cell."""
    cells = [[format_cell(value) for value in row] for row in rows]
    widths = [
        max([len(header)] + [len(row[i]) for row in cells]) for i, header in enumerate(headers)
    ]

    def line(values: Sequence[str]) -> str:
        padded = [value.ljust(width) for value, width in zip(values, widths, strict=True)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    separator = (
        "|" + "|".join("-" * (width + 2) for width in widths) + "|"
        if markdown
        else "  ".join("-" * width for width in widths)
    )
    return "\n".join([line(list(headers)), separator, *(line(row) for row in cells)])
