"""JSON, STIX 2.1 and MISP renderings of the case document, and the published JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

from earmark.correlate.infrastructure import ActorScore
from earmark.model.kb import Tlp
from earmark.report.document import CaseReport, CompareReport, case_json_schema

# The STIX and MISP exporters are imported where they are used: pymisp alone costs ~2.5 s of
# import, which `--format json` (the common scripted call) should not pay.


def render_case_json(case: CaseReport) -> str:
    return case.model_dump_json(indent=2)


def render_compare_json(report: CompareReport) -> str:
    return report.model_dump_json(indent=2)


def _actor_scores(case: CaseReport) -> list[ActorScore]:
    # The exporters speak of actors; family-level hypotheses are carried by their evidence.
    return [
        ActorScore(actor=h.actor, score=h.score, evidence_count=h.evidence_count)
        for h in case.hypotheses
        if h.actor is not None and h.family is None
    ]


def render_case_stix(case: CaseReport, tlp: Tlp = Tlp.AMBER) -> str:
    from earmark.report.stix_export import build_stix_bundle

    bundle = build_stix_bundle(
        evidence=[item.to_evidence() for item in case.evidence],
        hypotheses=_actor_scores(case),
        evidence_tlp=tlp,
    )
    return json.dumps(bundle, indent=2)


def render_case_misp(case: CaseReport, tlp: Tlp = Tlp.AMBER) -> str | None:
    """MISP event JSON, or None when the TLP forbids exporting the case (TLP:RED)."""
    from earmark.report.misp_export import misp_event_for_case, render_misp

    event = misp_event_for_case(
        title=f"earmark attribution of {case.query.name}: {case.verdict.summary}",
        evidence=[item.to_evidence() for item in case.evidence],
        hypotheses=_actor_scores(case),
        tlp=tlp,
    )
    return None if event is None else render_misp(event)


def write_case_schema(path: Path) -> None:
    """Write the ``CaseReport`` JSON schema (docs/attribution-schema.json is made with this)."""
    path.write_text(json.dumps(case_json_schema(), indent=2, sort_keys=True) + "\n")
