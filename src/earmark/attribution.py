"""Attribution of a sample or an incident: evidence, hypotheses, case document.

The library API behind ``earmark attribute``, ``compare`` and ``demo``::

    with open_knowledge_base("kb.db") as kb:
        case = attribute_sample(kb, load_query(kb, "sample.exe"))
    case.verdict.summary, case.hypotheses[0].actor, case.evidence[0].match_address

The function index is cached next to a SQLite file as ``<db>.index/`` keyed by the store's
revision (rebuilt after every ingest); for in-memory or server databases it is built in memory.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import date
from functools import partial
from pathlib import Path
from typing import Final

from earmark.correlate.artefacts import artefact_stats_for, find_artefact_evidence
from earmark.correlate.code import (
    MAX_FEATURE_STAGE_SAMPLES,
    build_feature_candidates,
    find_code_evidence,
)
from earmark.demo_build import DemoBinary, Target, build_demo_corpus
from earmark.errors import UsageError
from earmark.extract import analyze_file
from earmark.freeze import load_features
from earmark.index import DEFAULT_TOP_K, MIN_INSTRUCTIONS, FunctionIndex, IndexCacheError
from earmark.index.artefact_cache import load_artefact_stats, save_artefact_stats
from earmark.index.artefacts import ArtefactStats, ArtefactStatsBuilder
from earmark.index.feature_cache import load_feature_candidates, save_feature_candidates
from earmark.index.feature_candidates import FeatureCandidateIndex
from earmark.index.similarity import compare_functions
from earmark.ingest import IngestSummary, LabelTemplate, ingest_paths
from earmark.intel import indicators_from_strings
from earmark.intel.warninglists import default_warninglist_tables
from earmark.kb_build import build_pass, stored_rows
from earmark.kb_rows import BuildRows, RowCache, RowSpool
from earmark.memory import cyclic_collector_paused, return_free_memory
from earmark.model.evidence import Evidence
from earmark.model.intel import Indicator
from earmark.model.kb import SampleRecord
from earmark.model.sample import SampleFeatures
from earmark.reason.hypotheses import (
    code_neighbours,
    decide_verdict,
    is_shared_library,
    likelihood_words,
    rank_hypotheses,
)
from earmark.report.document import (
    CaseReport,
    CompareReport,
    EvidenceItem,
    FunctionCandidate,
    FunctionCandidates,
    HypothesisItem,
    KnowledgeBaseInfo,
    QueryInfo,
    SharedFunction,
    VerdictItem,
)
from earmark.store import Store, open_store, resolve_database_url

__all__ = [
    "DEFAULT_TOP_HYPOTHESES",
    "DemoCase",
    "KnowledgeBase",
    "attribute_indicators",
    "attribute_sample",
    "compare_samples",
    "load_query",
    "open_knowledge_base",
    "run_demo",
]

# Hypotheses kept in a case by default (`earmark attribute --top N`).
DEFAULT_TOP_HYPOTHESES: Final = 5
# Evidence items kept in a case document: the strongest first. A KB of many versions of one
# family yields one item per (query function, matched sample); 200 keeps every distinct query
# function of the demo and typical cases while bounding a report against a huge KB.
MAX_EVIDENCE_ITEMS: Final = 200
# Frozen features files (earmark.freeze), accepted as queries instead of a sample.
FEATURES_SUFFIX: Final = ".emf"
_SHA256: Final = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass
class KnowledgeBase:
    """An open store plus its function index, built or loaded on first use."""

    store: Store
    index_path: Path | None  # None: keep the index in memory only
    _index: FunctionIndex | None = None
    _samples: dict[int, SampleRecord] = field(default_factory=dict)
    # The second candidate stage of the store revision: built by ``prepare`` (at ingest) and
    # mapped from ``<db>.features``, or built once per process for a KB without a cache path;
    # building it decodes every stored sample, so no query may pay it.
    _feature_candidates: tuple[int, FeatureCandidateIndex | None] | None = None
    _artefacts: ArtefactStats | None = None  # artefact pillar statistics, cached as <db>.artefacts
    # Build rows of samples ingested through ``row_spool``: beside a SQLite KB its row cache.
    _spool: BuildRows | None = None

    def artefact_stats(self) -> ArtefactStats:
        index = self.index()
        if self._artefacts is None or self._artefacts.revision != index.revision:
            self._artefacts = None  # a stale revision's: not kept alive during the build
            cache = self._artefact_cache_path()
            self._artefacts = artefact_stats_for(self.store, self._samples, index.revision, cache)
        return self._artefacts

    def index(self) -> FunctionIndex:
        revision = self.store.revision()
        if self._index is not None and self._index.revision == revision:
            return self._index
        # Nothing of a stale revision (index, stage, statistics) is held while the new index
        # is loaded or built (PE bench: (c)'s build after (a)'s queries, peak 259 -> 226 MB).
        self._index = None
        self._feature_candidates = None
        self._artefacts = None
        return_free_memory()
        self._samples = dict(self.store.sample_labels())
        index: FunctionIndex | None = None
        if self.index_path is not None:
            try:
                index = FunctionIndex.load(self.index_path, revision)
            except IndexCacheError:
                index = None  # damaged cache: rebuilt below, never trusted
        if index is None or index.rarity is None:
            index = FunctionIndex.build(self.store.load_function_table(), revision, self._samples)
            if self.index_path is not None:
                index.save(self.index_path)
        self._index = index
        return index

    def row_spool(self) -> BuildRows:
        """Where ``ingest_groups(..., rows=...)`` leaves the build rows of the samples it
        stores: beside a SQLite KB, its row cache ``<db>.rows/``, which every later build
        reads and adds the rows of the samples it decodes to; otherwise a spool for the next
        ``prepare`` of this object (emptied by it)."""
        if self._spool is None:
            path = self._row_cache_path()
            limit = MAX_FEATURE_STAGE_SAMPLES
            self._spool = (
                RowSpool(MIN_INSTRUCTIONS, max_samples=limit)
                if path is None
                else RowCache(path, MIN_INSTRUCTIONS, max_samples=limit)
            )
        return self._spool

    def samples(self) -> dict[int, SampleRecord]:
        self.index()
        return self._samples

    def prepare(self, jobs: int = 1) -> None:
        """Build (and cache beside a SQLite KB) every index a query reads: the function index,
        the feature candidate stage, the artefact statistics, and the per-installation
        warninglist table. ``earmark ingest`` calls it after writing, so the first query after
        an ingest does not pay the build (seconds: it decodes every stored sample's features,
        once for the feature stage and the artefact statistics together). ``jobs`` > 1
        decodes the samples in that many processes (the same result)."""
        if jobs < 1:
            raise UsageError(f"jobs must be at least 1, not {jobs}")
        try:
            with build_pass():
                self._build_stage_and_artefacts(self.index(), jobs)
                self.feature_candidates()
                self.artefact_stats()
        finally:
            if isinstance(self._spool, RowSpool):
                self._spool.clear()
        # Compiled once per installation (seconds), mapped by every later process.
        default_warninglist_tables()

    def _build_stage_and_artefacts(self, index: FunctionIndex, jobs: int) -> None:
        """When neither the feature stage nor the artefact statistics of this revision are
        at hand, both are built from one decoding pass over the stored samples (PE bench KB:
        prepare 9.1 -> 5.6 CPU s against decoding every sample once per build;
        docs/benchmarks.md, "Query latency and memory")."""
        revision, min_instructions = index.revision, index.min_instructions
        if (
            len(self._samples) > MAX_FEATURE_STAGE_SAMPLES
            or (self._feature_candidates is not None and self._feature_candidates[0] == revision)
            or (self._artefacts is not None and self._artefacts.revision == revision)
        ):
            return
        cached = self._cached_feature_candidates(revision, min_instructions)
        if cached is not None:
            self._feature_candidates = (revision, cached)
            return
        # A stale revision's stage (mapped pages a query touched count as resident) and
        # statistics are dropped before the build, not held alongside the new ones.
        self._feature_candidates = None
        self._artefacts = None
        cache = self._artefact_cache_path()
        if cache is not None:
            try:
                self._artefacts = load_artefact_stats(cache, revision)
                return
            except IndexCacheError:
                pass  # missing, stale or damaged: built below, never trusted
        artefacts = ArtefactStatsBuilder()
        at_hand = self._spool if self.index_path is None else self.row_spool()
        rows = stored_rows(self.store, self._samples, min_instructions, artefacts, jobs, at_hand)
        kept = self._build_and_keep_feature_candidates(  # the pass feeds the artefacts too
            lambda: build_feature_candidates(self.store, self._samples, min_instructions, rows),
            index,
        )
        self._feature_candidates = (revision, kept)
        stats = artefacts.finish(revision)
        if cache is not None:
            save_artefact_stats(stats, cache)
        self._artefacts = stats

    def feature_candidates(self) -> FeatureCandidateIndex | None:
        """The optimisation-robust candidate stage (None past its sample limit)."""
        index = self.index()
        if self._feature_candidates is None or self._feature_candidates[0] != index.revision:
            self._feature_candidates = None  # a stale revision's: not kept during the build
            built = self._cached_feature_candidates(index.revision, index.min_instructions)
            if built is None:
                build = partial(build_feature_candidates, self.store, self._samples)
                built = self._build_and_keep_feature_candidates(
                    lambda: build(index.min_instructions), index
                )
            self._feature_candidates = (index.revision, built)
        return self._feature_candidates[1]

    def _build_and_keep_feature_candidates(
        self, build: Callable[[], FeatureCandidateIndex | None], index: FunctionIndex
    ) -> FeatureCandidateIndex | None:
        """A stage built, saved beside a SQLite KB and then served from the mapped files (pages
        shared with the page cache). The built arrays are freed before the saved ones are mapped
        and checked, never in memory together (PE bench KB: a 10 MB higher peak when they were)."""
        built, cache = build(), self._feature_cache_path()
        if built is None or cache is None:
            return built
        if not save_feature_candidates(built, cache, index.revision, index.min_instructions):
            return built
        del built  # the only reference
        return_free_memory()
        mapped = self._cached_feature_candidates(index.revision, index.min_instructions)
        if mapped is None:  # just written, yet unreadable: built again, kept in memory
            return build_feature_candidates(self.store, self._samples, index.min_instructions)
        # The load checks read whole columns (~12 MB of pages on the PE bench KB); a query
        # faults in only what it reads.
        mapped.release_pages()
        return mapped

    def _artefact_cache_path(self) -> Path | None:
        return None if self.index_path is None else self.index_path.with_suffix(".artefacts")

    def _row_cache_path(self) -> Path | None:
        """``<db>.rows`` beside ``<db>.index`` (``kb_rows.RowCache``)."""
        if self.index_path is None:
            return None
        return self.index_path.with_name(self.index_path.name.removesuffix(".index") + ".rows")

    def _feature_cache_path(self) -> Path | None:
        """``<db>.features`` beside ``<db>.index`` (its own directory: saving the function
        index replaces ``<db>.index`` wholesale)."""
        if self.index_path is None:
            return None
        return self.index_path.with_name(self.index_path.name.removesuffix(".index") + ".features")

    def _cached_feature_candidates(
        self, revision: int, min_instructions: int
    ) -> FeatureCandidateIndex | None:
        cache = self._feature_cache_path()
        if cache is None or len(self._samples) > MAX_FEATURE_STAGE_SAMPLES:
            return None
        try:
            return load_feature_candidates(cache, revision, min_instructions)
        except IndexCacheError:
            return None  # damaged cache: rebuilt by the caller, never trusted


def index_cache_path(database: str | None) -> Path | None:
    """``<db file>.index`` for a SQLite file, None for memory or server databases."""
    url = resolve_database_url(database)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    db_path = Path(url.database)
    return db_path.with_name(db_path.name + ".index")


@contextmanager
def open_knowledge_base(database: str | None = None) -> Iterator[KnowledgeBase]:
    """The store at ``database`` (path, URL, None for $EARMARK_DB/./earmark.db) and its index."""
    with open_store(database) as store:
        yield KnowledgeBase(store, index_cache_path(database))


def load_query(kb: KnowledgeBase, sample: str | Path) -> SampleFeatures:
    """A query given as a file, a ``.emf`` features file, or the sha256 of a stored sample."""
    path = Path(sample)
    if path.is_file():
        return load_features(path) if path.suffix == FEATURES_SUFFIX else analyze_file(path)
    text = str(sample)
    if _SHA256.match(text):
        if not kb.store.has_sample(text.lower()):
            raise UsageError(f"no sample with sha256 {text} in the knowledge base")
        return kb.store.load_features(text.lower())
    raise UsageError(f"{text}: no such file, and not a sha256 of a stored sample")


def _infrastructure_evidence(
    kb: KnowledgeBase,
    indicators: Sequence[Indicator],
    at: date | None,
    exclude_sha256: str | None = None,
) -> list[Evidence]:
    if not indicators:
        return []
    # Imported on first use: it loads the intel importers, which code-only work does not need.
    from earmark.intel_ops import infrastructure_evidence

    return infrastructure_evidence(kb.store, indicators, at, exclude_sha256=exclude_sha256)


def _sample_indicators(features: SampleFeatures) -> list[Indicator]:
    # ``intel_ops.indicators_for_sample`` without importing intel_ops: a query without
    # indicators never loads the intel importers.
    return indicators_from_strings(features.strings)


def read_ioc_file(path: Path) -> tuple[list[Indicator], date | None]:
    """Indicators of an incident from an IOC file (STIX, MISP, CSV/TXT, report text)."""
    from earmark.intel_ops import indicators_from_ioc_file

    return indicators_from_ioc_file(path)


def _kb_info(kb: KnowledgeBase) -> KnowledgeBaseInfo:
    index = kb.index()
    stats = kb.store.stats()
    return KnowledgeBaseInfo(
        revision=index.revision,
        samples=stats.samples,
        functions=stats.functions,
        indexed_functions=len(index),
    )


def _build_case(
    kb: KnowledgeBase,
    sha256: str | None,
    query: QueryInfo,
    evidence: list[Evidence],
    neighbours: dict[int, frozenset[int]],
    distinctive: int | None,
    top: int,
) -> CaseReport:
    # Code items are already strongest first; other kinds join by contribution, stable. A
    # shared-library item (weight 0, it names nobody) leads: it explains every capped score.
    evidence = sorted(
        evidence, key=lambda item: (not is_shared_library(item), -(item.similarity * item.weight))
    )
    # Hypotheses are ranked on all evidence (coverage needs every matched function); only the
    # document's list is cut, keeping every item a shown hypothesis names.
    hypotheses = rank_hypotheses(evidence, code_neighbours(neighbours), distinctive)
    verdict = decide_verdict(hypotheses, next(filter(is_shared_library, evidence), None))
    hypotheses = hypotheses[:top]
    kept = sorted(
        set(range(min(len(evidence), MAX_EVIDENCE_ITEMS)))
        | {position for h in hypotheses for position in h.strongest}
    )
    new_position = {old: new for new, old in enumerate(kept)}
    hypotheses = [
        replace(h, strongest=tuple(new_position[p] for p in h.strongest)) for h in hypotheses
    ]
    evidence = [evidence[position] for position in kept]
    return CaseReport(
        sha256=sha256,
        query=query,
        verdict=VerdictItem.from_verdict(verdict),
        hypotheses=[
            HypothesisItem.from_hypothesis(h, likelihood_words(h.score)) for h in hypotheses
        ],
        evidence=[EvidenceItem.from_evidence(item) for item in evidence],
        knowledge_base=_kb_info(kb),
    )


# The whole attribution allocates evidence, indicators and the case document without reference
# cycles; pausing the collector for all of it (not only code evidence) took the collections left
# inside attribution from ~12 ms to 0 per PE bench query.
@cyclic_collector_paused()
def attribute_sample(
    kb: KnowledgeBase,
    features: SampleFeatures,
    *,
    top: int = DEFAULT_TOP_HYPOTHESES,
    name: str | None = None,
    extra_indicators: Sequence[Indicator] = (),
    at: date | None = None,
    artefacts: bool = True,
) -> CaseReport:
    """Code, artefact (``artefacts=False``: left out) and, when intel is available,
    infrastructure evidence fused into a case."""
    if top < 1:
        raise UsageError(f"--top must be at least 1, not {top}")
    stage = kb.feature_candidates()
    code = find_code_evidence(
        kb.store, kb.index(), kb.samples(), features, top_k=DEFAULT_TOP_K, feature_index=stage
    )
    if stage is not None:
        stage.release_pages()  # the evidence holds copies of the rows it read
    indicators = [*_sample_indicators(features), *extra_indicators]
    infrastructure = _infrastructure_evidence(kb, indicators, at, features.sha256)
    evidence = [*code.evidence, *infrastructure]
    if artefacts:
        found = find_artefact_evidence(kb.artefact_stats(), kb.samples(), features)
        evidence += [*found.evidence, *filter(None, [found.shared_library])]
    query = QueryInfo(
        name=name or features.sha256,
        format=features.format,
        arch=features.arch,
        function_count=len(features.functions),
        looked_up_functions=code.looked_up_functions,
        library_functions=code.library_functions,
        distinctive_functions=code.distinctive_functions,
        indicator_count=len(indicators),
    )
    return _build_case(
        kb, features.sha256, query, evidence, dict(code.neighbours), code.distinctive_functions, top
    )


def attribute_indicators(
    kb: KnowledgeBase,
    indicators: Sequence[Indicator],
    *,
    at: date | None = None,
    name: str = "incident",
    top: int = DEFAULT_TOP_HYPOTHESES,
) -> CaseReport:
    """An incident without a sample: infrastructure evidence only (``sha256`` is null)."""
    if top < 1:
        raise UsageError(f"--top must be at least 1, not {top}")
    evidence = _infrastructure_evidence(kb, indicators, at)
    query = QueryInfo(name=name, indicator_count=len(indicators))
    return _build_case(kb, None, query, evidence, {}, None, top)


def compare_samples(a: SampleFeatures, b: SampleFeatures, top_k: int = 5) -> CompareReport:
    """Every function of A with its ``top_k`` best candidates in B, and one-to-one shared pairs
    (similarity, then call-graph propagation) with their normalised disassembly."""
    if top_k < 1:
        raise UsageError(f"--top must be at least 1, not {top_k}")
    comparison = compare_functions(a, b, top_k)
    by_address_a = {f.address: f for f in a.functions}
    by_address_b = {f.address: f for f in b.functions}
    functions = [
        FunctionCandidates(
            address=function.address,
            candidates=[
                FunctionCandidate(address=address, similarity=round(similarity, 4))
                for address, similarity in comparison.candidates[position]
            ],
        )
        for position, function in enumerate(a.functions)
    ]
    shared = [
        SharedFunction(
            address_a=pair.address_a,
            address_b=pair.address_b,
            similarity=round(pair.similarity, 4),
            size_a=by_address_a[pair.address_a].size,
            size_b=by_address_b[pair.address_b].size,
            matched_by=pair.matched_by,
            disassembly_a=list(by_address_a[pair.address_a].normalized),
            disassembly_b=list(by_address_b[pair.address_b].normalized),
        )
        for pair in comparison.pairs
    ]
    return CompareReport(sha256_a=a.sha256, sha256_b=b.sha256, functions=functions, shared=shared)


@dataclass(frozen=True, slots=True)
class DemoCase:
    binary: DemoBinary
    expected: str  # what docs/demo-corpus.md says a correct attribution reads
    case: CaseReport


_DEMO_EXPECTED: Final = {
    "alpha-v3": "Group A (alpha)",
    "bravo-v2": "Group B (bravo)",
    "charlie": "no known actor; shares rare code with Group A",
    "delta": "no known actor",
}


def run_demo(
    work_dir: Path | None = None,
    *,
    compiler: str = "gcc",
    target: Target = "elf64",
    opt: str = "O2",
    jobs: int = 1,
    on_ingest: Callable[[IngestSummary], None] | None = None,
) -> list[DemoCase]:
    """Build the demo corpus, ingest its KB part, attribute the held-back queries. Offline."""
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="earmark-demo-") as temporary:
            return run_demo(
                Path(temporary), compiler=compiler, target=target, opt=opt, jobs=jobs,
                on_ingest=on_ingest,
            )
    corpus = build_demo_corpus(
        work_dir / "build", compiler=compiler, opt_levels=(opt,), target=target
    )
    database = str(work_dir / "demo-kb.db")
    cases = []
    with open_knowledge_base(database) as kb:
        for binary in corpus.select(role="kb"):
            template = LabelTemplate(actor=binary.actor, family=binary.family, source="demo")
            summary = ingest_paths(kb.store, [binary.path], template, jobs=jobs)
            if on_ingest is not None:
                on_ingest(summary)
        for binary in corpus.select(role="goodware"):
            summary = ingest_paths(kb.store, [binary.path], LabelTemplate(goodware=True))
            if on_ingest is not None:
                on_ingest(summary)
        for name in _DEMO_EXPECTED:
            binary = corpus.binary(name, opt)
            case = attribute_sample(kb, analyze_file(binary.path), name=binary.name)
            cases.append(DemoCase(binary, _DEMO_EXPECTED[name], case))
    return cases
