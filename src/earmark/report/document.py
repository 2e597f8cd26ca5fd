"""The one result document of an attribution (``CaseReport``) and of a comparison.

Every output format renders these models: text (``report.text``), JSON (``report.json_report``),
STIX and MISP (``report.stix_export`` / ``report.misp_export``). Pydantic is used here, at the
boundary, for validation and the published JSON schema (docs/attribution-schema.json).
"""

from __future__ import annotations

from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from earmark.model.evidence import Evidence
from earmark.reason.hypotheses import Hypothesis, Verdict

CASE_SCHEMA_VERSION = "1.0"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EvidenceItem(_Frozen):
    kind: Literal["code", "infrastructure", "toolchain", "artefact"]
    actor: str | None
    family: str | None
    similarity: float = Field(ge=0.0, le=1.0)
    weight: float = Field(ge=0.0, le=1.0)
    contribution: float = Field(ge=0.0, le=1.0, description="similarity x weight")
    reason: str
    query_address: int | None = None
    query_size: int | None = None
    match_sha256: str | None = None
    match_address: int | None = None
    match_size: int | None = None
    pivot: str | None = None
    value: str | None = None
    matched_value: str | None = None
    report_id: str | None = None
    observed_at: date | None = None
    query_offset: int | None = Field(
        default=None, description="artefact evidence: file offset of the string in the query"
    )
    related_addresses: list[int] = Field(
        default_factory=list,
        description="artefact evidence: query functions that reference the string",
    )
    match_share: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="artefact evidence: largest share of one KB sample's rare strings (of this "
        "actor/family) found in the query",
    )

    @classmethod
    def from_evidence(cls, item: Evidence) -> EvidenceItem:
        return cls(
            kind=item.kind,
            actor=item.actor,
            family=item.family,
            similarity=min(max(item.similarity, 0.0), 1.0),
            weight=min(max(item.weight, 0.0), 1.0),
            contribution=round(min(max(item.similarity * item.weight, 0.0), 1.0), 4),
            reason=item.reason,
            query_address=item.query_address,
            query_size=item.query_size,
            match_sha256=item.match_sha256,
            match_address=item.match_address,
            match_size=item.match_size,
            pivot=item.pivot,
            value=item.value,
            matched_value=item.matched_value,
            report_id=item.report_id,
            observed_at=item.observed_at,
            query_offset=item.query_offset,
            related_addresses=list(item.related_addresses),
            match_share=item.match_share,
        )

    def to_evidence(self) -> Evidence:
        return Evidence(
            kind=self.kind,
            actor=self.actor,
            family=self.family,
            similarity=self.similarity,
            weight=self.weight,
            reason=self.reason,
            query_address=self.query_address,
            query_size=self.query_size,
            match_sha256=self.match_sha256,
            match_address=self.match_address,
            match_size=self.match_size,
            pivot=self.pivot,
            value=self.value,
            matched_value=self.matched_value,
            report_id=self.report_id,
            observed_at=self.observed_at,
            query_offset=self.query_offset,
            related_addresses=tuple(self.related_addresses),
            match_share=self.match_share,
        )


class HypothesisItem(_Frozen):
    actor: str | None
    family: str | None = Field(description="null for the actor-level hypothesis")
    score: float = Field(
        ge=0.0,
        le=1.0,
        description="link score scaled by the share of the query explained (docs/attribution.md)",
    )
    link_score: float = Field(
        ge=0.0,
        le=1.0,
        description="strength of the shared code/infrastructure/artefact link alone",
    )
    likelihood: str = Field(description="ICD-203 words for the score")
    evidence_count: int = Field(ge=0)
    rare_function_count: int = Field(ge=0)
    shared_bytes: int = Field(ge=0)
    coverage: float | None = Field(
        default=None, description="share of the query's distinctive functions explained"
    )
    relation: Literal["authored", "shares-code", "shares-artefacts", "shared-library"] = Field(
        description="authored; shares-code / shares-artefacts: a link, not authorship; "
        "shared-library: the query is a library many groups import (score capped)"
    )
    artefact_count: int = Field(
        default=0, ge=0, description="distinct rare artefacts counted (strings, exports, ...)"
    )
    artefact_link: float = Field(
        default=0.0, ge=0.0, le=1.0, description="noisy-OR of the counted artefacts alone"
    )
    strongest_evidence: list[int] = Field(description="positions in `evidence`, strongest first")

    @classmethod
    def from_hypothesis(cls, hypothesis: Hypothesis, likelihood: str) -> HypothesisItem:
        return cls(
            actor=hypothesis.actor,
            family=hypothesis.family,
            score=hypothesis.score,
            link_score=hypothesis.link_score,
            likelihood=likelihood,
            evidence_count=hypothesis.evidence_count,
            rare_function_count=hypothesis.rare_function_count,
            shared_bytes=hypothesis.shared_bytes,
            coverage=hypothesis.coverage,
            relation=hypothesis.relation,
            artefact_count=hypothesis.artefact_count,
            artefact_link=hypothesis.artefact_link,
            strongest_evidence=list(hypothesis.strongest),
        )


class VerdictItem(_Frozen):
    actor: str | None = Field(description="null: no known actor")
    family: str | None
    score: float = Field(ge=0.0, le=1.0)
    summary: str

    @classmethod
    def from_verdict(cls, verdict: Verdict) -> VerdictItem:
        return cls(
            actor=verdict.actor, family=verdict.family, score=verdict.score, summary=verdict.summary
        )


class QueryInfo(_Frozen):
    name: str
    format: str | None = None
    arch: str | None = None
    function_count: int = 0
    looked_up_functions: int = 0
    library_functions: int = 0
    distinctive_functions: int = 0
    indicator_count: int = 0


class KnowledgeBaseInfo(_Frozen):
    revision: int
    samples: int
    functions: int
    indexed_functions: int


class CaseReport(_Frozen):
    """An attribution case: who is behind the query, and the checkable evidence why."""

    schema_version: str = CASE_SCHEMA_VERSION
    sha256: str | None = Field(description="the query sample; null when attributing IOCs only")
    query: QueryInfo
    verdict: VerdictItem
    hypotheses: list[HypothesisItem] = Field(description="best first")
    evidence: list[EvidenceItem] = Field(description="strongest contribution first")
    knowledge_base: KnowledgeBaseInfo
    warnings: list[str] = Field(default_factory=list)


class FunctionCandidate(_Frozen):
    address: int
    similarity: float = Field(ge=0.0, le=1.0)


class FunctionCandidates(_Frozen):
    address: int
    candidates: list[FunctionCandidate] = Field(description="best first")


class SharedFunction(_Frozen):
    address_a: int
    address_b: int
    similarity: float = Field(ge=0.0, le=1.0)
    size_a: int
    size_b: int
    matched_by: Literal["similarity", "call-graph"]
    disassembly_a: list[str]
    disassembly_b: list[str]


class CompareReport(_Frozen):
    """Two samples side by side: every function of A with its best candidates in B, and the
    one-to-one shared functions (the reproducible proof of shared code)."""

    schema_version: str = CASE_SCHEMA_VERSION
    sha256_a: str
    sha256_b: str
    functions: list[FunctionCandidates]
    shared: list[SharedFunction] = Field(description="most similar first")


def case_json_schema() -> dict[str, Any]:
    """The JSON schema of ``CaseReport`` (published as docs/attribution-schema.json)."""
    return CaseReport.model_json_schema()
