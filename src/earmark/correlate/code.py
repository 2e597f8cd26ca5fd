"""Code evidence: functions a query shares with knowledge-base samples, weighted by rarity.

Steps (docs/attribution.md, "Code evidence"):
1. look every query function up in the function index (exact hash, then MinHash LSH);
2. give each query function one identity: a match counts only when it is nearly as similar as the
   query function's best match anywhere in the KB. A zlib function that is an exact copy of the
   goodware's zlib is zlib, even if it also looks 0.53-similar to some packet-framing routine;
3. re-rank the surviving rare matches with ``function_similarity`` (references, constants,
   shape), which needs the matched sample's features and tells us the matched address;
4. discount small functions: a 16-instruction lookup loop is rarely distinctive however rare the
   index says it is in a small KB;
5. query functions the LSH stage found nothing for (typically: the KB holds the code built at
   another -O level) are looked up in the second candidate stage, an inverted index of rare
   optimisation-robust features (``index.feature_candidates``), verified by
   ``function_similarity``; the same identity and rarity rules apply to its matches.
Steps 2-4 run over all of a query's matches at once in ``correlate.code_rerank``, which also
holds their settings. The result is plain ``Evidence`` (kind "code") plus the call-graph
neighbourhood of the query functions, so ``earmark.reason`` can treat adjacent matches as
partly dependent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from earmark.correlate.code_rerank import (
    IDENTITY_MARGIN,
    MIN_EVIDENCE_WEIGHT,
    CodeEvidenceWriter,
    best_per_query,
    rerank,
    select_candidates,
)
from earmark.index.feature_candidates import (
    FeatureCandidateIndex,
    FeatureMatch,
    StageRows,
    StoredFunctionIds,
)
from earmark.index.function_index import (
    DEFAULT_MIN_SIMILARITY,
    DEFAULT_TOP_K,
    FunctionIndex,
)
from earmark.index.packed import SCAN_CHUNK
from earmark.memory import cyclic_collector_paused
from earmark.model.evidence import Evidence
from earmark.model.kb import SampleRecord
from earmark.model.sample import FunctionFeatures, SampleFeatures
from earmark.store.base import Store

# The feature stage is built once per store revision by ``KnowledgeBase.prepare`` (which
# ``earmark ingest`` runs) from one decoding pass over every KB sample, shared with the
# artefact statistics; beside a SQLite KB it is saved as ``<db>.features/`` and queries map
# it, while an in-memory or server KB builds it once per process. The build is not
# incremental and holds its columns in memory until saved: on the PE bench KB (124 samples,
# 35k stage functions) the pass takes ~30 ms of CPU per sample and the columns ~0.9 KB per
# function, so 2,000 samples of that kind mean ~1 minute and ~0.5 GB at every ingest. Past
# this many samples the stage is not built (no cross-optimisation candidates; re-ranking
# decodes the matched samples instead).
MAX_FEATURE_STAGE_SAMPLES: Final = 2000


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


def stored_samples(
    store: Store, samples: Mapping[int, SampleRecord]
) -> Iterator[tuple[SampleRecord, SampleFeatures]]:
    """Every KB sample with its decoded features, by sha256 (the order every KB-wide build
    uses, so results never depend on ingest order). Decoded one at a time: a consumer that
    drops each sample before asking for the next holds one decoded sample."""
    for record in sorted(samples.values(), key=lambda record: record.sha256):
        yield record, store.load_features(record.sha256)


def _functions_of(
    decoded: Iterable[tuple[SampleRecord, SampleFeatures]],
) -> Iterator[tuple[int, Sequence[FunctionFeatures]]]:
    for record, features in decoded:
        functions = features.functions
        del features  # only the functions are passed on, and only until the next sample
        yield record.sample_id, functions
        del functions


def build_feature_candidates(
    store: Store,
    samples: Mapping[int, SampleRecord],
    min_instructions: int,
    rows: Iterable[tuple[int, StageRows]] | None = None,
) -> FeatureCandidateIndex | None:
    """The second candidate stage over every KB sample, or None past MAX_FEATURE_STAGE_SAMPLES.

    ``rows`` are the samples' (sample id, stage rows) in ``stored_samples``' order from a pass
    that also feeds other statistics (``KnowledgeBase.prepare``: ``kb_build.stored_rows``,
    the artefact statistics too), so the stored samples are decoded once for both; they are
    not consumed when the stage is skipped. Without them the samples are decoded here."""
    if len(samples) > MAX_FEATURE_STAGE_SAMPLES:
        return None
    function_id, sample_id, address = store.load_function_ids()  # not the MinHash rows
    function_ids = StoredFunctionIds(sample_id, address, function_id)  # sorted copies
    del function_id, sample_id, address
    if rows is None:
        decoded = _functions_of(stored_samples(store, samples))
        return FeatureCandidateIndex.build(decoded, min_instructions, function_ids)
    return FeatureCandidateIndex.build_from_rows(rows, function_ids)


def _rows_of_function_ids(index: FunctionIndex, function_ids: Sequence[int]) -> list[int | None]:
    """The index row of each store function id (None: not indexed or unknown, i.e. -1; the
    lowest row if an id were indexed twice).

    One pass over the id column in steps of ``SCAN_CHUNK`` with ``np.isin`` against the few
    wanted ids: sorting the whole column for every query cost ~1 ms on the PE bench KB (38.9k
    rows) and would need two 80 MB arrays at 10^7 rows."""
    wanted = {function_id for function_id in function_ids if function_id >= 0}
    rows: dict[int, int] = {}
    if wanted:
        targets = np.fromiter(wanted, dtype=np.int64, count=len(wanted))
        for start in range(0, len(index), SCAN_CHUNK):
            ids = index.function_id[start : start + SCAN_CHUNK]
            hits = np.flatnonzero(np.isin(ids, targets))
            for function_id, row in zip(ids[hits].tolist(), (hits + start).tolist(), strict=True):
                rows.setdefault(function_id, row)
    return [rows.get(function_id) for function_id in function_ids]


def _feature_stage_matches(
    store: Store,
    index: FunctionIndex,
    samples: Mapping[int, SampleRecord],
    functions: Sequence[FunctionFeatures],
    unmatched: Sequence[int],
    feature_index: FeatureCandidateIndex | None,
) -> tuple[list[tuple[FeatureMatch, int]], set[int]]:
    """Feature-stage matches of the ``unmatched`` query functions with their index rows, and
    the query positions whose best feature match is common or goodware code (library)."""
    if not unmatched:
        return [], set()
    if feature_index is None:
        feature_index = build_feature_candidates(store, samples, index.min_instructions)
        if feature_index is None:
            return [], set()
    subset = [functions[position] for position in unmatched]
    found = feature_index.find(subset, index.min_instructions)
    if not found:
        return [], set()
    # Index row of each matched KB function, by its store function id.
    rows = _rows_of_function_ids(index, [match.function_id for match in found])
    located: list[tuple[FeatureMatch, int]] = []
    for match, row in zip(found, rows, strict=True):
        if row is not None:
            query = unmatched[match.query]
            located.append(
                (
                    FeatureMatch(
                        query,
                        match.sample_id,
                        match.function,
                        match.shared_keys,
                        match.similarity,
                        match.function_id,
                    ),
                    row,
                )
            )
    assert index.rarity is not None
    weights = index.rarity.weights(np.array([row for _, row in located], dtype=np.int64))
    best: dict[int, float] = {}
    best_common: dict[int, float] = {}
    for (match, _), weight in zip(located, weights.tolist(), strict=True):
        best[match.query] = max(best.get(match.query, 0.0), match.similarity)
        record = samples.get(match.sample_id)
        if weight < MIN_EVIDENCE_WEIGHT or record is None or record.goodware:
            best_common[match.query] = max(best_common.get(match.query, 0.0), match.similarity)
    library = {query for query, common in best_common.items() if common >= best[query] - 1e-6}
    kept = [
        (match, row)
        for (match, row), weight in zip(located, weights.tolist(), strict=True)
        if match.query not in library
        and weight >= MIN_EVIDENCE_WEIGHT
        and match.similarity >= best[match.query] - IDENTITY_MARGIN
        and not samples[match.sample_id].goodware
    ]
    return kept, library


def find_code_evidence(
    store: Store,
    index: FunctionIndex,
    samples: Mapping[int, SampleRecord],
    features: SampleFeatures,
    *,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    top_k: int = DEFAULT_TOP_K,
    feature_index: FeatureCandidateIndex | None = None,
) -> CodeEvidence:
    """Shared rare code between ``features`` and the knowledge base, as ``Evidence``.

    ``feature_index`` is the second candidate stage; when None it is built from the store
    (see ``MAX_FEATURE_STAGE_SAMPLES``). Callers that attribute many samples should build it
    once with ``build_feature_candidates``."""
    if index.rarity is None:
        raise ValueError("code evidence needs an index built with rarity statistics")
    with cyclic_collector_paused():
        return _code_evidence(store, index, samples, features, min_similarity, top_k, feature_index)


def _code_evidence(
    store: Store,
    index: FunctionIndex,
    samples: Mapping[int, SampleRecord],
    features: SampleFeatures,
    min_similarity: float,
    top_k: int,
    feature_index: FeatureCandidateIndex | None,
) -> CodeEvidence:
    assert index.rarity is not None
    functions = features.functions
    matches = index.query(functions, min_similarity=min_similarity, top_k=top_k)
    weights = index.rarity.weights(matches.row).astype(np.float64)
    similarity = matches.similarity.astype(np.float64)
    query = matches.query.astype(np.int64)
    best_similarity = best_per_query(query, similarity, len(functions))
    common = weights < MIN_EVIDENCE_WEIGHT
    best_common = best_per_query(query[common], similarity[common], len(functions))
    matched_queries = np.zeros(len(functions), dtype=bool)
    matched_queries[query] = True
    common_queries = np.zeros(len(functions), dtype=bool)
    common_queries[query[common]] = True

    candidates = select_candidates(index, samples, matches, weights, best_similarity)
    reranked = rerank(store, index, samples, functions, candidates, feature_index)
    kept = reranked.candidates
    writer = CodeEvidenceWriter(index.min_instructions)
    for query_position, sample_id, address, size, rarity, weight, similarity in zip(
        kept.query.tolist(),
        kept.sample_id.tolist(),
        reranked.address,
        reranked.size,
        index.rarity.explain_rows(kept.row),
        kept.weight.tolist(),
        reranked.similarity,
        strict=True,
    ):
        writer.add(
            functions[query_position], address, size, rarity, weight, samples[sample_id], similarity
        )

    unmatched = [
        position
        for position, function in enumerate(functions)
        if function.instruction_count >= index.min_instructions and not matched_queries[position]
    ]
    feature_matches, feature_library = _feature_stage_matches(
        store, index, samples, functions, unmatched, feature_index
    )
    feature_rows = np.array([row for _, row in feature_matches], dtype=np.int64)
    feature_weights = index.rarity.weights(feature_rows)
    feature_explained = index.rarity.explain_rows(feature_rows)
    for (match, _), weight, rarity in zip(
        feature_matches, feature_weights.tolist(), feature_explained, strict=True
    ):
        writer.add(
            functions[match.query],
            match.function.address,
            match.function.size,
            rarity,
            weight,
            samples[match.sample_id],
            match.similarity,
            f"; found by {match.shared_keys} shared optimisation-robust features",
        )
    evidence = writer.items
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
    library = len(feature_library) + int(
        np.count_nonzero(common_queries & (best_common >= best_similarity - 1e-6))
    )
    return CodeEvidence(
        evidence=tuple(evidence),
        neighbours=call_graph_neighbours(features),
        distinctive_functions=max(looked_up - library, 0),
        library_functions=library,
        looked_up_functions=looked_up,
    )
