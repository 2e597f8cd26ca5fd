"""Code evidence: functions a query shares with knowledge-base samples, weighted by rarity.

Steps (docs/attribution.md, "Code evidence"):
1. look every query function up in the function index (exact hash, then MinHash LSH);
2. give each query function one identity: a match counts only when it is nearly as similar as the
   query function's best match anywhere in the KB. A zlib function that is an exact copy of the
   goodware's zlib is zlib, even if it also looks 0.53-similar to some packet-framing routine;
3. re-rank the surviving rare matches with ``function_similarity`` (references, constants,
   shape), which needs the matched sample's features and tells us the matched address;
4. discount small functions: a 16-instruction lookup loop is rarely distinctive however rare the
   index says it is in a small KB.
The result is plain ``Evidence`` (kind "code") plus the call-graph neighbourhood of the query
functions, so ``earmark.reason`` can treat adjacent matches as partly dependent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from earmark.index.function_index import (
    DEFAULT_MIN_SIMILARITY,
    DEFAULT_TOP_K,
    FunctionIndex,
)
from earmark.index.lsh import reduce_signatures
from earmark.index.similarity import function_similarity
from earmark.model.evidence import Evidence
from earmark.model.kb import SampleRecord
from earmark.model.sample import FunctionFeatures, SampleFeatures
from earmark.store.base import Store

# A rare match counts only when its index similarity is within this margin of the query
# function's best match anywhere (goodware included). 0.15 is about two standard deviations of
# the 64-slot b-bit estimate (sigma 0.063 at J = 0.5, docs/index.md): a real second copy of the
# same code is not excluded by estimate noise, a distant look-alike is.
IDENTITY_MARGIN: Final = 0.15

# Functions this large or larger count fully; smaller ones in proportion above the index's
# minimum size. A 16-instruction table-lookup loop compiles to the same bytes in unrelated
# programs (the demo corpus's charlie_verb_lookup == alpha_command_lookup), while 40+
# instructions with their own constants are a fingerprint.
SPECIFIC_INSTRUCTIONS: Final = 40

# Matched samples whose features are loaded for re-ranking, strongest first. Loading costs
# ~5 ms per sample (frozen features); past 64 samples the weakest matches are a rounding error
# in a noisy-OR already saturated by the strongest ones.
MAX_RERANKED_SAMPLES: Final = 64

# Matches below this rarity weight are not reported as evidence (they are library or runtime
# code). They still give query functions their identity (step 2 above).
MIN_EVIDENCE_WEIGHT: Final = 0.01


@dataclass(frozen=True, slots=True)
class CodeEvidence:
    """Code evidence for one query, with the context ``earmark.reason`` needs."""

    evidence: tuple[Evidence, ...]
    # query function address -> addresses of its callers and callees (dependency of evidence)
    neighbours: Mapping[int, frozenset[int]]
    # query functions large enough to be looked up and not identified as common/library code:
    # how many code evidence items the query could have produced (for coverage)
    distinctive_functions: int
    library_functions: int  # query functions whose best match is common code (weight ~ 0)
    looked_up_functions: int


def specificity(function: FunctionFeatures, min_instructions: int) -> float:
    """How distinctive a function of this size is, 0..1 (see ``SPECIFIC_INSTRUCTIONS``)."""
    span = max(SPECIFIC_INSTRUCTIONS - min_instructions, 1)
    return float(np.clip((function.instruction_count - min_instructions + 1) / span, 0.0, 1.0))


def call_graph_neighbours(features: SampleFeatures) -> dict[int, frozenset[int]]:
    """Callers and callees of every function (addresses inside the sample)."""
    known = {function.address for function in features.functions}
    neighbours: dict[int, set[int]] = defaultdict(set)
    for function in features.functions:
        for callee in function.calls:
            if callee in known and callee != function.address:
                neighbours[function.address].add(callee)
                neighbours[callee].add(function.address)
    return {address: frozenset(others) for address, others in neighbours.items()}


@dataclass(frozen=True, slots=True)
class _Candidate:
    query: int  # position in features.functions
    row: int
    sample_id: int
    index_similarity: float
    weight: float


def _locate_function(
    index: FunctionIndex, row: int, functions: Sequence[FunctionFeatures]
) -> FunctionFeatures | None:
    """The stored sample's function behind an index row: same exact hash and b-bit signature.

    The index keeps function ids, not addresses; matching on its own stored values finds the
    function in the sample's frozen features without another store query.
    """
    exact_hash = int(index.exact_hash[row])
    same_hash = [f for f in functions if f.exact_hash == exact_hash and len(f.minhash) > 0]
    if not same_hash:
        return None
    signatures = reduce_signatures(np.array([f.minhash for f in same_hash], dtype=np.uint32))
    equal = np.flatnonzero((signatures == index.signatures[row]).all(axis=1))
    chosen = [same_hash[int(i)] for i in equal] or same_hash
    return min(chosen, key=lambda function: function.address)


def _labels_of(record: SampleRecord) -> list[tuple[str | None, str | None]]:
    """Distinct (actor, family) claims of a non-goodware sample, sorted for stable output."""
    claims = {(label.actor, label.family) for label in record.labels if label.actor or label.family}
    return sorted(claims, key=lambda claim: (claim[0] or "", claim[1] or ""))


def find_code_evidence(
    store: Store,
    index: FunctionIndex,
    samples: Mapping[int, SampleRecord],
    features: SampleFeatures,
    *,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    top_k: int = DEFAULT_TOP_K,
) -> CodeEvidence:
    """Shared rare code between ``features`` and the knowledge base, as ``Evidence``."""
    if index.rarity is None:
        raise ValueError("code evidence needs an index built with rarity statistics")
    functions = features.functions
    matches = index.query(functions, min_similarity=min_similarity, top_k=top_k)
    weights = index.rarity.weights(matches.row) if len(matches) else np.zeros(0, np.float32)
    best_similarity: dict[int, float] = {}
    best_common: dict[int, float] = {}
    for position in range(len(matches)):
        query = int(matches.query[position])
        similarity = float(matches.similarity[position])
        best_similarity[query] = max(best_similarity.get(query, 0.0), similarity)
        if float(weights[position]) < MIN_EVIDENCE_WEIGHT:
            best_common[query] = max(best_common.get(query, 0.0), similarity)

    candidates: list[_Candidate] = []
    for position in range(len(matches)):
        query = int(matches.query[position])
        similarity = float(matches.similarity[position])
        weight = float(weights[position])
        record = samples.get(int(matches.sample_id[position]))
        if weight < MIN_EVIDENCE_WEIGHT or record is None or record.goodware:
            continue
        if similarity < best_similarity[query] - IDENTITY_MARGIN:
            continue
        candidates.append(
            _Candidate(query, int(matches.row[position]), record.sample_id, similarity, weight)
        )

    strength: dict[int, float] = defaultdict(float)
    for candidate in candidates:
        strength[candidate.sample_id] += candidate.weight * candidate.index_similarity
    # Ties broken by sha256 so the result never depends on ingest order (sample ids).
    ranked_samples = sorted(strength, key=lambda s: (-strength[s], samples[s].sha256))
    loaded = {
        sample_id: store.load_features(samples[sample_id].sha256).functions
        for sample_id in ranked_samples[:MAX_RERANKED_SAMPLES]
    }

    evidence: list[Evidence] = []
    for candidate in candidates:
        stored_functions = loaded.get(candidate.sample_id)
        if stored_functions is None:
            continue
        matched = _locate_function(index, candidate.row, stored_functions)
        if matched is None:
            continue
        query_function = functions[candidate.query]
        rarity = index.rarity.explain(candidate.row)
        size_factor = specificity(query_function, index.min_instructions)
        reason = rarity.reason
        if size_factor < 1.0:
            reason += (
                f"; {query_function.instruction_count} instructions: small code is less "
                f"distinctive, counted x{size_factor:.2f}"
            )
        record = samples[candidate.sample_id]
        for actor, family in _labels_of(record):
            evidence.append(
                Evidence(
                    kind="code",
                    actor=actor,
                    family=family,
                    similarity=round(function_similarity(query_function, matched), 4),
                    weight=round(candidate.weight * size_factor, 4),
                    reason=reason,
                    query_address=query_function.address,
                    query_size=query_function.size,
                    match_sha256=record.sha256,
                    match_address=matched.address,
                    match_size=matched.size,
                )
            )
    evidence.sort(
        key=lambda item: (
            -(item.similarity * item.weight),
            item.query_address or 0,
            item.match_sha256 or "",
            item.match_address or 0,
            item.actor or "",
            item.family or "",
        )
    )
    looked_up = len(functions) - matches.skipped_small
    library = sum(
        1 for query, common in best_common.items() if common >= best_similarity[query] - 1e-6
    )
    return CodeEvidence(
        evidence=tuple(evidence),
        neighbours=call_graph_neighbours(features),
        distinctive_functions=max(looked_up - library, 0),
        library_functions=library,
        looked_up_functions=looked_up,
    )
