"""MISP event JSON: ``{"Event": …}``, a list of those, or an API ``{"response": […]}``.

Attributes and the attributes of objects become indicators by their MISP type; galaxy clusters
and ``misp-galaxy:threat-actor="…"`` tags name actors; ``misp-galaxy:malpedia``/``tool``/
``malware``-style tags name families; ``tlp:…`` tags give the marking. ``pymisp.MISPEvent`` is
not used to load: it adds nothing to these fields and costs a full object model per event.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import date
from typing import Any

from earmark.errors import IntelError
from earmark.intel.aliases import AliasResolver
from earmark.intel.importers.common import (
    DEFAULT_TLP,
    ImportResult,
    parse_date,
    report_id,
    strictest_tlp,
    tlp_from_text,
    unique_indicators,
)
from earmark.intel.indicators import classify_value
from earmark.model.intel import Indicator, IndicatorType, IntelReport
from earmark.model.kb import Tlp

__all__ = ["import_misp_events", "misp_events"]

# MISP attribute type → indicator type; composite "a|b" types are split and each half typed.
_MISP_TYPES: Mapping[str, IndicatorType | None] = {
    "ip-dst": IndicatorType.IPV4, "ip-src": IndicatorType.IPV4, "ip": IndicatorType.IPV4,
    "domain": IndicatorType.DOMAIN,
    "hostname": IndicatorType.DOMAIN, "url": IndicatorType.URL, "uri": IndicatorType.URL,
    "link": None,  # links point at reports, not at attacker infrastructure
    "email": IndicatorType.EMAIL, "email-src": IndicatorType.EMAIL,
    "email-dst": IndicatorType.EMAIL, "md5": IndicatorType.MD5, "sha1": IndicatorType.SHA1,
    "sha256": IndicatorType.SHA256, "x509-fingerprint-sha1": IndicatorType.CERT_SHA1,
    "btc": IndicatorType.BITCOIN, "xmr": IndicatorType.MONERO, "mutex": IndicatorType.MUTEX,
    "named pipe": IndicatorType.NAMED_PIPE, "user-agent": IndicatorType.USER_AGENT,
}
_HASH_KINDS = frozenset({IndicatorType.MD5, IndicatorType.SHA1, IndicatorType.SHA256,
                         IndicatorType.CERT_SHA1})
_GALAXY_TAG = re.compile(r'^misp-galaxy:(?P<galaxy>[\w-]+)="(?P<value>.+)"$')
_ACTOR_GALAXIES = frozenset({"threat-actor", "mitre-intrusion-set",
                             "mitre-enterprise-attack-intrusion-set", "microsoft-activity-group",
                             "eset-threat-actor"})
_FAMILY_GALAXIES = frozenset({"malpedia", "tool", "rat", "ransomware", "backdoor", "banker",
                              "stealer", "botnet", "mitre-malware", "mitre-tool",
                              "mitre-enterprise-attack-malware", "mitre-enterprise-attack-tool"})


def misp_events(data: Any) -> list[Mapping[str, Any]]:
    """The event dicts in any of the shapes MISP exports."""
    if isinstance(data, dict) and "response" in data:
        data = data["response"]
    items = data if isinstance(data, list) else [data]
    events = [item["Event"] for item in items
              if isinstance(item, dict) and isinstance(item.get("Event"), dict)]
    if not events:
        raise IntelError("no MISP event found (expected {\"Event\": {...}})")
    return events


def _attribute_indicators(attribute: Mapping[str, Any]) -> Iterator[Indicator]:
    misp_type = str(attribute.get("type", "")).lower()
    value = str(attribute.get("value", ""))
    types, values = misp_type.split("|"), value.split("|")
    if len(types) != len(values):
        return
    for one_type, one_value in zip(types, values, strict=True):
        kind = _MISP_TYPES.get(one_type)
        if kind is None or not one_value.strip():
            continue
        if kind in _HASH_KINDS:
            hex_value = one_value.strip().lower().replace(":", "")
            if re.fullmatch(r"[0-9a-f]{32,64}", hex_value):
                yield Indicator(kind, hex_value)
        elif kind in (IndicatorType.MUTEX, IndicatorType.USER_AGENT, IndicatorType.NAMED_PIPE,
                      IndicatorType.MONERO):
            yield Indicator(kind, one_value.strip())
        else:
            found = classify_value(one_value)
            if found is not None:
                yield found


def _tags(event: Mapping[str, Any]) -> list[str]:
    tags = [str(t.get("name", "")) for t in event.get("Tag", ()) if isinstance(t, dict)]
    for attribute in _all_attributes(event):
        tags.extend(str(t.get("name", "")) for t in attribute.get("Tag", ())
                    if isinstance(t, dict))
    return tags


def _all_attributes(event: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for attribute in event.get("Attribute", ()):
        if isinstance(attribute, dict):
            yield attribute
    for obj in event.get("Object", ()):
        if isinstance(obj, dict):
            for attribute in obj.get("Attribute", ()):
                if isinstance(attribute, dict):
                    yield attribute


def _galaxy_names(event: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(galaxy type, cluster value) pairs from galaxies and galaxy tags."""
    pairs = []
    for galaxy in event.get("Galaxy", ()):
        if not isinstance(galaxy, dict):
            continue
        for cluster in galaxy.get("GalaxyCluster", ()):
            if isinstance(cluster, dict) and cluster.get("value"):
                pairs.append((str(cluster.get("type") or galaxy.get("type")),
                              str(cluster["value"])))
    for tag in _tags(event):
        match = _GALAXY_TAG.match(tag)
        if match:
            pairs.append((match["galaxy"], match["value"]))
    return pairs


def _event_report(event: Mapping[str, Any], source: str, tlp: Tlp | None,
                  published: date | None, resolver: AliasResolver) -> IntelReport:
    names = _galaxy_names(event)
    event_tlp = strictest_tlp(tlp_from_text(t) for t in _tags(event) if t.lower()
                              .startswith("tlp:"))
    references = [str(a.get("value")) for a in _all_attributes(event)
                  if a.get("type") == "link" and a.get("value")]
    indicators = [i for a in _all_attributes(event) if not a.get("deleted")
                  for i in _attribute_indicators(a)]
    uuid = str(event.get("uuid") or "")
    title = str(event.get("info") or uuid or "MISP event")
    return IntelReport(
        report_id=report_id(source, uuid or title),
        source=source,
        title=title,
        reference=references[0] if references else None,
        published=parse_date(event.get("date")) or published
        or parse_date(event.get("publish_timestamp")),
        tlp=strictest_tlp([event_tlp, tlp]) or DEFAULT_TLP,
        actors=tuple(dict.fromkeys(resolver.resolve(v) for g, v in names
                                   if g in _ACTOR_GALAXIES)),
        families=tuple(dict.fromkeys(v.split(" - S")[0] for g, v in names
                                     if g in _FAMILY_GALAXIES)),
        indicators=unique_indicators(indicators),
    )


def import_misp_events(
    data: Any,
    source: str,
    tlp: Tlp | None = None,
    published: date | None = None,
    resolver: AliasResolver | None = None,
) -> ImportResult:
    """One report per MISP event in ``data`` (parsed JSON)."""
    resolver = resolver or AliasResolver.default()
    events: Sequence[Mapping[str, Any]] = misp_events(data)
    reports = tuple(_event_report(e, source, tlp, published, resolver) for e in events)
    warnings = tuple(f"MISP event {r.title!r} has no indicators we import"
                     for r in reports if not r.indicators)
    return ImportResult(reports, (), (), warnings)
