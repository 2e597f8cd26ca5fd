"""Intel importers on real files (ATT&CK, ESET MISP events) and on files built in the test."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, datetime
from pathlib import Path

import pytest
import stix2

from earmark.errors import IntelError
from earmark.intel.importers import (
    ColumnMapping,
    ImportResult,
    detect_format,
    import_file,
    indicators_from_pattern,
)
from earmark.model.intel import Indicator
from earmark.model.intel import IndicatorType as T
from earmark.model.kb import Tlp
from shared_data import INTEL_DIR

INTEL = INTEL_DIR
ATTACK_BUNDLE = INTEL / "mitre_cti" / "enterprise-attack-compact.json"
LAZARUS_MISP = INTEL / "eset_malware-ioc" / "nukesped_lazarus" / "lazarus_3cx.json"
SSHDOOR_MISP = INTEL / "eset_malware-ioc" / "sshdoor" / "misp-events" / "jakku.json"
BROKEN_JSON = (INTEL / "eset_malware-ioc" / "pypi_backdoor"
               / "malicious_pypi_packages.misp-event.json")


@pytest.fixture(scope="module")
def attack() -> ImportResult:
    return import_file(ATTACK_BUNDLE)


def test_attack_groups_software_and_uses(attack: ImportResult) -> None:
    names = {a.name for a in attack.actors}
    # 187 intrusion sets in v18.1, less revoked and deprecated ones.
    assert 160 <= len(attack.actors) <= 187
    assert {"Lazarus Group", "APT28", "Andariel", "APT38", "Kimsuky"} <= names
    lazarus = next(a for a in attack.actors if a.name == "Lazarus Group")
    assert "G0032" in lazarus.external_ids
    assert {"HIDDEN COBRA", "ZINC", "Diamond Sleet"} <= set(lazarus.aliases)
    uses = {(r.source_name, r.target_name) for r in attack.relations if r.relation == "uses"}
    assert ("Lazarus Group", "WannaCry") in uses
    assert sum(1 for r in attack.relations if r.relation == "uses") == 1253  # stats.json
    assert ("Trojan Manuscript", "Bankshot") in {
        (r.source_name, r.target_name) for r in attack.relations if r.relation == "alias-of"}
    (report,) = attack.reports
    assert report.tlp is Tlp.CLEAR and report.indicators == ()
    assert all(r.report_id == report.report_id for r in attack.relations)


def test_misp_event_from_eset() -> None:
    result = import_file(LAZARUS_MISP, source="eset-malware-ioc")
    (report,) = result.reports
    assert report.actors == ("Lazarus Group",)
    assert report.published == date(2023, 4, 20)
    assert report.title.startswith("Linux malware strengthen links between Lazarus")
    assert report.tlp is Tlp.AMBER  # no tlp tag: the default
    types = {i.type for i in report.indicators}
    assert T.SHA1 in types
    assert all(i.offset is None for i in report.indicators)


def test_misp_event_without_response_wrapper() -> None:
    (report,) = import_file(SSHDOOR_MISP).reports
    assert report.published == date(2018, 10, 10)
    assert report.indicators


def test_misp_tags_and_objects(tmp_path: Path) -> None:
    event = {"Event": {
        "uuid": "11111111-2222-3333-4444-555555555555", "info": "test event", "date": "2024-01-02",
        "Tag": [{"name": "tlp:green"}, {"name": 'misp-galaxy:threat-actor="Hidden Cobra"'},
                {"name": 'misp-galaxy:malpedia="Contopee"'}],
        "Attribute": [{"type": "domain|ip", "value": "evil-c2.com|45.77.1.2"},
                      {"type": "link", "value": "https://vendor.example/report"},
                      {"type": "filename|sha256", "value": "a.exe|" + "ab" * 32}],
        "Object": [{"Attribute": [{"type": "url", "value": "hxxp://evil-c2[.]com/gate"}]}],
    }}
    path = tmp_path / "event.json"
    path.write_text(json.dumps([event]))
    (report,) = import_file(path).reports
    assert report.tlp is Tlp.GREEN
    assert report.actors == ("Lazarus Group",) and report.families == ("Contopee",)
    assert report.reference == "https://vendor.example/report"
    assert {(i.type, i.value) for i in report.indicators} == {
        (T.DOMAIN, "evil-c2.com"), (T.IPV4, "45.77.1.2"), (T.SHA256, "ab" * 32),
        (T.URL, "http://evil-c2.com/gate")}
    # A caller's TLP tightens the file's marking, never loosens it.
    assert import_file(path, tlp=Tlp.RED).reports[0].tlp is Tlp.RED
    assert import_file(path, tlp=Tlp.CLEAR).reports[0].tlp is Tlp.GREEN


def _stix_bundle() -> stix2.Bundle:
    created = datetime(2024, 3, 1, 12, 0, 0)
    actor = stix2.IntrusionSet(name="Fancy Bear", aliases=["Sofacy"], created=created)
    malware = stix2.Malware(name="Zebrocy", is_family=True, created=created)
    indicator = stix2.Indicator(
        name="C2", pattern_type="stix", valid_from=created,
        pattern="[ipv4-addr:value = '45.77.1.2'] OR ([domain-name:value = 'zebro-c2.com'] AND "
                "[file:hashes.'SHA-256' = '" + "cd" * 32 + "']) OR "
                "[x509-certificate:hashes.'SHA-1' = '" + "ef" * 20 + "']",
        object_marking_refs=[stix2.TLP_GREEN])
    url = stix2.URL(value="http://zebro-c2.com/upload")
    uses = stix2.Relationship(actor, "uses", malware)
    indicates = stix2.Relationship(indicator, "indicates", malware)
    report = stix2.Report(
        name="Sednit strikes again", published=datetime(2024, 3, 5), created=created,
        object_refs=[actor.id, malware.id, indicator.id, uses.id],
        external_references=[{"source_name": "vendor", "url": "https://vendor.example/sednit"}],
        object_marking_refs=[stix2.TLP_AMBER])
    return stix2.Bundle(actor, malware, indicator, url, uses, indicates, report)


def test_stix_bundle_built_with_stix2(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(_stix_bundle().serialize())
    result = import_file(path)
    report = next(r for r in result.reports if r.title == "Sednit strikes again")
    assert report.actors == ("APT28",) and report.families == ("Zebrocy",)
    assert report.published == date(2024, 3, 5)
    assert report.reference == "https://vendor.example/sednit"
    assert report.tlp is Tlp.AMBER  # strictest of the report's and its members' markings
    assert {(i.type, i.value) for i in report.indicators} == {
        (T.IPV4, "45.77.1.2"), (T.DOMAIN, "zebro-c2.com"), (T.SHA256, "cd" * 32),
        (T.CERT_SHA1, "ef" * 20)}
    leftover = next(r for r in result.reports if r is not report)  # the URL observable
    assert leftover.indicators == (Indicator(T.URL, "http://zebro-c2.com/upload"),)
    relations = {(r.source_name, r.relation, r.target_name) for r in result.relations}
    assert ("APT28", "uses", "Zebrocy") in relations
    assert any(r.relation == "indicates" and r.target_name == "Zebrocy" for r in result.relations)
    (actor,) = result.actors
    assert actor.name == "APT28" and "Sofacy" in actor.aliases


def test_stix_pattern_parsing() -> None:
    assert indicators_from_pattern("[email-addr:value = 'a@evil.com'] AND "
                                   "[url:value = 'http://evil.com/x']") == [
        Indicator(T.EMAIL, "a@evil.com"), Indicator(T.URL, "http://evil.com/x")]
    with pytest.raises(IntelError):
        indicators_from_pattern("[ipv4-addr:value = ")


def test_csv_with_header_and_mapping(tmp_path: Path) -> None:
    path = tmp_path / "iocs.csv"
    path.write_text("indicator,kind,group,first_seen\n"
                    "evil-c2.com,domain,Hidden Cobra,2024-02-01\n"
                    "45.77.1.2,ip,Hidden Cobra,2024-02-01\n"
                    "Global\\Mtx_1,mutex,APT 28,2024-02-03\n"
                    "not an ioc,?,APT 28,2024-02-03\n")
    result = import_file(path, mapping=ColumnMapping(value="indicator", type="kind",
                                                     actor="group", date="first_seen"))
    by_actor = {r.actors: r for r in result.reports}
    assert set(by_actor) == {("Lazarus Group",), ("APT28",)}
    lazarus = by_actor[("Lazarus Group",)]
    assert lazarus.published == date(2024, 2, 1)
    assert {i.value for i in lazarus.indicators} == {"evil-c2.com", "45.77.1.2"}
    assert by_actor[("APT28",)].indicators == (Indicator(T.MUTEX, "Global\\Mtx_1"),)
    assert len(result.warnings) == 1 and ":5:" in result.warnings[0]
    auto = import_file(path)  # columns found by their names
    assert {r.actors for r in auto.reports} == set(by_actor)


def test_txt_list(tmp_path: Path) -> None:
    path = tmp_path / "iocs.txt"
    path.write_text("# C2 list\nevil[.]com\n45.77.1.2  # first stage\nhxxp://bad.ru/a\n")
    assert detect_format(path, path.read_text()) == "txt"
    (report,) = import_file(path, tlp=Tlp.GREEN, published=date(2024, 1, 1)).reports
    assert [i.value for i in report.indicators] == ["evil.com", "45.77.1.2", "http://bad.ru/a"]
    assert report.tlp is Tlp.GREEN and report.published == date(2024, 1, 1)


def test_report_text(tmp_path: Path) -> None:
    path = tmp_path / "report.txt"
    path.write_text(
        "Operation Sleepy Fox\n\nWe attribute this campaign to HIDDEN COBRA, also tracked as "
        "Labyrinth Chollima. The implant (version 1.2.3.4) loads kernel32.dll and beacons to "
        "update-check[.]net and 45.77.1.2. Unlike APT 28, it uses no exploits.\n")
    assert detect_format(path, path.read_text()) == "text"
    (report,) = import_file(path).reports
    assert report.title == "Operation Sleepy Fox"
    assert report.actors == ("Lazarus Group", "APT28")
    assert {i.value for i in report.indicators} == {"update-check.net", "45.77.1.2"}


def test_report_ids_are_stable(tmp_path: Path) -> None:
    first = import_file(LAZARUS_MISP, source="eset")
    again = import_file(LAZARUS_MISP, source="eset")
    other_source = import_file(LAZARUS_MISP, source="someone-else")
    assert first.reports[0].report_id == again.reports[0].report_id
    assert first.reports[0].report_id != other_source.reports[0].report_id
    path = tmp_path / "bundle.json"
    path.write_text(_stix_bundle().serialize())
    assert [r.report_id for r in import_file(path).reports] == [
        r.report_id for r in import_file(path).reports]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"{not json", "JSON"), (b'{"hello": 1}', "neither"),
     (b'{"type": "bundle", "objects": 3}', "objects")],
)
def test_unreadable_input_raises_intel_error(tmp_path: Path, content: bytes, message: str
                                             ) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(IntelError, match=message):
        import_file(path)


def test_real_broken_json_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IntelError, match="JSON"):
        import_file(BROKEN_JSON)
    with pytest.raises(IntelError, match="cannot read"):
        import_file(tmp_path / "missing.json")


def test_importers_load_on_first_use() -> None:
    # A fresh interpreter: the CLI reads TLP words through importers.common, and must not load
    # stix2 for it; every public name still resolves.
    code = (
        "import sys\n"
        "import earmark.cli\n"
        "assert 'stix2' not in sys.modules, 'stix2 loaded by the CLI'\n"
        "import earmark.intel.importers as importers\n"
        "assert set(importers.__all__) <= set(dir(importers))\n"
        "assert all(callable(getattr(importers, name)) for name in importers.__all__)\n"
        "assert 'stix2' in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
