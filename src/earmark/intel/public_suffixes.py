"""The public-suffix list (tldextract's bundled snapshot), one parser per process.

Indicator extraction (is this a registrable domain?) and infrastructure correlation (which
registered domain does this host sit under?) share it: each ``TLDExtract`` builds two tries of
the ~10,000 suffixes on first use, ~6 MB and ~0.1 s each, and the two extractors differed only
in a default that every call can pass (``include_psl_private_domains``).

tldextract is imported on the first lookup, not with this module: it pulls requests and urllib3
(+7 MB RSS, ~0.1 s), which commands that never meet a domain (compare, ingest of code-only
samples) should not pay.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import tldextract

__all__ = ["HostParts", "host_parts"]

# Distinct host names whose split is remembered. Names repeat within a sample ("mod.rs",
# "www.microsoft.com" tens of times) and across the samples of one process; a split is a few
# hundred bytes, so the cache stays under ~1 MB.
HOST_PARTS_CACHE_SIZE: Final = 2048


@dataclass(frozen=True, slots=True)
class HostParts:
    """A host name split at its public suffix: ``www.evil.co.uk`` → ``co.uk``, ``evil``."""

    suffix: str  # "" when no listed suffix ends the name
    domain: str  # the label left of the suffix, "" when the name is a suffix itself
    top_domain: str  # ``domain.suffix``: the registered domain, "" without both parts


@lru_cache(maxsize=1)
def _extractor() -> tldextract.TLDExtract:
    import tldextract

    # suffix_list_urls=() makes tldextract use the snapshot bundled with the package: no network
    # call at any time (verified by a test that blocks sockets); cache_dir=None writes nothing.
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)


@lru_cache(maxsize=HOST_PARTS_CACHE_SIZE)
def host_parts(host: str, private: bool = False) -> HostParts:
    """``host`` split by the ICANN suffixes, or with ``private`` also by the private ones
    (``blogspot.com``, ``github.io``: names under them belong to different customers)."""
    parts = _extractor()(host, include_psl_private_domains=private)
    return HostParts(parts.suffix, parts.domain, parts.top_domain_under_public_suffix)
