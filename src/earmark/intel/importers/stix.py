"""STIX 2.1 bundles: indicators (patterns), observables, actors, malware, reports, relationships.

Each object is checked with the ``stix2`` library (``allow_custom=True``); an object it rejects is
skipped with a warning so one bad object does not lose a whole feed. The walk itself reads the
plain dicts, which keeps values as the producer wrote them.

A bundle with ``report`` objects yields one ``IntelReport`` per report (its ``object_refs``
decide actors, families and indicators) plus one for whatever no report references; a bundle
without reports yields one report for the whole bundle. A report's date is its ``published``,
else the caller's, else the newest ``valid_from``/``created`` of its objects (a publication is
not older than what it contains).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import date
from typing import Any

import stix2
import stix2.exceptions
from stix2patterns.pattern import Pattern

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
from earmark.model.intel import (
    ActorProfile,
    Indicator,
    IndicatorType,
    IntelRelation,
    IntelReport,
)
from earmark.model.kb import Tlp

__all__ = ["import_stix_bundle", "indicators_from_pattern"]

# Fixed ids of the TLP marking definitions: TLP 1.0 (STIX 2.1 spec §7.2.1.4) and TLP 2.0
# (the OASIS TLP 2.0 extension). Bundles usually reference these without including them.
KNOWN_TLP_MARKINGS: Mapping[str, Tlp] = {
    "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9": Tlp.CLEAR,  # TLP:WHITE
    "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da": Tlp.GREEN,
    "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82": Tlp.AMBER,
    "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed": Tlp.RED,
    "marking-definition--94868c89-83c2-464b-929b-a1a8aa3c8487": Tlp.CLEAR,
    "marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb": Tlp.GREEN,
    "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421": Tlp.AMBER,
    "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003": Tlp.AMBER_STRICT,
    "marking-definition--e828b379-4e03-4974-9ac4-e53a884c97c1": Tlp.RED,
}

_ACTOR_TYPES = frozenset({"intrusion-set", "threat-actor"})
_FAMILY_TYPES = frozenset({"malware", "tool"})
# (object type, property path) in a pattern or observable → indicator type.
_PATH_TYPES: Mapping[tuple[str, str], IndicatorType] = {
    ("ipv4-addr", "value"): IndicatorType.IPV4,
    ("ipv6-addr", "value"): IndicatorType.IPV6,
    ("domain-name", "value"): IndicatorType.DOMAIN,
    ("url", "value"): IndicatorType.URL,
    ("email-addr", "value"): IndicatorType.EMAIL,
    ("email-message", "from_ref.value"): IndicatorType.EMAIL,
    ("email-message", "sender_ref.value"): IndicatorType.EMAIL,
    ("mutex", "name"): IndicatorType.MUTEX,
    ("network-traffic", "dst_ref.value"): IndicatorType.IPV4,
}
_HASH_TYPES: Mapping[str, IndicatorType] = {
    "md5": IndicatorType.MD5, "sha1": IndicatorType.SHA1, "sha-1": IndicatorType.SHA1,
    "sha256": IndicatorType.SHA256, "sha-256": IndicatorType.SHA256,
}


def _indicator(kind: IndicatorType, raw: str) -> Indicator | None:
    """Normalise a value whose type the producer stated; a value that is not what it claims to
    be (a domain field holding a URL) is re-typed by its content, or dropped."""
    if kind in (IndicatorType.MD5, IndicatorType.SHA1, IndicatorType.SHA256,
                IndicatorType.CERT_SHA1):
        value = raw.strip().lower().replace(":", "")
        return Indicator(kind, value) if value and all(c in "0123456789abcdef" for c in value) \
            else None
    if kind is IndicatorType.MUTEX:
        return Indicator(kind, raw.strip()) if raw.strip() else None
    return classify_value(raw)


def indicators_from_pattern(pattern: str) -> list[Indicator]:
    """Indicators compared with ``=`` in a STIX pattern, whatever its OR/AND structure.

    Raises ``IntelError`` for a pattern that does not parse.
    """
    try:
        comparisons = Pattern(pattern).inspect().comparisons
    except Exception as error:  # stix2patterns raises bare parser exceptions of many kinds
        raise IntelError(f"unparseable STIX pattern {pattern[:80]!r}: {error}") from error
    found: list[Indicator] = []
    for object_type, terms in comparisons.items():
        for path, operator, literal in terms:
            if operator != "=" or not isinstance(literal, str) or not literal.startswith("'"):
                continue
            value = literal[1:-1].replace("\\'", "'").replace("\\\\", "\\")
            kind = _pattern_path_type(object_type, [str(p) for p in path])
            indicator = _indicator(kind, value) if kind else None
            if indicator is not None:
                found.append(indicator)
    return found


def _pattern_path_type(object_type: str, path: list[str]) -> IndicatorType | None:
    if len(path) == 2 and path[0] == "hashes":
        hash_type = _HASH_TYPES.get(path[1].lower())
        if object_type == "x509-certificate":
            return IndicatorType.CERT_SHA1 if hash_type is IndicatorType.SHA1 else None
        return hash_type if object_type in ("file", "artifact") else None
    return _PATH_TYPES.get((object_type, ".".join(path)))


def _observable_indicators(sco: Mapping[str, Any]) -> list[Indicator]:
    object_type = str(sco.get("type"))
    found: list[Indicator] = []
    if object_type in ("file", "artifact", "x509-certificate"):
        for hash_name, value in (sco.get("hashes") or {}).items():
            kind = _pattern_path_type(object_type, ["hashes", str(hash_name)])
            indicator = _indicator(kind, str(value)) if kind else None
            if indicator is not None:
                found.append(indicator)
        return found
    key = "name" if object_type == "mutex" else "value"
    kind = _PATH_TYPES.get((object_type, key))
    if kind is not None and isinstance(sco.get(key), str):
        indicator = _indicator(kind, sco[key])
        if indicator is not None:
            found.append(indicator)
    return found


def _marking_table(objects: Iterable[Mapping[str, Any]]) -> dict[str, Tlp]:
    table = dict(KNOWN_TLP_MARKINGS)
    for obj in objects:
        if obj.get("type") != "marking-definition":
            continue
        definition = obj.get("definition") or {}
        candidates = [str(obj.get("name", "")), str(definition.get("tlp", "")),
                      *(str(ext.get("tlp_2_0", "")) for ext in (obj.get("extensions") or {})
                        .values() if isinstance(ext, dict))]
        if obj.get("definition_type") == "tlp" or any(c for c in candidates):
            for candidate in candidates:
                tlp = tlp_from_text(candidate) if candidate else None
                if tlp is not None:
                    table[str(obj["id"])] = tlp
                    break
    return table


def _validated_objects(bundle: Mapping[str, Any], warnings: list[str]) -> list[dict[str, Any]]:
    objects = bundle.get("objects")
    if not isinstance(objects, list):
        raise IntelError("STIX bundle has no 'objects' list")
    valid = []
    for obj in objects:
        if not isinstance(obj, dict) or "type" not in obj or "id" not in obj:
            warnings.append("skipped a STIX object without type or id")
            continue
        try:
            stix2.parse(obj, allow_custom=True)
        except (stix2.exceptions.STIXError, ValueError, TypeError) as error:
            warnings.append(f"skipped invalid STIX object {obj.get('id')}: {error}")
            continue
        valid.append(obj)
    return valid


def _newest_date(objects: Iterable[Mapping[str, Any]]) -> date | None:
    dates = [parse_date(o.get("valid_from") or o.get("created")) for o in objects]
    present = [d for d in dates if d is not None]
    return max(present) if present else None


def import_stix_bundle(
    bundle: Mapping[str, Any],
    source: str,
    tlp: Tlp | None = None,
    published: date | None = None,
    resolver: AliasResolver | None = None,
) -> ImportResult:
    """Reports, actors and relations of a parsed STIX 2.1 bundle (a dict from ``json.load``)."""
    if bundle.get("type") != "bundle":
        raise IntelError("not a STIX bundle (no \"type\": \"bundle\")")
    resolver = resolver or AliasResolver.default()
    warnings: list[str] = []
    objects = _validated_objects(bundle, warnings)
    by_id = {str(o["id"]): o for o in objects}
    markings = _marking_table(objects)

    def name_of(obj: Mapping[str, Any]) -> str:
        name = str(obj.get("name") or obj.get("pattern") or obj.get("value") or obj["id"])
        return resolver.resolve(name) if obj.get("type") in _ACTOR_TYPES else name

    def indicators_of(obj: Mapping[str, Any]) -> list[Indicator]:
        if obj.get("type") == "indicator":
            if obj.get("pattern_type", "stix") != "stix" or not obj.get("pattern"):
                return []
            try:
                return indicators_from_pattern(str(obj["pattern"]))
            except IntelError as error:
                warnings.append(f"{obj['id']}: {error}")
                return []
        if obj.get("type") == "observed-data":
            inner = obj.get("objects") or {}
            refs = [by_id[r] for r in obj.get("object_refs", ()) if r in by_id]
            return [i for sco in (*inner.values(), *refs) for i in _observable_indicators(sco)]
        return _observable_indicators(obj)

    def object_tlp(obj: Mapping[str, Any]) -> Tlp | None:
        return strictest_tlp(markings.get(str(ref)) for ref in obj.get("object_marking_refs", ()))

    reports: list[IntelReport] = []

    def add_report(key: str, title: str, members: Sequence[Mapping[str, Any]],
                   header: Mapping[str, Any] | None) -> str:
        rid = report_id(source, key)
        external = [r for r in (header or {}).get("external_references", ())
                    if isinstance(r, dict) and r.get("url")]
        marking = strictest_tlp([tlp, *(object_tlp(o) for o in [*members, header or {}])])
        reports.append(IntelReport(
            report_id=rid,
            source=source,
            title=title,
            reference=str(external[0]["url"]) if external else None,
            published=parse_date((header or {}).get("published")) or published
            or _newest_date(members),
            tlp=marking or DEFAULT_TLP,
            actors=tuple(dict.fromkeys(name_of(o) for o in members
                                       if o.get("type") in _ACTOR_TYPES)),
            families=tuple(dict.fromkeys(name_of(o) for o in members
                                         if o.get("type") in _FAMILY_TYPES)),
            indicators=unique_indicators(i for o in members for i in indicators_of(o)),
        ))
        return rid

    referenced: set[str] = set()
    report_of_object: dict[str, str] = {}
    for obj in objects:
        if obj.get("type") != "report":
            continue
        refs = [str(r) for r in obj.get("object_refs", ())]
        members = [by_id[r] for r in refs if r in by_id]
        rid = add_report(str(obj["id"]), str(obj.get("name") or obj["id"]), members, obj)
        referenced.update(refs)
        for ref in refs:
            report_of_object.setdefault(ref, rid)
    leftovers = [o for o in objects if str(o["id"]) not in referenced
                 and o.get("type") not in ("report", "relationship", "marking-definition",
                                           "identity", "extension-definition")]
    bundle_rid = report_id(source, str(bundle.get("id")))
    if leftovers or not reports:
        bundle_rid = add_report(str(bundle.get("id")), source, leftovers, None)

    relations = []
    for obj in objects:
        if obj.get("type") != "relationship":
            continue
        source_obj = by_id.get(str(obj.get("source_ref")))
        target_obj = by_id.get(str(obj.get("target_ref")))
        if source_obj is None or target_obj is None:
            warnings.append(f"{obj['id']}: relationship to an object not in the bundle")
            continue
        relations.append(IntelRelation(
            source_name=name_of(source_obj),
            source_type=str(source_obj["type"]),
            relation=str(obj.get("relationship_type")),
            target_name=name_of(target_obj),
            target_type=str(target_obj["type"]),
            report_id=report_of_object.get(str(obj["id"]), bundle_rid),
        ))

    actors = tuple(
        ActorProfile(
            name=name_of(o),
            aliases=tuple(dict.fromkeys(str(a) for a in o.get("aliases", ())
                                        if str(a) != name_of(o))),
            external_ids=tuple(dict.fromkeys(
                [str(o["id"]), *(str(r["external_id"]) for r in o.get("external_references", ())
                                 if isinstance(r, dict) and r.get("external_id"))])),
            source=source,
        )
        for o in objects if o.get("type") in _ACTOR_TYPES
    )
    return ImportResult(tuple(reports), actors, tuple(relations), tuple(warnings))
