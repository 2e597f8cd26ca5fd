"""Attribution of a sample or an incident: evidence, hypotheses, case document.

The library API behind ``earmark attribute``, ``compare`` and ``demo``::

    with open_knowledge_base("kb.db") as kb:
        case = attribute_sample(kb, load_query(kb, "sample.exe"))
    case.verdict.summary, case.hypotheses[0].actor, case.evidence[0].match_address

The knowledge base (``KnowledgeBase``, ``open_knowledge_base``: the store and what is built from
it, cached beside a SQLite file) is ``earmark.knowledge_base``'s, named here too.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Final

from earmark.correlate.artefacts import find_artefact_evidence
from earmark.correlate.code import (
    find_code_evidence,
)
from earmark.demo_build import DemoBinary, Target, build_demo_corpus
from earmark.errors import UsageError
from earmark.extract import analyze_file
from earmark.freeze import load_features
from earmark.index import DEFAULT_TOP_K
from earmark.index.similarity import compare_functions
from earmark.ingest import IngestSummary, LabelTemplate, ingest_paths
from earmark.intel import indicators_from_strings
from earmark.knowledge_base import KnowledgeBase, index_cache_path, open_knowledge_base
from earmark.memory import cyclic_collector_paused
from earmark.model.evidence import Evidence
from earmark.model.intel import Indicator
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

__all__ = [
    "DEFAULT_TOP_HYPOTHESES",
    "DemoCase",
    "KnowledgeBase",
    "attribute_indicators",
    "attribute_sample",
    "compare_samples",
    "index_cache_path",
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
    case = _build_case(
        kb, features.sha256, query, evidence, dict(code.neighbours), code.distinctive_functions, top
    )
    return case.model_copy(update={"warnings": _rarity_warnings(kb)})


def _rarity_warnings(kb: KnowledgeBase) -> list[str]:
    """What a reader of a sample's case must know about the KB it was weighed against.

    Rarity counts the attribution groups that hold a function, and with one group in the KB
    (``RarityTable.total_owners``) every match is "unique to one group", compiler runtime and
    library code included: lz4's ``_block.pyd`` against a KB of mmh3 alone gave "mmh3 (almost
    certain, score 1.00)" on MSVC runtime functions. Scores are left as they are (a new
    version of that group's program is the same case); the case says why they cannot be
    trusted."""
    rarity = kb.index().rarity
    if rarity is None or rarity.total_owners > 1:
        return []
    groups = rarity.total_owners
    goodware = sum(1 for record in kb.samples().values() if record.goodware)
    return [
        f"the knowledge base holds {groups} attribution group{'' if groups == 1 else 's'} and "
        f"{goodware} goodware sample{'' if goodware == 1 else 's'}: code found in one group "
        "alone counts as rare even when it is compiler runtime or library code; ingest more "
        "groups, and the runtimes and libraries as --goodware, before relying on this verdict"
    ]


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
