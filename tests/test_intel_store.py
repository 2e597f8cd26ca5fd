"""Threat intel in the knowledge base: real imports, idempotence, aliases, exports, and
infrastructure evidence from ingested samples (compiled in the session)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import date
from pathlib import Path

import pytest
from pymisp import MISPEvent

from earmark import intel_ops
from earmark.errors import IntelError, UsageError
from earmark.extract import analyze_file
from earmark.ingest import LabelTemplate, ingest_paths
from earmark.model.intel import Indicator, IndicatorType, IntelReport
from earmark.model.kb import Tlp
from earmark.store import SqlStore, intel_sql, open_store
from fixtures.build import FixtureBuilder
from shared_data import INTEL_DIR

stix2validator = pytest.importorskip("stix2validator")

INTEL = INTEL_DIR
ATTACK_BUNDLE = INTEL / "mitre_cti" / "enterprise-attack-compact.json"
ESET_LAZARUS = INTEL / "eset_malware-ioc" / "nukesped_lazarus"
ESET_MISP_EVENT = INTEL / "eset_malware-ioc" / "sednit" / "2018-11-20_Zebrocy.json"
MALTRAIL_LAZARUS = INTEL / "maltrail" / "trails" / "static" / "malware" / "apt_lazarus.txt"
REAL_FILES = (ATTACK_BUNDLE, ESET_LAZARUS, ESET_MISP_EVENT, MALTRAIL_LAZARUS)

pytestmark = pytest.mark.skipif(not INTEL.is_dir(), reason="shared intel data not present")

# A benign stand-in for a C2 name and address; 8.8.8.8 is on the public-DNS warninglist.
C2_SOURCE = r"""
#include <stdio.h>
#ifndef VARIANT
#define VARIANT "first"
#endif
static const char c2_host[] = "cdn.bluefrog-telemetry.net";
static const char c2_address[] = "185.220.33.17";
static const char resolver[] = "8.8.8.8";
int main(void) {
    printf("%s %s %s %s\n", c2_host, c2_address, resolver, VARIANT);
    return 0;
}
"""


@pytest.fixture(params=["sqlite", "postgres"])
def kb_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh knowledge base on each backend (postgres skipped without a test server)."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return str(tmp_path / "kb.db")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def real_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SqlStore]:
    with ExitStack() as stack:
        if request.param == "postgres":
            fresh_database = request.getfixturevalue("fresh_postgres_database")
            url = stack.enter_context(fresh_database())
        else:
            url = str(tmp_path_factory.mktemp("intel") / "kb.db")
        store = stack.enter_context(open_store(url))
        summary = intel_ops.import_intel(store, REAL_FILES)
        assert summary.failed == 0, [o.error for o in summary.outcomes]
        yield store


def test_real_files_are_imported_with_provenance(real_store: SqlStore) -> None:
    stats = real_store.intel_stats()
    assert stats.actor_profiles >= 150  # ATT&CK groups
    assert stats.relations >= 1000  # ATT&CK uses/attributed-to/alias-of
    assert stats.reports >= 600 and stats.indicators >= 6000
    reports = real_store.load_intel_reports()
    sources = {r.source for r in reports}
    assert {"eset-malware-ioc", "maltrail", "2018-11-20_Zebrocy.json"} <= sources
    three_cx = [r for r in reports if r.title == "3CX supply-chain compromise"]
    assert three_cx and three_cx[0].published == date(2023, 4, 20)
    assert three_cx[0].actors == ("Lazarus Group",) and three_cx[0].tlp is Tlp.CLEAR
    assert Indicator(IndicatorType.DOMAIN, "journalide.org") in three_cx[0].indicators
    maltrail = [r for r in reports if r.source == "maltrail"]
    assert all(r.actors == ("Lazarus Group",) for r in maltrail)
    zebrocy = [r for r in reports if r.source == "2018-11-20_Zebrocy.json"]
    assert zebrocy and zebrocy[0].indicators


def test_reimport_is_idempotent(real_store: SqlStore) -> None:
    before, revision = real_store.intel_stats(), real_store.intel_revision()
    summary = intel_ops.import_intel(real_store, REAL_FILES)
    assert summary.total("reports_added") == summary.total("reports_updated") == 0
    assert summary.total("reports_unchanged") == before.reports
    assert summary.total("actors_added") == summary.total("actors_updated") == 0
    assert real_store.intel_stats() == before
    assert real_store.intel_revision() == revision


def test_alias_search_finds_the_canonical_actor(real_store: SqlStore) -> None:
    result = intel_ops.search_intel(real_store, "Hidden Cobra")
    assert result.actor == "Lazarus Group"
    assert "ZINC" in result.aliases or "Diamond Sleet" in result.aliases
    titles = {r.title for r in result.reports}
    assert "3CX supply-chain compromise" in titles
    assert any(r.relation == "uses" for r in result.relations)
    assert result.related_values


def test_value_search_pivots_to_reports(real_store: SqlStore) -> None:
    result = intel_ops.search_intel(real_store, "journalide[.]org")
    assert result.actor is None and result.benign is None
    assert {(h.pivot, h.actor) for h in result.hits} >= {("domain", "Lazarus Group")}
    assert any(r.title == "3CX supply-chain compromise" for r in result.reports)
    assert "journalide.org" not in {i.value for i in result.related_values}
    assert intel_ops.search_intel(real_store, "8.8.8.8").benign is not None


def test_changed_report_replaces_its_rows(kb_url: str) -> None:
    report = IntelReport("r1", "case", "first", None, None, Tlp.GREEN, ("APT28",), (),
                         (Indicator(IndicatorType.DOMAIN, "old-c2.bluefrog-ops.net"),))
    with open_store(kb_url) as store:
        assert store.add_intel([report]).reports_added == 1
        changed = IntelReport("r1", "case", "second", None, None, Tlp.GREEN, ("APT28",), (),
                              (Indicator(IndicatorType.DOMAIN, "new-c2.bluefrog-ops.net"),))
        summary = store.add_intel([changed])
        assert (summary.reports_added, summary.reports_updated) == (0, 1)
        assert store.load_intel_reports() == [changed]
        assert store.intel_stats().indicators == 1


def test_failed_intel_write_leaves_nothing(
    kb_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: object) -> str:
        raise RuntimeError("interrupted")

    report = IntelReport("r1", "case", "t", None, None, Tlp.GREEN, (), (),
                         (Indicator(IndicatorType.IPV4, "185.220.33.17"),))
    from earmark.model.intel import ActorProfile

    with open_store(kb_url) as store:
        monkeypatch.setattr(intel_sql, "_write_actor", broken)
        with pytest.raises(RuntimeError):
            store.add_intel([report], [ActorProfile("X", (), (), "s")])
        monkeypatch.undo()
        assert store.intel_stats().reports == 0 and store.intel_revision() == 0


def test_taxonomy_is_applied_when_reading(kb_url: str) -> None:
    andariel = IntelReport("a1", "case", "andariel op", None, None, Tlp.GREEN, ("Andariel",), (),
                           (Indicator(IndicatorType.DOMAIN, "andariel-c2.bluefrog-ops.net"),))
    query = [Indicator(IndicatorType.DOMAIN, "andariel-c2.bluefrog-ops.net")]
    with open_store(kb_url) as store:
        store.add_intel([andariel])
        split = intel_ops.infrastructure_evidence(store, query, taxonomy="split")
        umbrella = intel_ops.infrastructure_evidence(store, query, taxonomy="umbrella")
    assert [e.actor for e in split] == ["Andariel"]
    assert [e.actor for e in umbrella] == ["Lazarus Group"]
    with pytest.raises(UsageError):
        intel_ops.resolve_taxonomy("tribal")


def test_exports_are_valid_and_withhold_red(kb_url: str, tmp_path: Path) -> None:
    red_list = tmp_path / "partner.txt"
    red_list.write_text("secret-partner-c2.example.net\n185.220.33.99\n", encoding="utf-8")
    with open_store(kb_url) as store:
        intel_ops.import_intel(store, [ESET_LAZARUS])
        intel_ops.import_intel(store, [red_list], tlp=Tlp.RED, source="partner")
        stix = intel_ops.export_intel(store, "stix", actor="Hidden Cobra")
        misp = intel_ops.export_intel(store, "misp")
        with_red = intel_ops.export_intel(store, "misp", include_red=True)
        with pytest.raises(UsageError):
            intel_ops.export_intel(store, "yaml")
    validation = stix2validator.validate_string(stix)
    assert validation.is_valid, [str(e) for e in validation.errors]
    assert "journalide.org" in stix and "secret-partner-c2" not in stix
    events = json.loads(misp)["response"]
    assert len(events) >= 4 and "secret-partner-c2" not in misp
    for document in events:
        event = MISPEvent()
        event.load(document)
        assert event.attributes
    assert "secret-partner-c2" in with_red


def test_ioc_file_gives_indicators_and_date(tmp_path: Path) -> None:
    indicators, when = intel_ops.indicators_from_ioc_file(ESET_MISP_EVENT)
    assert indicators and when == date(2018, 11, 6)
    with pytest.raises(IntelError):
        intel_ops.indicators_from_ioc_file(tmp_path / "absent.json")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(IntelError):
        intel_ops.indicators_from_ioc_file(empty)


def test_column_mapping_parsing() -> None:
    mapping = intel_ops.parse_column_mapping("value=ioc, type=kind,actor=2")
    assert mapping is not None and (mapping.value, mapping.type, mapping.actor) == (
        "ioc", "kind", "2")
    for bad in ("type=kind", "colour=3", "value="):
        with pytest.raises(UsageError):
            intel_ops.parse_column_mapping(bad)


def _c2_builds(builder: FixtureBuilder, tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "c2_strings.c"
    source.write_text(C2_SOURCE, encoding="utf-8")
    labelled = builder.build(str(source), "gcc64", "O2", name="c2_first").stripped
    query = builder.build(str(source), "gcc64", "O2", ('-DVARIANT="second"',),
                          name="c2_second").stripped
    return labelled, query


def test_sample_infrastructure_links_to_the_labelled_actor(
    builder: FixtureBuilder, kb_url: str, tmp_path: Path
) -> None:
    labelled, query = _c2_builds(builder, tmp_path)
    with open_store(kb_url) as store:
        ingest_paths(store, [labelled], LabelTemplate(actor="Hidden Cobra", family="testdoor",
                                                      source="case 17-112"))
        stored = store.load_sample_indicators()
        assert len(stored) == 1
        values = {i.value: i for i in stored[0].indicators}
        assert {"cdn.bluefrog-telemetry.net", "185.220.33.17", "8.8.8.8"} <= set(values)
        offset = values["cdn.bluefrog-telemetry.net"].offset
        assert offset is not None
        assert labelled.read_bytes()[offset:offset + 26] == b"cdn.bluefrog-telemetry.net"

        features = analyze_file(query)
        assert features.sha256 != stored[0].sha256
        indicators = intel_ops.indicators_for_sample(features)
        evidence = intel_ops.infrastructure_evidence(store, indicators,
                                                     exclude_sha256=features.sha256)
        by_value = {e.value: e for e in evidence}
        assert by_value["cdn.bluefrog-telemetry.net"].actor == "Lazarus Group"
        assert by_value["cdn.bluefrog-telemetry.net"].match_sha256 == stored[0].sha256
        assert by_value["cdn.bluefrog-telemetry.net"].family == "testdoor"
        assert by_value["185.220.33.17"].pivot == "ipv4"
        assert "8.8.8.8" not in by_value  # warninglisted: links nothing
        # The labelled sample itself, excluded, links nothing to itself.
        own = intel_ops.infrastructure_evidence(store, list(values.values()),
                                                exclude_sha256=stored[0].sha256)
        assert own == []


def test_infrastructure_index_is_cached_until_a_revision_changes(kb_url: str) -> None:
    with open_store(kb_url) as store:
        first = intel_ops.infrastructure_index(store)
        assert intel_ops.infrastructure_index(store) is first
        store.add_intel([IntelReport("x", "s", "t", None, None, Tlp.GREEN, (), (),
                                     (Indicator(IndicatorType.IPV4, "185.220.33.18"),))])
        assert intel_ops.infrastructure_index(store) is not first
