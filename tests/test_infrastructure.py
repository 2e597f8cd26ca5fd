"""Infrastructure correlation: pivots, suppression, over-correlation cap, time decay, ranking."""

from __future__ import annotations

from datetime import date

import pytest

from earmark.correlate.infrastructure import (
    CorrelationSettings,
    InfrastructureIndex,
    rank_actors,
)
from earmark.intel.warninglists import BenignInfrastructure, WarninglistData, load_shared_services
from earmark.model.intel import Indicator, IndicatorType, IntelReport
from earmark.model.kb import Tlp

D = IndicatorType.DOMAIN
IP = IndicatorType.IPV4


def report(report_id: str, actor: str, published: date | None, *values: tuple[IndicatorType, str]
           ) -> IntelReport:
    return IntelReport(report_id, "test", f"report {report_id}", None, published, Tlp.CLEAR,
                       (actor,), (), tuple(Indicator(kind, value) for kind, value in values))


@pytest.fixture
def benign() -> BenignInfrastructure:
    dns = WarninglistData("public DNS", "cidr", ("8.8.8.8/32",), ("ip-dst",))
    return BenignInfrastructure.from_lists([dns], load_shared_services())


def test_exact_and_weak_pivots_carry_their_strength(benign: BenignInfrastructure) -> None:
    index = InfrastructureIndex.from_reports(
        [report("r1", "Lazarus Group", date(2020, 1, 1), (D, "c2.evil-corp.com"),
                (IP, "203.0.113.10"), (IndicatorType.URL, "http://x.example/wp/panel/gate2.php"))],
        benign,
    )
    evidence = index.correlate([
        Indicator(D, "c2.evil-corp.com"),
        Indicator(D, "mail.evil-corp.com"),
        Indicator(IP, "203.0.113.99"),
        Indicator(IndicatorType.URL, "https://other.example/wp/panel/gate2.php"),
    ])
    by_value = {e.value: e for e in evidence}
    assert by_value["c2.evil-corp.com"].pivot == "domain"
    assert by_value["c2.evil-corp.com"].weight == 1.0
    assert by_value["mail.evil-corp.com"].pivot == "registered-domain"
    assert by_value["203.0.113.99"].pivot == "ipv4-/24"
    assert by_value["https://other.example/wp/panel/gate2.php"].pivot == "url-path"
    assert by_value["c2.evil-corp.com"].weight > by_value["mail.evil-corp.com"].weight \
        > by_value["203.0.113.99"].weight
    assert "exact domain c2.evil-corp.com; seen in 'report r1' 2020-01; 1 actor" in \
        by_value["c2.evil-corp.com"].reason
    assert all(e.kind == "infrastructure" and e.actor == "Lazarus Group" for e in evidence)


def test_benign_values_and_customer_suffixes_do_not_link(benign: BenignInfrastructure) -> None:
    index = InfrastructureIndex.from_reports(
        [report("r1", "APT37", date(2020, 1, 1), (IP, "8.8.8.8"), (D, "webhook.site"),
                (D, "alpha.ddns.net"), (D, "panel.mireene.com"))],
        benign,
    )
    evidence = index.correlate([Indicator(IP, "8.8.8.8"), Indicator(D, "webhook.site"),
                                Indicator(D, "beta.ddns.net"), Indicator(D, "other.mireene.com")])
    assert evidence == []
    # a customer's own name still links exactly
    assert [e.pivot for e in index.correlate([Indicator(D, "alpha.ddns.net")])] == ["domain"]


def test_over_correlation_divides_and_caps(benign: BenignInfrastructure) -> None:
    settings = CorrelationSettings(max_actors_per_key=3)
    shared = (D, "shared-c2.example")
    two = InfrastructureIndex.from_reports(
        [report("a", "A", None, shared), report("b", "B", None, shared)], benign, settings)
    weights = {e.actor: e.weight for e in two.correlate([Indicator(*shared)])}
    assert weights == {"A": 0.5, "B": 0.5}
    many = InfrastructureIndex.from_reports(
        [report(str(i), f"actor{i}", None, shared) for i in range(4)], benign, settings)
    assert many.correlate([Indicator(*shared)]) == []


def test_time_decay_halves_per_half_life(benign: BenignInfrastructure) -> None:
    settings = CorrelationSettings(half_life_days=730.0, undated_factor=0.5)
    index = InfrastructureIndex.from_reports(
        [report("old", "A", date(2016, 1, 1), (D, "old.example")),
         report("undated", "B", None, (D, "undated.example"))], benign, settings)
    at = date(2016, 1, 1).replace(year=2018)  # 731 days later
    old = index.correlate([Indicator(D, "old.example")], at=at)[0]
    assert old.weight == pytest.approx(0.5 ** (731 / 730))
    undated = index.correlate([Indicator(D, "undated.example")], at=at)[0]
    assert undated.weight == 0.5
    assert index.correlate([Indicator(D, "old.example")])[0].weight == 1.0  # no date asked


def test_eligible_restricts_the_knowledge_base_and_the_actor_count(
    benign: BenignInfrastructure,
) -> None:
    shared = (D, "shared-c2.example")
    index = InfrastructureIndex.from_reports(
        [report("early", "A", date(2019, 1, 1), shared),
         report("late", "B", date(2021, 1, 1), shared)], benign)
    evidence = index.correlate([Indicator(*shared)], eligible=lambda o: o.report_id == "early")
    assert [(e.actor, e.weight) for e in evidence] == [("A", 1.0)]


def test_rank_actors_noisy_or_counts_each_key_once(benign: BenignInfrastructure) -> None:
    index = InfrastructureIndex.from_reports(
        [report("1", "A", None, (D, "a1.example"), (D, "a2.example")),
         report("2", "A", None, (D, "a1.example")),
         report("3", "B", None, (IP, "198.51.100.7"))], benign)
    evidence = index.correlate([Indicator(D, "a1.example"), Indicator(IP, "198.51.100.9")])
    ranking = rank_actors(evidence)
    assert ranking[0].actor == "A" and ranking[0].score == 1.0
    assert ranking[0].evidence_count == 2  # two reports, one key
    assert ranking[1].actor == "B" and ranking[1].score == pytest.approx(0.3)


def test_search_returns_every_link(benign: BenignInfrastructure) -> None:
    index = InfrastructureIndex.from_reports(
        [report("1", "A", None, (D, "www.evil-corp.com")),
         report("2", "B", None, (D, "cdn.evil-corp.com"))], benign)
    links = index.search("www.evil-corp.com")
    assert {(link.pivot, link.observation.actor) for link in links} == {
        ("domain", "A"), ("registered-domain", "A"), ("registered-domain", "B")}
    assert index.search("8.8.8.8") == []
