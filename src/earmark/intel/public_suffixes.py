"""The public-suffix list, one compact table per process.

Indicator extraction (is this a registrable domain?) and infrastructure correlation (which
registered domain does this host sit under?) both split host names at their public suffix.

The list is tldextract's bundled snapshot (no network, ever), and the split follows tldextract's
rules exactly (``TLDExtract(suffix_list_urls=())``: lenient host parsing, wildcard and
exception rules, punycode labels decoded with ``idna``); a test compares both on every rule of
the list. It is written here instead of calling tldextract because of what tldextract costs a
query process: importing it loads requests, urllib3 and charset_normalizer (+5-7 MB RSS,
~0.1 s), and each extractor builds two tries of Python objects, one node per label (~6 MB,
~0.1 s). Here a trie node is the suffix it spells (``"co.uk"``), a key of one dict (~0.9 MB),
built on the first lookup.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import AddressValueError, IPv6Address
from pathlib import Path
from typing import Final
from urllib.parse import scheme_chars

from earmark.errors import IntelError

__all__ = ["HostParts", "host_parts"]

# Distinct host names whose split is remembered. Names repeat within a sample ("mod.rs",
# "www.microsoft.com" tens of times) and across the samples of one process; a split is a few
# hundred bytes, so the cache stays under ~1 MB.
HOST_PARTS_CACHE_SIZE: Final = 2048

# tldextract's snapshot file and the parsing rules of tldextract.suffix_list.
_SNAPSHOT_PACKAGE: Final = "tldextract"
_SNAPSHOT_FILE: Final = ".tld_set_snapshot"
_PRIVATE_SEPARATOR: Final = "// ===BEGIN PRIVATE DOMAINS==="
_RULE = re.compile(r"^(?P<suffix>[.*!]*\w[\S]*)", re.UNICODE | re.MULTILINE)
# tldextract.remote.IP_RE: a dotted quad with no leading zeros.
_IPV4 = re.compile(
    r"^(?:(?:[0-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5])\.)"
    r"{3}(?:[0-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5])$",
    re.ASCII,
)
_SCHEME_CHARS: Final = frozenset(scheme_chars)
_IDEOGRAPHIC_DOTS: Final = ("\u3002", "\uff0e", "\uff61")


@dataclass(frozen=True, slots=True)
class HostParts:
    """A host name split at its public suffix: ``www.evil.co.uk`` → ``co.uk``, ``evil``."""

    suffix: str  # "" when no listed suffix ends the name
    domain: str  # the label left of the suffix, "" when the name is a suffix itself
    top_domain: str  # ``domain.suffix``: the registered domain, "" without both parts


# What a suffix is in the table: a node of the ICANN trie, and the end of an ICANN or a private
# rule. Every key is a node of the trie with private rules.
_PUBLIC_NODE: Final = 1
_PUBLIC_RULE: Final = 2
_PRIVATE_RULE: Final = 4


@dataclass(frozen=True, slots=True)
class _SuffixTable:
    """tldextract's two tries (ICANN rules; ICANN and private rules) in one dict keyed by the
    suffix each node spells: node ``"co.uk"`` has the child label ``x`` when ``"x.co.uk"`` is
    a key. One string per node, shared by both tries (~0.9 MB for the ~10,300 nodes)."""

    nodes: dict[str, int]  # suffix -> _PUBLIC_NODE | _PUBLIC_RULE | _PRIVATE_RULE bits

    def suffix_start(self, labels: list[str], private: bool) -> int | None:
        """Index of the first label of the public suffix, None when no rule matches
        (``tldextract._PublicSuffixListTLDExtractor.suffix_index``)."""
        node_bits = 0 if private else _PUBLIC_NODE  # a key is a node of the private trie
        rule_bits = _PUBLIC_RULE | _PRIVATE_RULE if private else _PUBLIC_RULE
        nodes = self.nodes
        node = ""
        start = position = len(labels)
        for label in reversed(labels):
            decoded = _decode_punycode(label)
            child = f"{decoded}.{node}" if node else decoded
            flags = nodes.get(child)
            if flags is not None and flags & node_bits == node_bits:
                position -= 1
                node = child
                if flags & rule_bits:
                    start = position
                continue
            wildcard = nodes.get(f"*.{node}" if node else "*")
            if wildcard is not None and wildcard & node_bits == node_bits:
                exception = nodes.get(f"!{decoded}.{node}" if node else f"!{decoded}")
                matched = exception is not None and exception & node_bits == node_bits
                return position if matched else position - 1
            break
        return None if start == len(labels) else start


def _add_rules(nodes: dict[str, int], rules: list[str], node_bit: int, rule_bit: int) -> None:
    """Mark every node a rule passes through (``a.b.c``: ``c``, ``b.c``, ``a.b.c``) and its end."""
    for rule in rules:
        labels = rule.split(".")
        for i in range(len(labels)):
            path = ".".join(labels[i:])
            nodes[path] = nodes.get(path, 0) | node_bit
        nodes[rule] |= rule_bit


@lru_cache(maxsize=1)
def _table() -> _SuffixTable:
    spec = importlib.util.find_spec(_SNAPSHOT_PACKAGE)  # finds the package, does not import it
    folders = spec.submodule_search_locations if spec is not None else None
    if not folders:
        raise IntelError("the public-suffix list (tldextract's snapshot) is not installed")
    try:
        text = (Path(next(iter(folders))) / _SNAPSHOT_FILE).read_text(encoding="utf-8")
    except OSError as error:
        raise IntelError(f"cannot read the public-suffix list: {error}") from error
    public_text, _, private_text = text.partition(_PRIVATE_SEPARATOR)
    nodes: dict[str, int] = {}
    _add_rules(nodes, [m.group("suffix") for m in _RULE.finditer(public_text)],
               _PUBLIC_NODE, _PUBLIC_RULE)
    _add_rules(nodes, [m.group("suffix") for m in _RULE.finditer(private_text)],
               0, _PRIVATE_RULE)
    return _SuffixTable(nodes)


def _decode_punycode(label: str) -> str:
    lowered = label.lower()
    if lowered.startswith("xn--"):
        import idna  # only for punycode labels: its tables cost ~2.4 MB

        try:
            return str(idna.decode(lowered))
        except (UnicodeError, IndexError):
            pass
    return lowered


def _lenient_host(text: str) -> str:
    """The host of a URL-like string (``tldextract.remote.lenient_netloc``)."""
    slashes = text.find("//")
    if slashes == 0:
        text = text[2:]
    elif slashes >= 2 and text[slashes - 1] == ":" and not (
        set(text[: slashes - 1]) - _SCHEME_CHARS
    ):
        text = text[slashes + 2 :]
    authority = text.partition("/")[0].partition("?")[0].partition("#")[0]
    after_userinfo = authority.rpartition("@")[-1]
    if after_userinfo and after_userinfo[0] == "[":
        bracketed = after_userinfo.partition("]")
        if bracketed[1] == "]":
            return f"{bracketed[0]}]"
    return after_userinfo.partition(":")[0].strip().rstrip(".\u3002\uff0e\uff61")


def _looks_like_ipv6(text: str) -> bool:
    try:
        IPv6Address(text)
    except AddressValueError:
        return False
    return True


@lru_cache(maxsize=HOST_PARTS_CACHE_SIZE)
def host_parts(host: str, private: bool = False) -> HostParts:
    """``host`` split by the ICANN suffixes, or with ``private`` also by the private ones
    (``blogspot.com``, ``github.io``: names under them belong to different customers)."""
    name = _lenient_host(host)
    for dot in _IDEOGRAPHIC_DOTS:
        name = name.replace(dot, ".")
    if len(name) >= 4 and name[0] == "[" and name[-1] == "]" and _looks_like_ipv6(name[1:-1]):
        return HostParts("", name, "")
    labels = name.split(".")
    start = _table().suffix_start(labels, private)
    if start is None:
        # No rule: an IPv4 address or an unlisted name, both without a suffix.
        return HostParts("", name if len(labels) == 4 and _is_ipv4(name) else labels[-1], "")
    domain = labels[start - 1] if start > 0 else ""
    suffix = ".".join(labels[start:])
    return HostParts(suffix, domain, f"{domain}.{suffix}" if domain and suffix else "")


def _is_ipv4(text: str) -> bool:
    return text[:1].isdecimal() and _IPV4.fullmatch(text) is not None
