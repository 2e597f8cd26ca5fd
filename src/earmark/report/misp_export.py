"""MISP event export: one event per intel report, or one event for an attribution case.

Built with ``pymisp.MISPEvent`` so attribute types and categories are checked against MISP's
own ``describeTypes`` table. Actors become galaxy tags
(``misp-galaxy:threat-actor="Lazarus Group"``), families ``misp-galaxy:malpedia``-style tags
are not guessed: families go in as ``earmark:family`` tags. TLP 2.0 tags (``tlp:clear`` …) mark
every event; TLP:RED content is only exported with ``include_red=True``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date
from typing import Any, Final

from pymisp import MISPEvent

from earmark.correlate.infrastructure import ActorScore
from earmark.model.evidence import Evidence
from earmark.model.intel import IndicatorType, IntelReport
from earmark.model.kb import Tlp

# earmark type → (MISP attribute type, MISP category)
MISP_ATTRIBUTE_TYPES: dict[IndicatorType, tuple[str, str]] = {
    IndicatorType.IPV4: ("ip-dst", "Network activity"),
    IndicatorType.IPV6: ("ip-dst", "Network activity"),
    IndicatorType.DOMAIN: ("domain", "Network activity"),
    IndicatorType.ONION: ("domain", "Network activity"),
    IndicatorType.URL: ("url", "Network activity"),
    IndicatorType.EMAIL: ("email-src", "Payload delivery"),
    IndicatorType.MD5: ("md5", "Payload delivery"),
    IndicatorType.SHA1: ("sha1", "Payload delivery"),
    IndicatorType.SHA256: ("sha256", "Payload delivery"),
    IndicatorType.CERT_SHA1: ("x509-fingerprint-sha1", "Network activity"),
    IndicatorType.BITCOIN: ("btc", "Financial fraud"),
    IndicatorType.MONERO: ("xmr", "Financial fraud"),
    IndicatorType.NAMED_PIPE: ("named pipe", "Artifacts dropped"),
    IndicatorType.MUTEX: ("mutex", "Artifacts dropped"),
    IndicatorType.USER_AGENT: ("user-agent", "Network activity"),
}
# MISP "distribution": 0 = this organisation only, 1 = this community, 3 = all communities.
_DISTRIBUTION_BY_TLP = {Tlp.CLEAR: 3, Tlp.GREEN: 1, Tlp.AMBER: 0, Tlp.AMBER_STRICT: 0, Tlp.RED: 0}


def _tlp_tag(tlp: Tlp) -> str:
    return f"tlp:{tlp.value}"


def _actor_tag(actor: str) -> str:
    return f'misp-galaxy:threat-actor="{actor.replace(chr(34), "")}"'


def _family_tag(family: str) -> str:
    return f'earmark:family="{family.replace(chr(34), "")}"'


def misp_event_for_report(report: IntelReport, include_red: bool = False) -> MISPEvent | None:
    """The report as a MISP event; None for TLP:RED unless ``include_red``."""
    if report.tlp == Tlp.RED and not include_red:
        return None
    event = MISPEvent()
    event.info = report.title or report.report_id
    event.distribution = _DISTRIBUTION_BY_TLP[report.tlp]
    event.threat_level_id = 2  # medium: the source published it, we do not re-grade it
    event.analysis = 2  # completed: a published report
    if report.published:
        event.date = report.published
    event.add_tag(_tlp_tag(report.tlp))
    for actor in report.actors:
        event.add_tag(_actor_tag(actor))
    for family in report.families:
        event.add_tag(_family_tag(family))
    comment = f"{report.source}: {report.reference or report.report_id}"
    for indicator in report.indicators:
        mapped = MISP_ATTRIBUTE_TYPES.get(indicator.type)
        if mapped is None:
            continue
        attribute_type, category = mapped
        event.add_attribute(attribute_type, indicator.value, category=category, to_ids=True,
                            comment=comment)
    if report.reference:
        event.add_attribute("link", report.reference, category="External analysis",
                            to_ids=False)
    return event


def misp_event_for_case(
    title: str,
    evidence: Sequence[Evidence],
    hypotheses: Sequence[ActorScore] = (),
    tlp: Tlp = Tlp.AMBER,
    include_red: bool = False,
    red_report_ids: frozenset[str] = frozenset(),
    when: date | None = None,
) -> MISPEvent | None:
    """An attribution case: the linked values as attributes, the hypotheses as tags."""
    if tlp == Tlp.RED and not include_red:
        return None
    event = MISPEvent()
    event.info = title
    event.distribution = _DISTRIBUTION_BY_TLP[tlp]
    event.threat_level_id = 2
    event.analysis = 1  # ongoing: an attribution is a hypothesis
    if when:
        event.date = when
    event.add_tag(_tlp_tag(tlp))
    withheld = {e.actor for e in evidence if e.report_id in red_report_ids and not include_red}
    shown = {e.actor for e in evidence if e.report_id not in red_report_ids or include_red}
    for hypothesis in hypotheses:
        if hypothesis.actor not in withheld - shown:  # named only by TLP:RED evidence: leak
            event.add_tag(_actor_tag(hypothesis.actor))
    for item in evidence:
        if item.kind == "artefact" and item.value and item.pivot in _ARTEFACT_ATTRIBUTES:
            attribute_type, category = _ARTEFACT_ATTRIBUTES[item.pivot]
            event.add_attribute(attribute_type, item.value, category=category, to_ids=False,
                                comment=f"links to {item.actor or item.family}: {item.reason}")
            continue
        if item.kind != "infrastructure" or not item.value or not item.pivot:
            continue
        if item.report_id in red_report_ids and not include_red:
            continue
        indicator_type = _indicator_type_of_pivot(item.pivot)
        if indicator_type is None:
            continue
        attribute_type, category = MISP_ATTRIBUTE_TYPES[indicator_type]
        event.add_attribute(attribute_type, item.value, category=category, to_ids=False,
                            comment=f"links to {item.actor or item.family}: {item.reason}")
    return event


# Artefact evidence with a MISP attribute type of its own (strings and exports stay in the case).
_ARTEFACT_ATTRIBUTES: Final = {"imphash": ("imphash", "Payload delivery"),
                               "pdb": ("pdb", "Artifacts dropped")}


def _indicator_type_of_pivot(pivot: str) -> IndicatorType | None:
    by_value = {t.value: t for t in IndicatorType}
    if pivot in by_value:
        return by_value[pivot]
    return {"registered-domain": IndicatorType.DOMAIN, "ipv4-/24": IndicatorType.IPV4,
            "url-path": IndicatorType.URL}.get(pivot)


def render_misp(event: MISPEvent) -> str:
    """MISP's own JSON layout (``{"Event": {...}}``)."""
    document: dict[str, Any] = json.loads(event.to_json())
    return json.dumps({"Event": document}, indent=2)
