"""Infrastructure correlation: which known activity shares an IP, domain, URL, mail, hash…

An :class:`InfrastructureIndex` maps pivot keys to the observations (report, actor, date) that
carry them. A query indicator links to an observation through one pivot:

=================== ======== ==========================================================
pivot               strength why
=================== ======== ==========================================================
ipv4/ipv6, domain,  1.0      the same server name/address, mailbox, file, certificate
url, email, onion,           or wallet: exact reuse
md5/sha1/sha256,
cert-sha1, wallet
registered-domain   0.6      sibling names under one registrant's domain
                             (``a.evil.com``/``b.evil.com``); never across a
                             free-hosting or dynamic-DNS suffix (customers differ)
url-path            0.4      the same distinctive server path on another host
                             (same panel/kit); generic paths never count
ipv4-/24            0.3      neighbouring addresses: same rented block is common for
                             one operator, but hosting providers pack strangers too
=================== ======== ==========================================================

Discounts, multiplied into the strength to give ``Evidence.weight``:

* warninglisted / shared-service values never link (``intel.warninglists``);
* over-correlation: a key seen with *n* distinct actors weighs ``1/n``, and 0 above
  ``max_actors_per_key`` (a value everyone uses proves nothing);
* time decay: ``0.5 ** (|Δdays| / half_life_days)`` with a two-year half-life (infrastructure
  is re-rented, domains expire and are re-registered); undated observations get a fixed
  ``undated_factor`` when the query has a date.

Per actor, the evidence is combined by noisy-OR over distinct matched keys (the strongest item
per key), so one value repeated in ten reports counts once.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from urllib.parse import urlsplit

from earmark.intel.public_suffixes import host_parts
from earmark.intel.warninglists import BenignInfrastructure, default_benign_infrastructure
from earmark.model.evidence import Evidence
from earmark.model.intel import Indicator, IndicatorType, IntelReport

_EXACT_PIVOTS: dict[IndicatorType, str] = {
    IndicatorType.IPV4: "ipv4",
    IndicatorType.IPV6: "ipv6",
    IndicatorType.DOMAIN: "domain",
    IndicatorType.ONION: "onion",
    IndicatorType.URL: "url",
    IndicatorType.EMAIL: "email",
    IndicatorType.MD5: "md5",
    IndicatorType.SHA1: "sha1",
    IndicatorType.SHA256: "sha256",
    IndicatorType.CERT_SHA1: "cert-sha1",
    IndicatorType.BITCOIN: "wallet",
    IndicatorType.MONERO: "wallet",
}
# Paths every web app or kit has; sharing one links nobody.
GENERIC_URL_PATHS = frozenset(
    {"/", "/index.php", "/index.html", "/index.htm", "/admin.php", "/login.php", "/gate.php",
     "/upload.php", "/post.php", "/api", "/api/", "/favicon.ico", "/robots.txt", "/wp-login.php",
     "/wp-admin/admin-ajax.php", "/xmlrpc.php", "/default.aspx", "/search", "/login"}
)


@dataclass(frozen=True, slots=True)
class CorrelationSettings:
    """Weights and discounts; see the module docstring for the reasons."""

    exact_strength: float = 1.0
    registered_domain_strength: float = 0.6
    url_path_strength: float = 0.4
    ipv4_block_strength: float = 0.3
    # Above this many distinct actors a key is shared infrastructure, not a link.
    max_actors_per_key: int = 3
    # Two years: typical C2 domain registration + re-use span in public reporting.
    half_life_days: float = 730.0
    # Undated observation compared with a dated query: we cannot tell how far apart they are.
    undated_factor: float = 0.5
    # URL paths shorter than this are too common to pivot on (``/a.php``).
    min_url_path_length: int = 10


@dataclass(frozen=True, slots=True)
class Observation:
    """One indicator as seen in one report (or one sample)."""

    indicator: Indicator
    report_id: str
    title: str
    actor: str | None
    family: str | None
    observed_at: date | None


@dataclass(frozen=True, slots=True)
class Link:
    """A pivot from a value to an observation (what :meth:`InfrastructureIndex.search` yields)."""

    pivot: str
    key: str
    observation: Observation


@dataclass(frozen=True, slots=True)
class ActorScore:
    actor: str
    score: float  # 0..1, noisy-OR of evidence weights over distinct matched keys
    evidence_count: int


def _url_parts(url: str) -> tuple[str, str] | None:
    """(host, path) of a URL value, with or without scheme."""
    text = url if "://" in url else "http://" + url
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return None
    if not host:
        return None
    return host.lower().strip("."), parts.path or "/"


class InfrastructureIndex:
    """Pivot key → observations, with benign values removed at insertion."""

    def __init__(
        self,
        benign: BenignInfrastructure | None = None,
        settings: CorrelationSettings | None = None,
    ) -> None:
        self._benign = benign if benign is not None else default_benign_infrastructure()
        self.settings = settings or CorrelationSettings()
        self._by_key: dict[tuple[str, str], list[Observation]] = defaultdict(list)
        self.suppressed: dict[str, int] = defaultdict(int)  # list name → values dropped

    @classmethod
    def from_reports(
        cls,
        reports: Iterable[IntelReport],
        benign: BenignInfrastructure | None = None,
        settings: CorrelationSettings | None = None,
    ) -> InfrastructureIndex:
        index = cls(benign, settings)
        for report in reports:
            index.add_report(report)
        return index

    def add_report(self, report: IntelReport) -> None:
        actors = report.actors or (None,)
        family = report.families[0] if report.families else None
        for indicator in report.indicators:
            for actor in actors:
                self.add_observation(Observation(
                    indicator, report.report_id, report.title, actor, family, report.published
                ))

    def add_observation(self, observation: Observation) -> None:
        """Also the entry point for sample-derived observations (a C2 seen in a sample)."""
        for pivot, key in self.pivot_keys(observation.indicator):
            self._by_key[(pivot, key)].append(observation)

    def pivot_keys(self, indicator: Indicator) -> list[tuple[str, str]]:
        """Every (pivot, key) the indicator can link through; empty when it is benign."""
        listed = self._benign.is_benign(indicator)
        if listed:
            self.suppressed[listed] += 1
            return []
        value = indicator.value.strip().lower()
        exact = _EXACT_PIVOTS.get(indicator.type)
        if exact is None:
            return []  # mutexes, pipes, user agents: not infrastructure
        if indicator.type == IndicatorType.URL:
            return self._url_keys(value)
        keys = [(exact, value)]
        if indicator.type == IndicatorType.DOMAIN:
            keys.extend(self._registered_domain_keys(value))
        elif indicator.type == IndicatorType.IPV4:
            keys.extend(_ipv4_block_keys(value))
        return keys

    def _url_keys(self, url: str) -> list[tuple[str, str]]:
        parts = _url_parts(url)
        if parts is None:
            return []
        host, path = parts
        # The scheme is dropped: sources disagree on it for the same server path.
        keys = [("url", host + path)]
        host_indicator = _host_indicator(host)
        if host_indicator and not self._benign.is_benign(host_indicator):
            keys.append((_EXACT_PIVOTS[host_indicator.type], host))
            if host_indicator.type == IndicatorType.DOMAIN:
                keys.extend(self._registered_domain_keys(host))
            elif host_indicator.type == IndicatorType.IPV4:
                keys.extend(_ipv4_block_keys(host))
        if len(path) >= self.settings.min_url_path_length and path not in GENERIC_URL_PATHS:
            keys.append(("url-path", path))
        return keys

    def _registered_domain_keys(self, host: str) -> list[tuple[str, str]]:
        if self._benign.customer_suffix(host):
            return []  # under free hosting / dynamic DNS each name is its own registrant
        # Private suffixes (blogspot.com, github.io…) count: customers under them are
        # unrelated.
        registered = host_parts(host, private=True).top_domain
        if not registered:
            return []
        # Indexed even when the name *is* the registered domain, so ``evil.com`` and
        # ``www.evil.com`` meet; the exact pivot outranks this one when both match.
        if self._benign.is_benign_value(IndicatorType.DOMAIN, registered):
            return []  # sub-domains of a top site or shared service say nothing
        return [("registered-domain", registered)]

    # -- queries -------------------------------------------------------------------------

    def search(self, value: str | Indicator) -> list[Link]:
        """Everything linked to a value through any pivot, for analyst pivoting."""
        indicator = value if isinstance(value, Indicator) else _guess_indicator(value)
        if indicator is None:
            return []
        return [
            Link(pivot, key, observation)
            for pivot, key in self.pivot_keys(indicator)
            for observation in self._by_key.get((pivot, key), ())
        ]

    def correlate(
        self,
        indicators: Iterable[Indicator],
        at: date | None = None,
        eligible: Callable[[Observation], bool] | None = None,
    ) -> list[Evidence]:
        """Evidence for each (query value, report) pair, strongest pivot only.

        ``eligible`` restricts the knowledge base (e.g. to reports published before ``at``);
        the over-correlation count uses only eligible observations, so nothing leaks.
        """
        best: dict[tuple[str, str, str | None], Evidence] = {}
        for indicator in dict.fromkeys(indicators):
            for pivot, key in self.pivot_keys(indicator):
                observations = [
                    o for o in self._by_key.get((pivot, key), ()) if not eligible or eligible(o)
                ]
                if not observations:
                    continue
                actor_count = len({o.actor for o in observations if o.actor}) or 1
                for observation in observations:
                    evidence = self._evidence(indicator, pivot, key, observation, actor_count, at)
                    slot = (indicator.value, observation.report_id, observation.actor)
                    if evidence.weight > 0 and (
                        slot not in best or evidence.weight > best[slot].weight
                    ):
                        best[slot] = evidence
        return sorted(best.values(), key=lambda e: (-e.weight, e.actor or "", e.value or ""))

    def _evidence(
        self,
        indicator: Indicator,
        pivot: str,
        key: str,
        observation: Observation,
        actor_count: int,
        at: date | None,
    ) -> Evidence:
        settings = self.settings
        strength = {
            "registered-domain": settings.registered_domain_strength,
            "url-path": settings.url_path_strength,
            "ipv4-/24": settings.ipv4_block_strength,
        }.get(pivot, settings.exact_strength)
        sharing = 0.0 if actor_count > settings.max_actors_per_key else 1.0 / actor_count
        decay, when = self._decay(observation.observed_at, at)
        seen = observation.observed_at.strftime("%Y-%m") if observation.observed_at else "undated"
        reason = (
            f"{'exact ' + pivot if strength == settings.exact_strength else pivot} {key}; "
            f"seen in '{observation.title}' {seen}; {actor_count} actor"
            f"{'s' if actor_count != 1 else ''}{when}"
        )
        return Evidence(
            kind="infrastructure",
            actor=observation.actor,
            family=observation.family,
            similarity=strength,
            weight=strength * sharing * decay,
            reason=reason,
            pivot=pivot,
            value=indicator.value,
            matched_value=key,
            report_id=observation.report_id,
            observed_at=observation.observed_at,
        )

    def _decay(self, observed: date | None, at: date | None) -> tuple[float, str]:
        if at is None:
            return 1.0, ""
        if observed is None:
            return self.settings.undated_factor, "; undated"
        days = abs((at - observed).days)
        factor = 0.5 ** (days / self.settings.half_life_days)
        return factor, f"; {days} days apart"


def rank_actors(evidence: Iterable[Evidence]) -> list[ActorScore]:
    """Actors by noisy-OR of their evidence, one term per distinct matched key (its best)."""
    best: dict[str, dict[tuple[str | None, str | None], float]] = defaultdict(dict)
    counts: dict[str, int] = defaultdict(int)
    for item in evidence:
        if item.actor is None or item.weight <= 0:
            continue
        counts[item.actor] += 1
        slot = (item.pivot, item.matched_value)
        best[item.actor][slot] = max(best[item.actor].get(slot, 0.0), item.weight)
    scores = []
    for actor, weights in best.items():
        miss = 1.0
        for weight in weights.values():
            miss *= 1.0 - min(weight, 1.0)
        scores.append(ActorScore(actor, 1.0 - miss, counts[actor]))
    return sorted(scores, key=lambda s: (-s.score, -s.evidence_count, s.actor))


def _ipv4_block_keys(address: str) -> list[tuple[str, str]]:
    try:
        network = ipaddress.ip_network(f"{address}/24", strict=False)
    except ValueError:
        return []
    return [("ipv4-/24", str(network))]


def _host_indicator(host: str) -> Indicator | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if "." not in host:
            return None
        kind = IndicatorType.ONION if host.endswith(".onion") else IndicatorType.DOMAIN
        return Indicator(kind, host)
    return Indicator(IndicatorType.IPV4 if address.version == 4 else IndicatorType.IPV6, host)


def _guess_indicator(value: str) -> Indicator | None:
    text = value.strip().lower()
    if "/" in text:
        return Indicator(IndicatorType.URL, text)
    if "@" in text:
        return Indicator(IndicatorType.EMAIL, text)
    hex_types = {32: IndicatorType.MD5, 40: IndicatorType.SHA1, 64: IndicatorType.SHA256}
    if len(text) in hex_types and all(c in "0123456789abcdef" for c in text):
        return Indicator(hex_types[len(text)], text)
    return _host_indicator(text)


__all__ = [
    "ActorScore",
    "CorrelationSettings",
    "InfrastructureIndex",
    "Link",
    "Observation",
    "rank_actors",
]
