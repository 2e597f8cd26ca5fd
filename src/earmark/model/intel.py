"""Threat-intelligence records: indicators, reports, actor names and what was seen with whom."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from earmark.model.kb import Tlp


class IndicatorType(StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    DOMAIN = "domain"
    URL = "url"
    EMAIL = "email"
    MD5 = "md5"
    SHA1 = "sha1"
    SHA256 = "sha256"
    CERT_SHA1 = "cert-sha1"  # certificate fingerprint
    BITCOIN = "bitcoin"
    MONERO = "monero"
    ONION = "onion"
    NAMED_PIPE = "named-pipe"
    MUTEX = "mutex"
    USER_AGENT = "user-agent"


@dataclass(frozen=True, slots=True)
class Indicator:
    type: IndicatorType
    value: str  # normalised: refanged, lower-cased where case is meaningless
    offset: int | None = None  # file offset in a sample when extracted from one


@dataclass(frozen=True, slots=True)
class IntelReport:
    """One publication or feed entry: what a source said, when, about whom."""

    report_id: str  # stable id: derived from source + reference, so re-import is idempotent
    source: str  # "eset-malware-ioc", "maltrail", "mitre-attack", a file name, …
    title: str
    reference: str | None  # URL of the publication where known
    published: date | None
    tlp: Tlp
    actors: tuple[str, ...]  # canonical names after alias resolution
    families: tuple[str, ...]
    indicators: tuple[Indicator, ...]


@dataclass(frozen=True, slots=True)
class ActorProfile:
    name: str  # canonical name in the active taxonomy
    aliases: tuple[str, ...]
    external_ids: tuple[str, ...]  # e.g. ("G0032",), MISP galaxy UUIDs
    source: str


@dataclass(frozen=True, slots=True)
class IntelRelation:
    """A STIX-style relationship kept as names: (Lazarus Group) -uses-> (Contopee)."""

    source_name: str
    source_type: str  # "intrusion-set", "malware", "tool", "campaign", "indicator"
    relation: str  # "uses", "attributed-to", "indicates", …
    target_name: str
    target_type: str
    report_id: str
