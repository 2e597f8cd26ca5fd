"""Re-ranking of the LSH stage's matches for code evidence (steps 2-4 of ``correlate.code``),
in batches rather than per match.

A query has ~1,500 surviving matches on the PE bench KB; handled one at a time, each cost
~100 µs of Python (locate the KB function, rebuild it as ``FunctionFeatures``, score it,
explain its rarity). Here the selection is numpy over the match arrays, the matched KB
functions are located with one search per matched sample
(``CompactFunctions.locate_positions``), every pair is scored at once
(``index.pair_similarity``) and each rarity profile is worded once
(``RarityTable.explain_rows``); only the evidence items themselves are Python objects.
Results are those of the per-match loop, item for item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from earmark.index.feature_candidates import FeatureCandidateIndex, locate_function
from earmark.index.function_index import FunctionIndex, FunctionMatches
from earmark.index.pair_similarity import stored_pair_similarity
from earmark.index.rarity import FunctionRarity
from earmark.index.similarity import function_similarity
from earmark.model.evidence import Evidence
from earmark.model.kb import SampleRecord
from earmark.model.sample import FunctionFeatures
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

# Matched samples whose functions are re-ranked, strongest first: past 64 samples the weakest
# matches are a rounding error in a noisy-OR already saturated by the strongest ones. (Without
# the feature stage each re-ranked sample costs a decode of its features file, ~50 µs per
# function, which this also bounds.)
MAX_RERANKED_SAMPLES: Final = 64

# Matches below this rarity weight are not reported as evidence (they are library or runtime
# code). They still give query functions their identity (step 2 of ``correlate.code``).
MIN_EVIDENCE_WEIGHT: Final = 0.01


def specificity(function: FunctionFeatures, min_instructions: int) -> float:
    """How distinctive a function of this size is, 0..1 (see ``SPECIFIC_INSTRUCTIONS``)."""
    span = max(SPECIFIC_INSTRUCTIONS - min_instructions, 1)
    # min/max rather than np.clip: this runs per evidence item, and numpy on a scalar costs
    # ~4 µs where the comparison costs nothing (same value).
    return min(max((function.instruction_count - min_instructions + 1) / span, 0.0), 1.0)


class CodeEvidenceWriter:
    """Writes the evidence items of matched functions, one per claim of the matched sample.
    The reason text depends only on (rarity reason, stage, query function size), and the
    claims only on the sample; both repeat across the ~1,500 matches of a query, so each is
    worked out once."""

    def __init__(self, min_instructions: int) -> None:
        self.min_instructions = min_instructions
        self.items: list[Evidence] = []
        self._reasons: dict[tuple[str, str, int], tuple[str, float]] = {}
        self._claims: dict[int, list[tuple[str | None, str | None]]] = {}  # by sample id

    def _reason(
        self, rarity: str, stage: str, query_function: FunctionFeatures
    ) -> tuple[str, float]:
        key = (rarity, stage, query_function.instruction_count)
        known = self._reasons.get(key)
        if known is None:
            size_factor = specificity(query_function, self.min_instructions)
            reason = rarity + stage
            if size_factor < 1.0:
                reason += (
                    f"; {query_function.instruction_count} instructions: small code is less "
                    f"distinctive, counted x{size_factor:.2f}"
                )
            known = self._reasons[key] = (reason, size_factor)
        return known

    def add(
        self,
        query_function: FunctionFeatures,
        matched_address: int,
        matched_size: int,
        rarity: FunctionRarity,
        weight: float,
        record: SampleRecord,
        similarity: float,
        stage: str = "",
    ) -> None:
        reason, size_factor = self._reason(rarity.reason, stage, query_function)
        claims = self._claims.get(record.sample_id)
        if claims is None:
            claims = self._claims[record.sample_id] = record.claims
        for actor, family in claims:
            self.items.append(
                Evidence(
                    kind="code",
                    actor=actor,
                    family=family,
                    similarity=round(similarity, 4),
                    weight=round(weight * size_factor, 4),
                    reason=reason,
                    query_address=query_function.address,
                    query_size=query_function.size,
                    match_sha256=record.sha256,
                    match_address=matched_address,
                    match_size=matched_size,
                )
            )


@dataclass(frozen=True)
class Candidates:
    """Index matches that survive the identity and rarity rules, in match order."""

    query: npt.NDArray[np.int64]  # position in features.functions
    row: npt.NDArray[np.int64]
    sample_id: npt.NDArray[np.int64]
    weight: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Reranked:
    """Candidates whose KB function was found, with its similarity to the query function."""

    candidates: Candidates
    address: list[int]
    size: list[int]
    similarity: list[float]


def best_per_query(
    query: npt.NDArray[np.int64], similarity: npt.NDArray[np.float64], rows: int
) -> npt.NDArray[np.float64]:
    """Largest similarity of each query position (0.0 where it has none)."""
    best = np.zeros(rows, dtype=np.float64)
    np.maximum.at(best, query, similarity)
    return best


def _sample_flags(
    sample_ids: npt.NDArray[np.int64], samples: Mapping[int, SampleRecord]
) -> npt.NDArray[np.bool_]:
    """Whether each match's sample is a known, non-goodware KB sample (one look-up per sample)."""
    distinct, inverse = np.unique(sample_ids, return_inverse=True)
    known = [
        record is not None and not record.goodware for record in map(samples.get, distinct.tolist())
    ]
    flags: npt.NDArray[np.bool_] = np.array(known, dtype=bool)[inverse.reshape(-1)]
    return flags


def select_candidates(
    index: FunctionIndex,
    samples: Mapping[int, SampleRecord],
    matches: FunctionMatches,
    weights: npt.NDArray[np.float64],
    best_similarity: npt.NDArray[np.float64],
) -> Candidates:
    """Rare matches nearly as similar as their query function's best, from the
    MAX_RERANKED_SAMPLES strongest samples."""
    query = matches.query.astype(np.int64)
    similarity = matches.similarity.astype(np.float64)
    keep = (
        (weights >= MIN_EVIDENCE_WEIGHT)
        & _sample_flags(matches.sample_id, samples)
        & (similarity >= best_similarity[query] - IDENTITY_MARGIN)
    )
    sample_ids = matches.sample_id[keep].astype(np.int64)
    # Summed in match order in float64, as a running sum per sample would be.
    distinct, inverse = np.unique(sample_ids, return_inverse=True)
    strength = np.bincount(
        inverse.reshape(-1), weights=weights[keep] * similarity[keep], minlength=len(distinct)
    ).tolist()
    # Ties broken by sha256 so the result never depends on ingest order (sample ids).
    ranked = sorted(
        range(len(distinct)), key=lambda k: (-strength[k], samples[int(distinct[k])].sha256)
    )
    reranked = np.zeros(len(distinct), dtype=bool)
    reranked[ranked[:MAX_RERANKED_SAMPLES]] = True
    chosen = reranked[inverse.reshape(-1)]
    return Candidates(
        query=query[keep][chosen],
        row=matches.row[keep][chosen].astype(np.int64),
        sample_id=sample_ids[chosen],
        weight=weights[keep][chosen],
    )


def rerank(
    store: Store,
    index: FunctionIndex,
    samples: Mapping[int, SampleRecord],
    functions: Sequence[FunctionFeatures],
    candidates: Candidates,
    feature_index: FeatureCandidateIndex | None,
) -> Reranked:
    """Find each candidate's KB function (exact hash and signature of its index row) and score
    it against the query function with ``function_similarity``."""
    exact_hash = index.exact_hash[candidates.row]
    signatures = index.signatures[candidates.row]
    if feature_index is not None:
        stored = feature_index.stored
        positions = stored.locate_positions(candidates.sample_id, exact_hash, signatures)
        found = positions >= 0
        positions = positions[found]
        kept = Candidates(
            query=candidates.query[found],
            row=candidates.row[found],
            sample_id=candidates.sample_id[found],
            weight=candidates.weight[found],
        )
        return Reranked(
            kept,
            address=stored.address[positions].tolist(),
            size=stored.size[positions].tolist(),
            similarity=stored_pair_similarity(functions, kept.query, stored, positions).tolist(),
        )
    # Without the compact KB functions (past MAX_FEATURE_STAGE_SAMPLES) each re-ranked sample
    # is decoded once for this query and dropped with it.
    decoded: dict[int, tuple[FunctionFeatures, ...]] = {}
    found_list: list[bool] = []
    address: list[int] = []
    size: list[int] = []
    similarity: list[float] = []
    for position, sample_id in enumerate(candidates.sample_id.tolist()):
        if sample_id not in decoded:
            decoded[sample_id] = store.load_features(samples[sample_id].sha256).functions
        matched = locate_function(
            decoded[sample_id], int(exact_hash[position]), signatures[position]
        )
        found_list.append(matched is not None)
        if matched is not None:
            address.append(matched.address)
            size.append(matched.size)
            query_function = functions[int(candidates.query[position])]
            similarity.append(function_similarity(query_function, matched))
    mask = np.array(found_list, dtype=bool)
    kept = Candidates(
        query=candidates.query[mask],
        row=candidates.row[mask],
        sample_id=candidates.sample_id[mask],
        weight=candidates.weight[mask],
    )
    return Reranked(kept, address, size, similarity)
