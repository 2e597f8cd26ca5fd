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

The lists are compiled once per installation into a sorted hash table (``warninglist_tables``;
cached under ``$EARMARK_CACHE_DIR``) that a process reads a block at a time, so it pays neither
the ~3 s compile nor its ~300 MB of dicts, and keeps ~2 MB of it in memory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from earmark.errors import IntelError
from earmark.intel.warninglist_tables import (
    WARNINGLIST_TABLES_VERSION,
    WarninglistData,
    WarninglistTables,
    compile_warninglists,
    load_tables,
    network_key,
    probe_keys,
    save_tables,
)
from earmark.model.intel import Indicator, IndicatorType

__all__ = [
    "CACHE_DIR_ENV_VAR",
    "EXCLUDED_WARNINGLISTS",
    "SHARED_SERVICES_LIST_NAME",
    "BenignInfrastructure",
    "SharedService",
    "WarninglistData",
    "default_benign_infrastructure",
    "default_warninglist_tables",
    "load_shared_services",
    "misp_warninglists",
]

# Where compiled warninglists are kept (one directory per set of lists and format version);
# default ``$XDG_CACHE_HOME/earmark`` or ``~/.cache/earmark``. Unwritable: compiled per process.
CACHE_DIR_ENV_VAR: Final = "EARMARK_CACHE_DIR"

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


def _pcre_to_python(expression: str) -> re.Pattern[str]:
    flags = 0
    if expression.startswith("/") and expression.rfind("/") > 0:
        end = expression.rfind("/")
        if "i" in expression[end + 1 :]:
            flags |= re.IGNORECASE
        expression = expression[1:end]
    return re.compile(expression.replace("\\@", "@"), flags)


class BenignInfrastructure:
    """Compiled warninglists + shared services; ``is_benign`` answers with the list's name."""

    def __init__(
        self, tables: WarninglistTables, shared_services: Iterable[SharedService] = ()
    ) -> None:
        self._tables = tables
        self._substrings = tables.substrings
        self._regexes = {
            attribute: tuple((_pcre_to_python(text), tables.names[owner]) for text, owner in pairs)
            for attribute, pairs in tables.regexes.items()
        }
        # Shared services come after the lists: a list naming the same host wins.
        self._customer_suffixes: dict[str, str] = {}
        self._service_hosts: dict[str, str] = {}
        for service in shared_services:
            if service.kind == "service":
                self._service_hosts.setdefault(service.host, SHARED_SERVICES_LIST_NAME)
            else:
                self._customer_suffixes.setdefault(service.host, SHARED_SERVICES_LIST_NAME)

    @classmethod
    def from_lists(
        cls, lists: Iterable[WarninglistData], shared_services: Iterable[SharedService] = ()
    ) -> BenignInfrastructure:
        """Compile ``lists`` in memory (tests, benchmarks); earmark itself reads the cached
        tables (``default_benign_infrastructure``)."""
        return cls(compile_warninglists(lists), shared_services)

    def _customer_names(self, suffixes: list[str]) -> list[str | None]:
        """The list making each name a shared customer suffix (lists first), or None."""
        listed = self._tables.find(
            [probe_keys("customer", suffix, ("",))[0] for suffix in suffixes]
        )
        return [
            name or self._customer_suffixes.get(suffix)
            for suffix, name in zip(suffixes, listed, strict=True)
        ]

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
        suffixes = list(_suffixes(host.lower().strip(".")))
        for suffix, name in zip(suffixes, self._customer_names(suffixes), strict=True):
            if name:
                return suffix
        return None

    def _match_address(self, value: str) -> str | None:
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return None
        bits, number = address.max_prefixlen, int(address)
        prefixes = self._tables.prefixes.get(address.version, ())
        keys = [
            network_key(address.version, prefix, number & (((1 << prefix) - 1) << (bits - prefix)))
            for prefix in prefixes
        ]
        # Prefix lengths in the order lists added them, as the first match decides the name.
        return next((name for name in self._tables.find(keys) if name), None)

    def _match_host(self, host: str, attributes: frozenset[str]) -> str | None:
        host = host.strip(".")
        ordered = tuple(attributes)
        suffixes = list(_suffixes(host))
        # One binary search for every probe (exact value, customer suffixes, listed
        # suffixes), read below in the order the rules apply.
        keys = probe_keys("exact", host, ordered)
        keys += [probe_keys("customer", suffix, ("",))[0] for suffix in suffixes]
        for suffix in suffixes:
            keys += probe_keys("host", suffix, ordered)
        names = self._tables.find(keys)
        exact, listed_customers = names[: len(ordered)], names[len(ordered) :][: len(suffixes)]
        listed = iter(names[len(ordered) + len(suffixes) :])
        found = next((name for name in exact if name), None) or self._match_fragments(
            host, ordered
        )
        if found:
            return found
        customers = [
            name or self._customer_suffixes.get(suffix)
            for suffix, name in zip(suffixes, listed_customers, strict=True)
        ]
        if customers[0]:
            return customers[0]  # the provider's own suffix; names under it are not benign
        for suffix, customer in zip(suffixes, customers, strict=True):
            if suffix != host and customer:
                # Under a free-hosting / dynamic-DNS suffix every name is a different
                # customer: a top-sites entry for the provider says nothing about them.
                break
            if suffix in self._service_hosts:
                return self._service_hosts[suffix]
            for _ in ordered:
                name = next(listed)
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
        ordered = tuple(attributes)
        listed = self._tables.find(probe_keys("exact", value, ordered))
        return next((name for name in listed if name), None) or self._match_fragments(
            value, ordered
        )

    def _match_fragments(self, value: str, ordered: tuple[str, ...]) -> str | None:
        for attribute in ordered:
            for fragment, owner in self._substrings.get(attribute, ()):
                if fragment in value:
                    return self._tables.names[owner]
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


def _misp_list_files() -> list[Path]:
    """The ``list.json`` files ``pymispwarninglists`` ships, in a stable order."""
    # Located, not imported: importing it loads jsonschema's format checkers (~0.9 s), and only
    # its data folder is used.
    spec = importlib.util.find_spec("pymispwarninglists")
    if spec is None or not spec.submodule_search_locations:
        raise IntelError("pymispwarninglists is not installed: pip install pymispwarninglists")
    package = Path(next(iter(spec.submodule_search_locations)))
    return sorted((package / "data" / "misp-warninglists" / "lists").glob("*/list.json"))


def _named_excluded(path: Path) -> bool:
    """Whether the file's last bytes name an excluded list. MISP writes ``name`` after the
    (up to 25 MB) ``list``; skipping those files unparsed keeps compiling light. A file laid out
    otherwise is parsed, and its name checked after parsing."""
    with path.open("rb") as handle:
        handle.seek(max(path.stat().st_size - 4096, 0))
        tail = handle.read().decode("utf-8", "replace")
    return any(f'"name": {json.dumps(name)}' in tail for name in EXCLUDED_WARNINGLISTS)


def iter_misp_warninglists() -> Iterator[WarninglistData]:
    """The MISP warninglists minus :data:`EXCLUDED_WARNINGLISTS`, one parsed file at a time."""
    for path in _misp_list_files():
        if _named_excluded(path):
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            name = str(raw["name"])
            if name in EXCLUDED_WARNINGLISTS:
                continue
            yield WarninglistData(
                name=name,
                type=str(raw["type"]),
                entries=tuple(str(entry) for entry in raw["list"]),
                matching_attributes=tuple(str(a) for a in raw.get("matching_attributes", ())),
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise IntelError(f"cannot read the MISP warninglist {path}: {error}") from error


def misp_warninglists() -> list[WarninglistData]:
    """All MISP warninglists from ``pymispwarninglists`` minus :data:`EXCLUDED_WARNINGLISTS`."""
    return list(iter_misp_warninglists())


def cache_dir() -> Path:
    """Where earmark keeps per-installation caches (see :data:`CACHE_DIR_ENV_VAR`)."""
    configured = os.environ.get(CACHE_DIR_ENV_VAR)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "earmark"


def _lists_source() -> str:
    """Identifies the lists a compiled table holds: each file's path, size and mtime, the
    exclusions and the table format. Reinstalling or updating the lists changes it."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{WARNINGLIST_TABLES_VERSION}\x00".encode())
    for name in sorted(EXCLUDED_WARNINGLISTS):
        digest.update(f"exclude\x00{name}\x00".encode())
    for path in _misp_list_files():
        status = path.stat()
        digest.update(f"{path}\x00{status.st_size}\x00{status.st_mtime_ns}\x00".encode())
    return digest.hexdigest()


def default_warninglist_tables() -> WarninglistTables:
    """The MISP lists compiled, read from the cache a block at a time (compiled and saved on
    first use: ~5 s once per installation)."""
    source = _lists_source()
    path = cache_dir() / f"warninglists-{source}"
    try:
        tables = load_tables(path, source)
    except IntelError:
        tables = None  # damaged: compiled again below, never trusted
    if tables is not None:
        return tables
    compiled = compile_warninglists(iter_misp_warninglists())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tables(compiled, path, source)
        # Read from the file by block: the process keeps ~2 MB, not the compiled 16 MB.
        return load_tables(path, source) or compiled
    except (OSError, IntelError):
        return compiled  # no writable cache: this process keeps its own copy


@cache
def default_benign_infrastructure() -> BenignInfrastructure:
    """The MISP lists plus earmark's shared services, loaded once per process."""
    return BenignInfrastructure(default_warninglist_tables(), load_shared_services())
