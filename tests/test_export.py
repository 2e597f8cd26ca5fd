"""STIX 2.1 and MISP exports: valid under the OASIS validator and loadable by pymisp."""

from __future__ import annotations

import json
from datetime import date

import pytest
from pymisp import MISPEvent

from earmark.correlate.infrastructure import InfrastructureIndex, rank_actors
from earmark.intel.warninglists import BenignInfrastructure
from earmark.model.intel import Indicator, IndicatorType, IntelReport
from earmark.model.kb import Tlp
from earmark.report.misp_export import misp_event_for_case, misp_event_for_report, render_misp
from earmark.report.stix_export import build_stix_bundle, indicator_pattern, render_stix

stix2validator = pytest.importorskip("stix2validator")

CLEAR_REPORT = IntelReport(
    "eset:1", "eset-malware-ioc", "3CX supply-chain compromise",
    "https://www.welivesecurity.com/2023/04/20/linux-malware", date(2023, 4, 20), Tlp.CLEAR,
    ("Lazarus Group",), ("NukeSped",),
    (Indicator(IndicatorType.DOMAIN, "journalide.org"),
     Indicator(IndicatorType.IPV4, "172.93.201.88"),
     Indicator(IndicatorType.URL, "journalide.org/djour.php"),
     Indicator(IndicatorType.SHA1, "f6760fb1f8b019af2304ea6410001b63a1809f1d"),
     Indicator(IndicatorType.EMAIL, "hr@o'brien.example"),
     Indicator(IndicatorType.BITCOIN, "1BoatSLRHtKNngkdXEeobR76b53LETtpyT"),
     Indicator(IndicatorType.MUTEX, "Global\\AppCompatCacheObject")),
)
RED_REPORT = IntelReport(
    "case:7", "case 17-112", "partner report", None, None, Tlp.RED, ("Kimsuky",), (),
    (Indicator(IndicatorType.DOMAIN, "secret-partner-c2.example"),),
)


def _case() -> tuple[list, list]:  # type: ignore[type-arg]
    no_lists = BenignInfrastructure.from_lists([])
    index = InfrastructureIndex.from_reports([CLEAR_REPORT, RED_REPORT], no_lists)
    evidence = index.correlate([Indicator(IndicatorType.DOMAIN, "cdn.journalide.org"),
                                Indicator(IndicatorType.DOMAIN, "secret-partner-c2.example")],
                               at=date(2023, 6, 1))
    return evidence, rank_actors(evidence)


def test_stix_bundle_is_valid_and_complete() -> None:
    evidence, hypotheses = _case()
    text = render_stix([CLEAR_REPORT, RED_REPORT], evidence, hypotheses)
    result = stix2validator.validate_string(text)
    assert result.is_valid, [str(e) for e in result.errors]
    types = {o["type"] for o in json.loads(text)["objects"]}
    assert {"intrusion-set", "malware", "indicator", "relationship", "report",
            "marking-definition", "opinion"} <= types


def test_stix_leaves_out_red_unless_asked() -> None:
    evidence, hypotheses = _case()
    text = render_stix([CLEAR_REPORT, RED_REPORT], evidence, hypotheses)
    assert "secret-partner-c2" not in text and "Kimsuky" not in text
    with_red = render_stix([CLEAR_REPORT, RED_REPORT], evidence, hypotheses, include_red=True)
    assert "secret-partner-c2" in with_red
    assert stix2validator.validate_string(with_red).is_valid


def test_stix_ids_are_stable_and_patterns_escaped() -> None:
    first = build_stix_bundle([CLEAR_REPORT])
    second = build_stix_bundle([CLEAR_REPORT])
    assert [o["id"] for o in first["objects"]] == [o["id"] for o in second["objects"]]
    pattern = indicator_pattern(Indicator(IndicatorType.EMAIL, "hr@o'brien.example"))
    assert pattern == "[email-addr:value = 'hr@o\\'brien.example']"
    assert indicator_pattern(Indicator(IndicatorType.URL, "a.example/x")) == \
        "[url:value = 'http://a.example/x']"


def test_misp_event_loads_with_types_categories_and_tags() -> None:
    event = misp_event_for_report(CLEAR_REPORT)
    assert event is not None
    loaded = MISPEvent()
    loaded.load(render_misp(event))
    attributes = {(a.type, a.category) for a in loaded.attributes}
    assert ("domain", "Network activity") in attributes
    assert ("ip-dst", "Network activity") in attributes
    assert ("sha1", "Payload delivery") in attributes
    assert ("btc", "Financial fraud") in attributes
    assert ("link", "External analysis") in attributes
    tags = {t.name for t in loaded.tags}
    assert {"tlp:clear", 'misp-galaxy:threat-actor="Lazarus Group"'} <= tags


def test_misp_red_report_needs_include_red_and_case_event_loads() -> None:
    assert misp_event_for_report(RED_REPORT) is None
    assert misp_event_for_report(RED_REPORT, include_red=True) is not None
    evidence, hypotheses = _case()
    event = misp_event_for_case("case 1", evidence, hypotheses, tlp=Tlp.AMBER,
                                red_report_ids=frozenset({"case:7"}))
    assert event is not None
    loaded = MISPEvent()
    loaded.load(render_misp(event))
    values = {a.value for a in loaded.attributes}
    assert values == {"cdn.journalide.org"}
    tags = {t.name for t in loaded.tags}
    assert "tlp:amber" in tags
    assert 'misp-galaxy:threat-actor="Kimsuky"' not in tags
