"""Benign infrastructure: values that must never link two reports.

Two sources:

* the MISP warninglists shipped in ``pymispwarninglists`` (public DNS resolvers, CDN and cloud
  ranges, sinkholes, top sites, URL shorteners, dynamic DNS, known-good hashes, …);
* earmark's own ``data/shared_services.txt`` (request catchers, file and paste hosts, free
  hosting) that no warninglist covers.

Why not the library's own ``WarningLists.search``: it walks every list per value (the "slow"
search does a linear scan of each hostname/substring list), which costs ~50 ms per value with
all lists loaded. Attribution checks thousands of values per run, so the lists are compiled once
into sets and per-prefix-length network tables here; a lookup is a few dict probes
(measured in ``tests/test_warninglists.py``: well under 20 µs per value).

Matching follows each list's declared ``type``:

* ``string``    exact value;
* ``hostname``  the value or any name under it (``a.b.example.com`` matches ``example.com``);
  EXCEPT dynamic-DNS lists, matched exactly: ``evil.ddns.net`` is one customer's name and is
  real infrastructure; only the provider's suffix ``ddns.net`` itself is shared. Those suffixes
  are also reported by :meth:`BenignInfrastructure.customer_suffix` so the correlator never
  groups two customers under one "registered domain";
* ``substring`` the entry occurs in the value (only small lists use it; the 5k-entry
  disposable-mail list is skipped: a throw-away address is still one actor's address);
* ``cidr``      the address lies in a listed network;
* ``regex``     the list's regular expression matches (PCRE ``/…/flags`` form converted).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal
from urllib.parse import urlsplit

from earmark.errors import IntelError
from earmark.model.intel import Indicator, IndicatorType

# Lists left out on purpose, with the reason.
EXCLUDED_WARNINGLISTS: dict[str, str] = {
    # A million names include countless small sites that were compromised and used as C2 by one
    # group for years; suppressing them would hide exactly the links attribution needs.
    "Top 1,000,000 most-used sites from Tranco": "too broad: contains compromised C2 sites",
    "google-chrome-crux-1million": "too broad: contains compromised C2 sites",
    # A throw-away mailbox is still one operator's mailbox.
    "List of disposable email domains": "a disposable address still belongs to one operator",
    # VPN exits and *datacenter* ranges: most C2 servers live in datacenters.
    "Specialized list of vpn-ipv4 addresses belonging to common VPN providers and datacenters":
        "covers whole hosting providers where C2 servers live",
    "Specialized list of IPv6 addresses belonging to common VPN providers and datacenters":
        "covers whole hosting providers where C2 servers live",
}

# MISP attribute names each earmark indicator type is checked against.
_ATTRIBUTES_BY_TYPE: dict[IndicatorType, frozenset[str]] = {
    IndicatorType.IPV4: frozenset({"ip-src", "ip-dst", "domain|ip"}),
    IndicatorType.IPV6: frozenset({"ip-src", "ip-dst", "domain|ip"}),
    IndicatorType.DOMAIN: frozenset({"domain", "hostname", "domain|ip"}),
    IndicatorType.ONION: frozenset({"domain", "hostname"}),
    IndicatorType.URL: frozenset({"url", "uri"}),
    IndicatorType.EMAIL: frozenset({"email-src", "email-dst", "target-email"}),
    IndicatorType.MD5: frozenset({"md5"}),
    IndicatorType.SHA1: frozenset({"sha1"}),
    IndicatorType.SHA256: frozenset({"sha256"}),
    IndicatorType.CERT_SHA1: frozenset({"sha1", "x509-fingerprint-sha1"}),
}

SharedServiceKind = Literal["service", "suffix"]


@dataclass(frozen=True, slots=True)
class SharedService:
    host: str
    kind: SharedServiceKind
    reason: str


@dataclass(frozen=True, slots=True)
class WarninglistData:
    """One list in the shape MISP publishes it (also lets tests build small lists)."""

    name: str
    type: str  # "string", "substring", "hostname", "cidr", "regex"
    entries: tuple[str, ...]
    matching_attributes: tuple[str, ...]


SHARED_SERVICES_LIST_NAME = "earmark shared public services"


def load_shared_services(text: str | None = None) -> list[SharedService]:
    """Parse ``shared_services.txt`` (the packaged copy unless ``text`` is given)."""
    if text is None:
        text = resources.files("earmark").joinpath("data/shared_services.txt").read_text("utf-8")
    services: list[SharedService] = []
    for number, raw_line in enumerate(text.splitlines(), start=1):
        content, _, comment = raw_line.partition("#")
        fields = content.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("service", "suffix"):
            raise IntelError(f"shared services line {number}: expected '<host> service|suffix'")
        kind: SharedServiceKind = "service" if fields[1] == "service" else "suffix"
        services.append(SharedService(fields[0].lower().strip("."), kind, comment.strip()))
    return services


def _is_dynamic_dns_list(name: str) -> bool:
    return "dynamic dns" in name.lower()


def _pcre_to_python(expression: str) -> re.Pattern[str]:
    flags = 0
    if expression.startswith("/") and expression.rfind("/") > 0:
        end = expression.rfind("/")
        if "i" in expression[end + 1 :]:
            flags |= re.IGNORECASE
        expression = expression[1:end]
    return re.compile(expression.replace("\\@", "@"), flags)


class _NetworkTable:
    """Networks grouped by prefix length: a lookup masks the address once per length."""

    def __init__(self) -> None:
        self._by_prefix: dict[int, dict[int, str]] = {}

    def add(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, name: str) -> None:
        self._by_prefix.setdefault(network.prefixlen, {}).setdefault(
            int(network.network_address), name
        )

    def find(self, address: int, bits: int) -> str | None:
        for prefix, networks in self._by_prefix.items():
            mask = ((1 << prefix) - 1) << (bits - prefix) if prefix else 0
            name = networks.get(address & mask)
            if name is not None:
                return name
        return None


class BenignInfrastructure:
    """Compiled warninglists + shared services; ``is_benign`` answers with the list's name."""

    def __init__(
        self, lists: Iterable[WarninglistData], shared_services: Iterable[SharedService] = ()
    ) -> None:
        # attribute -> value -> list name
        self._exact: dict[str, dict[str, str]] = {}
        # attribute -> hostname suffix -> list name (value equal or under it)
        self._hostnames: dict[str, dict[str, str]] = {}
        self._substrings: dict[str, list[tuple[str, str]]] = {}
        self._regexes: dict[str, list[tuple[re.Pattern[str], str]]] = {}
        self._ipv4 = _NetworkTable()
        self._ipv6 = _NetworkTable()
        self._customer_suffixes: dict[str, str] = {}
        self._service_hosts: dict[str, str] = {}
        for warninglist in lists:
            self._add_list(warninglist)
        for service in shared_services:
            if service.kind == "service":
                self._service_hosts.setdefault(service.host, SHARED_SERVICES_LIST_NAME)
            else:
                self._customer_suffixes.setdefault(service.host, SHARED_SERVICES_LIST_NAME)

    def _add_list(self, warninglist: WarninglistData) -> None:
        name = warninglist.name
        attributes = warninglist.matching_attributes
        if warninglist.type == "cidr":
            for entry in warninglist.entries:
                try:
                    network = ipaddress.ip_network(entry.strip(), strict=False)
                except ValueError:
                    continue  # a few lists mix in host names; cidr lists match addresses only
                networks = self._ipv4 if network.version == 4 else self._ipv6
                networks.add(network, name)
        elif warninglist.type == "hostname" and _is_dynamic_dns_list(name):
            for entry in warninglist.entries:
                suffix = entry.strip().lower().strip(".")
                self._customer_suffixes.setdefault(suffix, name)
        elif warninglist.type == "hostname":
            for attribute in attributes:
                suffix_table = self._hostnames.setdefault(attribute, {})
                for entry in warninglist.entries:
                    suffix_table.setdefault(entry.strip().lower().strip("."), name)
        elif warninglist.type == "string":
            for attribute in attributes:
                exact_table = self._exact.setdefault(attribute, {})
                for entry in warninglist.entries:
                    exact_table.setdefault(entry.strip().lower(), name)
        elif warninglist.type == "substring":
            for attribute in attributes:
                self._substrings.setdefault(attribute, []).extend(
                    (entry.lower(), name) for entry in warninglist.entries if entry
                )
        elif warninglist.type == "regex":
            for attribute in attributes:
                self._regexes.setdefault(attribute, []).extend(
                    (_pcre_to_python(entry), name) for entry in warninglist.entries
                )

    # -- lookups -------------------------------------------------------------------------

    def is_benign(self, indicator: Indicator) -> str | None:
        """Name of the list that makes this value shared/benign, or None."""
        return self.is_benign_value(indicator.type, indicator.value)

    def is_benign_value(self, indicator_type: IndicatorType, value: str) -> str | None:
        attributes = _ATTRIBUTES_BY_TYPE.get(indicator_type)
        if attributes is None:
            return None
        value = value.strip().lower()
        if indicator_type in (IndicatorType.IPV4, IndicatorType.IPV6):
            return self._match_address(value)
        if indicator_type in (IndicatorType.DOMAIN, IndicatorType.ONION):
            return self._match_host(value, attributes)
        if indicator_type == IndicatorType.URL:
            return self._match_url(value, attributes)
        return self._match_plain(value, attributes)

    def customer_suffix(self, host: str) -> str | None:
        """The shared suffix ``host`` sits under (free hosting, dynamic DNS), if any.

        Names under such a suffix belong to different customers, so their "registered domain"
        is the name itself, not the provider's domain.
        """
        for suffix in _suffixes(host.lower().strip(".")):
            if suffix in self._customer_suffixes:
                return suffix
        return None

    def _match_address(self, value: str) -> str | None:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return None
        if address.version == 4:
            return self._ipv4.find(int(address), 32)
        return self._ipv6.find(int(address), 128)

    def _match_host(self, host: str, attributes: frozenset[str]) -> str | None:
        host = host.strip(".")
        found = self._match_plain(host, attributes)
        if found:
            return found
        exact_suffix_list = self._customer_suffixes.get(host)
        if exact_suffix_list:
            return exact_suffix_list  # the provider's own suffix; names under it are not benign
        for suffix in _suffixes(host):
            if suffix != host and suffix in self._customer_suffixes:
                # Under a free-hosting / dynamic-DNS suffix every name is a different
                # customer: a top-sites entry for the provider says nothing about them.
                break
            if suffix in self._service_hosts:
                return self._service_hosts[suffix]
            for attribute in attributes:
                name = self._hostnames.get(attribute, {}).get(suffix)
                if name:
                    return name
        return None

    def _match_url(self, url: str, attributes: frozenset[str]) -> str | None:
        found = self._match_plain(url, attributes)
        if found:
            return found
        host = _url_host(url)
        # The host-based lists (shorteners, top sites) apply to URLs too, as MISP's own
        # "hostname" semantics say; a shortener link or a top-site page links no one.
        if host:
            return self._match_host(host, attributes | {"domain", "hostname"})
        return None

    def _match_plain(self, value: str, attributes: frozenset[str]) -> str | None:
        for attribute in attributes:
            name = self._exact.get(attribute, {}).get(value)
            if name:
                return name
        for attribute in attributes:
            for fragment, name in self._substrings.get(attribute, ()):
                if fragment in value:
                    return name
            for pattern, name in self._regexes.get(attribute, ()):
                if pattern.search(value):
                    return name
        return None


def _suffixes(host: str) -> Iterator[str]:
    """``a.b.c`` → ``a.b.c``, ``b.c``, ``c``."""
    labels = host.split(".")
    for start in range(len(labels)):
        yield ".".join(labels[start:])


def _url_host(url: str) -> str | None:
    if "://" not in url:
        url = "http://" + url
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def misp_warninglists() -> list[WarninglistData]:
    """All MISP warninglists from ``pymispwarninglists`` minus :data:`EXCLUDED_WARNINGLISTS`."""
    from pymispwarninglists.api import WarningLists  # heavy (0.6 s): imported only when needed

    loaded = WarningLists(slow_search=False)
    result: list[WarninglistData] = []
    for warninglist in loaded.warninglists.values():
        if warninglist.name in EXCLUDED_WARNINGLISTS:
            continue
        result.append(
            WarninglistData(
                name=str(warninglist.name),
                type=str(warninglist.type),
                entries=tuple(str(entry) for entry in warninglist.list),
                matching_attributes=tuple(str(a) for a in warninglist.matching_attributes),
            )
        )
    return result


@cache
def default_benign_infrastructure() -> BenignInfrastructure:
    """The MISP lists plus earmark's shared services, built once per process (~2 s)."""
    return BenignInfrastructure(misp_warninglists(), load_shared_services())
