"""STIX 2.1 export: reports, their indicators, actors, families, evidence and hypotheses.

Objects are built with the ``stix2`` library (it checks required properties and serialises
timestamps the way the OASIS validator expects). Identifiers are UUIDv5 over the object's
natural key, so exporting the same knowledge twice gives the same ids and consumers de-duplicate.

TLP: STIX ships TLP 1.0 marking definitions; TLP 2.0 CLEAR is exported as TLP:WHITE (its 1.0
name) and AMBER+STRICT as AMBER (the nearest stricter-than-GREEN marking). TLP:RED records are
left out unless ``include_red=True``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

import stix2

from earmark.correlate.infrastructure import ActorScore
from earmark.model.evidence import Evidence
from earmark.model.intel import Indicator, IndicatorType, IntelReport
from earmark.model.kb import Tlp

# Fixed namespace so ids are stable across runs and machines.
EARMARK_STIX_NAMESPACE = uuid.UUID("7f1f3d0e-5a2b-4c59-9b1e-3c1d2a5e8b40")

_TLP_MARKINGS: dict[Tlp, Any] = {
    Tlp.CLEAR: stix2.TLP_WHITE,
    Tlp.GREEN: stix2.TLP_GREEN,
    Tlp.AMBER: stix2.TLP_AMBER,
    Tlp.AMBER_STRICT: stix2.TLP_AMBER,
    Tlp.RED: stix2.TLP_RED,
}

# STIX patterns per indicator type; types without a standard cyber-observable are skipped
# (wallets and named pipes have no SCO in the STIX 2.1 core).
_PATTERNS: dict[IndicatorType, str] = {
    IndicatorType.IPV4: "[ipv4-addr:value = '{}']",
    IndicatorType.IPV6: "[ipv6-addr:value = '{}']",
    IndicatorType.DOMAIN: "[domain-name:value = '{}']",
    IndicatorType.ONION: "[domain-name:value = '{}']",
    IndicatorType.URL: "[url:value = '{}']",
    IndicatorType.EMAIL: "[email-addr:value = '{}']",
    IndicatorType.MD5: "[file:hashes.MD5 = '{}']",
    IndicatorType.SHA1: "[file:hashes.'SHA-1' = '{}']",
    IndicatorType.SHA256: "[file:hashes.'SHA-256' = '{}']",
    IndicatorType.CERT_SHA1: "[x509-certificate:hashes.'SHA-1' = '{}']",
    IndicatorType.MUTEX: "[mutex:name = '{}']",
    IndicatorType.USER_AGENT:
        "[network-traffic:extensions.'http-request-ext'.request_header.'User-Agent' = '{}']",
}


def _stix_id(kind: str, *key: str) -> str:
    return f"{kind}--{uuid.uuid5(EARMARK_STIX_NAMESPACE, '|'.join((kind, *key)))}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def indicator_pattern(indicator: Indicator) -> str | None:
    template = _PATTERNS.get(indicator.type)
    if template is None:
        return None
    value = indicator.value
    if indicator.type == IndicatorType.URL and "://" not in value:
        value = "http://" + value  # some feeds (maltrail) omit the scheme; url:value needs one
    return template.format(_escape(value))


def _timestamp(day: date | None, fallback: datetime) -> datetime:
    if day is None:
        return fallback
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


class _BundleBuilder:
    def __init__(self, created: datetime) -> None:
        self.created = created
        self.objects: dict[str, Any] = {}

    def add(self, stix_object: Any) -> str:
        self.objects.setdefault(str(stix_object.id), stix_object)
        return str(stix_object.id)

    def actor(self, name: str, marking: Any) -> str:
        return self.add(stix2.IntrusionSet(
            id=_stix_id("intrusion-set", name), name=name, created=self.created,
            modified=self.created, object_marking_refs=[marking],
        ))

    def family(self, name: str, marking: Any) -> str:
        return self.add(stix2.Malware(
            id=_stix_id("malware", name), name=name, is_family=True, created=self.created,
            modified=self.created, object_marking_refs=[marking],
        ))

    def indicator(self, indicator: Indicator, valid_from: datetime, marking: Any) -> str | None:
        pattern = indicator_pattern(indicator)
        if pattern is None:
            return None
        return self.add(stix2.Indicator(
            id=_stix_id("indicator", indicator.type.value, indicator.value),
            name=f"{indicator.type.value}: {indicator.value}",
            description=f"{indicator.type.value} reported as malicious infrastructure or file",
            pattern=pattern,
            pattern_type="stix", valid_from=valid_from, indicator_types=["malicious-activity"],
            created=self.created, modified=self.created, object_marking_refs=[marking],
        ))

    def relationship(self, source: str, kind: str, target: str, marking: Any,
                     description: str | None = None) -> str:
        return self.add(stix2.Relationship(
            id=_stix_id("relationship", source, kind, target), relationship_type=kind,
            source_ref=source, target_ref=target, description=description,
            created=self.created, modified=self.created, object_marking_refs=[marking],
        ))


def build_stix_bundle(
    reports: Sequence[IntelReport] = (),
    evidence: Sequence[Evidence] = (),
    hypotheses: Sequence[ActorScore] = (),
    include_red: bool = False,
    created: datetime | None = None,
    evidence_tlp: Tlp = Tlp.AMBER,
) -> dict[str, Any]:
    """A STIX 2.1 bundle as a JSON-ready dict.

    ``evidence`` and ``hypotheses`` describe one case (the sample under attribution); they
    carry ``evidence_tlp``. Evidence that cites a TLP:RED report is dropped with the report.
    """
    created = created or datetime.now(UTC).replace(microsecond=0)
    builder = _BundleBuilder(created)
    red_reports = {r.report_id for r in reports if r.tlp == Tlp.RED}
    for report in reports:
        if report.tlp == Tlp.RED and not include_red:
            continue
        _add_report(builder, report)
    case_marking = _TLP_MARKINGS[evidence_tlp]
    if evidence_tlp != Tlp.RED or include_red:
        withheld_actors: set[str] = set()
        shown_actors: set[str] = set()
        for item in evidence:
            if item.report_id in red_reports and not include_red:
                withheld_actors.update([item.actor] if item.actor else [])
                continue
            shown_actors.update([item.actor] if item.actor else [])
            _add_evidence(builder, item, case_marking)
        for hypothesis in hypotheses:
            if hypothesis.actor in withheld_actors - shown_actors:
                continue  # only TLP:RED evidence names this actor: naming it would leak it
            actor_id = builder.actor(hypothesis.actor, case_marking)
            builder.add(stix2.Opinion(
                id=_stix_id("opinion", hypothesis.actor, f"{hypothesis.score:.4f}"),
                opinion=_opinion_word(hypothesis.score), object_refs=[actor_id],
                explanation=(f"earmark infrastructure score {hypothesis.score:.2f} "
                             f"from {hypothesis.evidence_count} evidence items"),
                created=created, modified=created, object_marking_refs=[case_marking],
            ))
    markings = {m.id: m for m in _TLP_MARKINGS.values()}
    used = {ref for o in builder.objects.values() for ref in o.get("object_marking_refs", ())}
    objects = [markings[m] for m in sorted(used)] + list(builder.objects.values())
    bundle = stix2.Bundle(objects=objects, allow_custom=False)
    parsed: dict[str, Any] = json.loads(bundle.serialize())
    return parsed


def _opinion_word(score: float) -> str:
    # STIX opinion is a five-step scale; map the 0..1 score onto it evenly.
    steps = ("strongly-disagree", "disagree", "neutral", "agree", "strongly-agree")
    return steps[min(int(score * len(steps)), len(steps) - 1)]


def _add_report(builder: _BundleBuilder, report: IntelReport) -> None:
    marking = _TLP_MARKINGS[report.tlp]
    published = _timestamp(report.published, builder.created)
    actor_ids = [builder.actor(name, marking) for name in report.actors]
    family_ids = [builder.family(name, marking) for name in report.families]
    refs: list[str] = [*actor_ids, *family_ids]
    for actor_id in actor_ids:
        for family_id in family_ids:
            refs.append(builder.relationship(actor_id, "uses", family_id, marking))
    for indicator in report.indicators:
        indicator_id = builder.indicator(indicator, published, marking)
        if indicator_id is None:
            continue
        refs.append(indicator_id)
        for target in actor_ids or family_ids:
            refs.append(builder.relationship(indicator_id, "indicates", target, marking))
    if not refs:
        return  # a STIX report must reference something
    external = [{"source_name": report.source, "url": report.reference}] if report.reference \
        else [{"source_name": report.source, "external_id": report.report_id}]
    builder.add(stix2.Report(
        id=_stix_id("report", report.report_id), name=report.title or report.report_id,
        published=published, report_types=["threat-report"], object_refs=refs,
        external_references=external, created=builder.created, modified=builder.created,
        object_marking_refs=[marking],
    ))


def _add_evidence(builder: _BundleBuilder, item: Evidence, marking: Any) -> None:
    if item.actor is None and item.family is None:
        return
    target = builder.actor(item.actor, marking) if item.actor else \
        builder.family(str(item.family), marking)
    if item.kind == "infrastructure" and item.value and item.pivot:
        indicator_type = _pivot_indicator_type(item.pivot, item.value)
        if indicator_type is not None:
            indicator_id = builder.indicator(Indicator(indicator_type, item.value),
                                             builder.created, marking)
            if indicator_id:
                builder.relationship(indicator_id, "indicates", target, marking,
                                     description=f"weight {item.weight:.2f}: {item.reason}")
                return
    content = f"weight {item.weight:.2f}: {item.reason}"
    if item.kind == "artefact":  # which artefact: the reason alone is the same for many
        content = f"{item.pivot} {item.value!r} in {item.match_sha256}; {content}"
    builder.add(stix2.Note(
        id=_stix_id("note", item.kind, content, target), abstract=f"{item.kind} evidence",
        content=content, object_refs=[target],
        created=builder.created, modified=builder.created, object_marking_refs=[marking],
    ))


def _pivot_indicator_type(pivot: str, value: str) -> IndicatorType | None:
    """The query value's type, read back from the pivot it linked through."""
    by_pivot = {t.value: t for t in IndicatorType}
    if pivot in by_pivot:
        return by_pivot[pivot]
    if pivot == "wallet":
        return None
    if pivot in ("registered-domain",):
        return IndicatorType.DOMAIN
    if pivot == "ipv4-/24":
        return IndicatorType.IPV4
    if pivot == "url-path":
        return IndicatorType.URL if "/" in value else None
    return None


def render_stix(
    reports: Sequence[IntelReport] = (),
    evidence: Sequence[Evidence] = (),
    hypotheses: Sequence[ActorScore] = (),
    include_red: bool = False,
) -> str:
    return json.dumps(build_stix_bundle(reports, evidence, hypotheses, include_red), indent=2)
