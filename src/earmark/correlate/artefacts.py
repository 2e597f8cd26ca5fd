"""Artefact evidence: rare strings, export names, imphash, PDB path, Rich header, signer and
version info the query shares with KB samples, weighted by how many groups hold them.

Also the shared-dependency check: a query that is itself a library which samples of many
groups import (the MSVC runtime, a common crypto DLL) is nobody's code; one ``shared-library``
item says so and ``reason.hypotheses`` caps every hypothesis (docs/attribution.md, "Artefact
pillar").

Sample strings are untrusted: values are escaped (``escape_value``) before they enter evidence.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from earmark.errors import IndexCacheError
from earmark.index.artefact_cache import load_artefact_stats, save_artefact_stats
from earmark.index.artefacts import (
    RARE_ARTEFACT_WEIGHT,
    ArtefactStats,
    SampleArtefact,
    build_artefact_stats,
    sample_artefacts,
)
from earmark.model.evidence import Evidence
from earmark.model.kb import SampleRecord
from earmark.model.sample import SampleFeatures
from earmark.store import Store

# Artefact items kept per query, strongest first. A new release of a KB project shares
# hundreds of strings with it (PE corpus, setting b: regex `_regex` 947 of its old release's
# rare strings, lz4 `_frame` 235); fusion saturates after ~15 (1 - 0.7^15 = 0.995).
MAX_ARTEFACT_ITEMS: Final = 1_000
# Characters of an artefact value shown in evidence.
MAX_SHOWN_VALUE: Final = 160

# Shared dependency: samples of at least this many distinct groups (owners, goodware samples)
# import the library. 3, as for code (``index.rarity.SHARED_OWNER_COUNT``): two groups can share
# a private component; a malware DLL loaded by its own family has one importer group.
SHARED_LIBRARY_MIN_IMPORTERS: Final = 3
# The query is that library when it exports at least this many of the names the KB imports from
# it, and at least this share of them (newer callers import a few names older builds lack: the
# MSVC runtime 14.x adds exports between updates).
SHARED_LIBRARY_MIN_NAMES: Final = 3
SHARED_LIBRARY_MIN_SHARE: Final = 0.8

_ARTEFACT_NOUNS: Final = {
    "string": "string",
    "export": "export name",
    "imphash": "import hash",
    "pdb": "PDB path",
    "rich-header": "Rich header tool set",
    "signer": "signing certificate",
    "version-info": "version-info value",
}


@dataclass(frozen=True, slots=True)
class ArtefactEvidence:
    evidence: tuple[Evidence, ...]  # strongest first
    shared_library: Evidence | None  # set when the query is a library many groups import
    artefacts: int  # artefacts of the query looked up


def escape_value(text: str) -> str:
    """Sample text made safe for any renderer: non-printables as \\xNN, length capped."""
    escaped = "".join(
        ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text[:MAX_SHOWN_VALUE]
    )
    return escaped + ("…" if len(text) > MAX_SHOWN_VALUE else "")


def string_references(features: SampleFeatures) -> dict[str, tuple[int, ...]]:
    """String value -> addresses of the query functions that reference it."""
    references: dict[str, list[int]] = defaultdict(list)
    for function in features.functions:
        for text in function.strings:
            references[text.strip()].append(function.address)
    return {text: tuple(sorted(set(addresses))) for text, addresses in references.items()}


def _reason(
    artefact: SampleArtefact,
    owners: tuple[str, ...],
    count: int,
    goodware: int,
    total: int,
    references: int,
) -> str:
    held = f"in {count} of {total} groups ({', '.join(owners)})"
    if goodware:
        held += f", {goodware} goodware"
    text = f"{_ARTEFACT_NOUNS[artefact.kind]} {held}"
    if count == 1 and not goodware:
        text += ": unique to one group"
    if references:
        text += f"; referenced by {references} query function{'s' if references > 1 else ''}"
    return text


def _best_shares(
    stats: ArtefactStats,
    samples: Mapping[int, SampleRecord],
    matched_strings: list[tuple[int, ...]],
    query_sha256: str,
) -> dict[tuple[str | None, str | None], tuple[float, int]]:
    """Per KB label: the largest share of one of its samples' rare strings that the query
    holds, and that sample. A new release keeps most of its project's strings (PE corpus,
    setting b: 0.29-0.97); a runtime DLL shares a small part of one that links the runtime
    statically (docs/attribution.md, "Artefact pillar")."""
    shared: dict[int, int] = defaultdict(int)
    for holders in matched_strings:
        for sample_id in set(holders):
            shared[sample_id] += 1
    best: dict[tuple[str | None, str | None], tuple[float, int]] = {}
    for sample_id, count in sorted(shared.items()):
        record = samples.get(sample_id)
        total = stats.rare_string_count(sample_id)
        if record is None or record.goodware or record.sha256 == query_sha256 or total == 0:
            continue
        share = min(count / total, 1.0)
        for label in record.claims:
            if label not in best or share > best[label][0]:
                best[label] = (share, sample_id)
    return best


def find_artefact_evidence(
    stats: ArtefactStats,
    samples: Mapping[int, SampleRecord],
    features: SampleFeatures,
) -> ArtefactEvidence:
    """Artefacts of ``features`` held by few KB groups, one item per (artefact, KB label)."""
    artefacts = sample_artefacts(features)
    found = stats.lookup(artefact.key for artefact in artefacts)
    rare = [
        (artefact, match)
        for artefact in artefacts
        if (match := found.get(artefact.key)) is not None and match.weight >= RARE_ARTEFACT_WEIGHT
    ]
    shares = _best_shares(
        stats, samples, [m.samples for a, m in rare if a.kind == "string"], features.sha256
    )
    references = string_references(features)
    items: list[Evidence] = []
    for artefact, match in rare:
        related = references.get(artefact.value.strip(), ()) if artefact.kind == "string" else ()
        reason = _reason(
            artefact,
            match.owners,
            match.owner_count,
            match.goodware_count,
            stats.total_owners,
            len(related),
        )
        shown = escape_value(artefact.value)
        holders: dict[tuple[str | None, str | None], SampleRecord] = {}
        for sample_id in match.samples:
            record = samples.get(sample_id)
            if record is None or record.sha256 == features.sha256 or record.goodware:
                continue  # the query itself, when it is stored, is not evidence about itself
            for label in record.claims:
                best = shares.get(label)
                # Name the label's best-matching sample when it holds the artefact.
                if label not in holders or (best is not None and best[1] == sample_id):
                    holders[label] = record
        for (actor, family), record in sorted(
            holders.items(), key=lambda entry: (entry[0][0] or "", entry[0][1] or "")
        ):
            share = shares.get((actor, family))
            items.append(
                Evidence(
                    kind="artefact",
                    actor=actor,
                    family=family,
                    similarity=1.0,  # artefacts match exactly (normalised value)
                    weight=round(match.weight, 4),
                    reason=reason,
                    query_address=artefact.address
                    if artefact.address is not None
                    else (related[0] if related else None),
                    match_sha256=record.sha256,
                    pivot=artefact.kind,
                    value=shown,
                    matched_value=shown,
                    query_offset=artefact.offset,
                    related_addresses=related,
                    match_share=None if share is None else round(share[0], 4),
                )
            )
    items.sort(key=lambda item: (-item.weight, item.pivot or "", item.value or ""))
    return ArtefactEvidence(
        evidence=tuple(items[:MAX_ARTEFACT_ITEMS]),
        shared_library=detect_shared_library(stats, features),
        artefacts=len(artefacts),
    )


def detect_shared_library(stats: ArtefactStats, features: SampleFeatures) -> Evidence | None:
    """An item when the query is a library that samples of many KB groups import: its
    version-info file name is such a library, or it exports what they import from one."""
    exported = {e.name for e in features.exports if e.name and not e.name.startswith("#")}
    own_names: set[str] = set()
    if features.pe is not None:
        own_names = {
            value.strip().lower()
            for key, value in features.pe.version_info
            if key in ("OriginalFilename", "InternalName")
        }
    best: tuple[int, str, str] | None = None
    for library, usage in stats.libraries.items():
        if usage.importers < SHARED_LIBRARY_MIN_IMPORTERS:
            continue
        matched = usage.names & exported
        by_exports = len(matched) >= SHARED_LIBRARY_MIN_NAMES and len(
            matched
        ) >= SHARED_LIBRARY_MIN_SHARE * len(usage.names)
        # A name claim counts only with exports behind it (at least one imported name): a
        # version resource alone is trivially forged to escape attribution.
        by_name = library in own_names and bool(matched)
        if not (by_exports or by_name):
            continue
        how = (
            f"exports {len(matched)} of the {len(usage.names)} names KB samples import from it"
            + (", and its version info names it" if by_name else "")
        )
        if best is None or usage.importers > best[0]:
            best = (usage.importers, library, how)
    if best is None:
        return None
    importers, library, how = best
    usage = stats.libraries[library]
    return Evidence(
        kind="artefact",
        actor=None,
        family=None,
        similarity=1.0,
        weight=0.0,  # says who did *not* write it; adds to no hypothesis
        reason=(
            f"shared library used by {importers} groups ({', '.join(usage.examples)}): the "
            f"query {how}; a dependency many groups load is not any one group's code"
        ),
        pivot="shared-library",
        value=escape_value(library),
        matched_value=escape_value(library),
    )


def artefact_stats_for(
    store: Store,
    samples: Mapping[int, SampleRecord],
    revision: int,
    cache: Path | None,
) -> ArtefactStats:
    """The KB's artefact statistics for ``revision``: from ``cache`` when it is current, else
    built from every stored sample's features (and saved there)."""
    if cache is not None:
        try:
            return load_artefact_stats(cache, revision)
        except IndexCacheError:
            pass  # missing, stale or damaged: rebuilt below, never trusted
    ordered = sorted(samples.values(), key=lambda record: record.sha256)
    stats = build_artefact_stats(
        ((record, store.load_features(record.sha256)) for record in ordered), revision
    )
    if cache is not None:
        save_artefact_stats(stats, cache)
    return stats
