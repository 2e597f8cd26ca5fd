"""Parsers for ESET malware-ioc READMEs and maltrail trail files, on the real shared data."""

from __future__ import annotations

from datetime import date

import pytest

from earmark.intel.eset import families_from_detection_names, parse_eset_readme
from earmark.intel.maltrail import (
    classify_trail,
    date_from_reference_url,
    parse_aliases,
    parse_maltrail_file,
)
from earmark.model.intel import Indicator, IndicatorType
from earmark.model.kb import Tlp
from shared_data import INTEL_DIR

INTEL = INTEL_DIR
LAZARUS_ADOC = INTEL / "eset_malware-ioc" / "nukesped_lazarus" / "README.adoc"
LAZARUS_TRAILS = INTEL / "maltrail" / "trails" / "static" / "malware" / "apt_lazarus.txt"

needs_data = pytest.mark.skipif(not LAZARUS_ADOC.exists(), reason="shared intel data absent")


@needs_data
def test_eset_lazarus_sections_become_dated_reports_with_refanged_indicators() -> None:
    reports = parse_eset_readme(LAZARUS_ADOC.read_text("utf-8"), "nukesped_lazarus",
                                resolve_actor=lambda folder: "Lazarus Group")
    by_title = {r.title: r for r in reports}
    three_cx = by_title["3CX supply-chain compromise"]
    assert three_cx.published == date(2023, 4, 20)
    assert three_cx.reference is not None and "welivesecurity.com/2023/04/20" in three_cx.reference
    assert three_cx.actors == ("Lazarus Group",)
    assert three_cx.source == "eset-malware-ioc" and three_cx.tlp == Tlp.CLEAR
    assert Indicator(IndicatorType.IPV4, "23.254.211.230") in three_cx.indicators
    assert Indicator(IndicatorType.DOMAIN, "journalide.org") in three_cx.indicators
    assert Indicator(IndicatorType.SHA1, "f6760fb1f8b019af2304ea6410001b63a1809f1d") in (
        Indicator(i.type, i.value.lower()) for i in three_cx.indicators
    )
    # the citation is not an indicator
    assert not any("welivesecurity" in i.value for r in reports for i in r.indicators)
    assert "NukeSped" in three_cx.families
    assert len({r.report_id for r in reports}) == len(reports)


def test_eset_single_report_document_keeps_subsections_together() -> None:
    text = (
        "= Foo -- Indicators of Compromise\n\n"
        "https://www.welivesecurity.com/2019/08/01/foo-banking/[blog]\n\n"
        "== Hashes\n\n`A05A71F11D84B75E8D33B06E9E1EBFE84FAE0C76`\n\n"
        "== C&C servers\n\n- `evil-c2[.]com`\n- `8.8.4[.]4`\n"
    )

    def extract(body: str) -> list[Indicator]:
        found = []
        if "evil-c2[.]com" in body:
            found.append(Indicator(IndicatorType.DOMAIN, "evil-c2.com"))
        if "A05A71F1" in body:
            found.append(Indicator(IndicatorType.SHA1, "a05a71f11d84b75e8d33b06e9e1ebfe84fae0c76"))
        return found

    reports = parse_eset_readme(text, "foo", extract=extract)
    assert len(reports) == 1
    assert reports[0].published == date(2019, 8, 1)
    assert {i.type for i in reports[0].indicators} == {IndicatorType.DOMAIN, IndicatorType.SHA1}


def test_detection_name_families_skip_generic_names() -> None:
    text = "Win64/NukeSped.KT, Win32/Kryptik.GNNS, Win64/Rootkit.NukeSped.A, Linux/Moose.A"
    assert families_from_detection_names(text) == ("NukeSped", "Moose")


@needs_data
def test_maltrail_lazarus_blocks_aliases_and_dates() -> None:
    blocks = parse_maltrail_file(LAZARUS_TRAILS)
    assert len(blocks) > 100
    first = blocks[0].report
    assert first.actors == ("lazarus",) and first.source == "maltrail"
    assert Indicator(IndicatorType.DOMAIN, "exbonus.mrbasic.com") in first.indicators
    redbanc = next(b for b in blocks if any("redbanc" in r for r in b.references))
    assert len(redbanc.references) == 6  # several Reference lines head one block
    assert redbanc.report.published == date(2019, 1, 11)  # earliest tweet's snowflake time
    assert "hidden cobra" in parse_aliases(LAZARUS_TRAILS.read_text("utf-8"))


def test_trail_classification() -> None:
    assert classify_trail("185.142.236.226") == [Indicator(IndicatorType.IPV4, "185.142.236.226")]
    assert classify_trail("1.2.3.4:8080") == [Indicator(IndicatorType.IPV4, "1.2.3.4")]
    assert classify_trail("tpddata.com/skins/skin-8.thm  ") == [
        Indicator(IndicatorType.URL, "tpddata.com/skins/skin-8.thm"),
        Indicator(IndicatorType.DOMAIN, "tpddata.com"),
    ]
    assert classify_trail("/tbl_add.php") == []
    assert classify_trail("not a trail") == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://www.welivesecurity.com/2019/05/14/x/", date(2019, 5, 14)),
        ("https://blog.example/2021/03/", date(2021, 3, 1)),
        ("https://twitter.com/KevinPerlow/status/1083759627714682880", date(2019, 1, 11)),
        ("https://otx.alienvault.com/pulse/5c8b8e19261a7451de02bf60/", date(2019, 3, 15)),
        ("https://www.virustotal.com/gui/file/7646c2af20190514bb/detection", None),
        ("https://securelist.com/operation-applejeus/87553/", None),
    ],
)
def test_date_from_reference_url(url: str, expected: date | None) -> None:
    assert date_from_reference_url(url) == expected
