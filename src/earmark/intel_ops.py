"""Threat intelligence in the knowledge base: import, export, search, infrastructure evidence.

The library behind ``earmark intel …`` and the infrastructure pillar of ``earmark attribute``:

    import_intel(store, paths, …)          files/folders → IntelImportSummary (one transaction each)
    infrastructure_evidence(store, iocs)   Evidence linking values to stored reports and samples
    indicators_for_sample(features)        IOCs in a sample's strings (stored at ingest)
    indicators_from_ioc_file(path)         IOCs of an incident given as a file (no sample)
    search_intel(store, value)             everything linked to a value or an actor name
    export_intel(store, "stix"|"misp", …)  a STIX 2.1 bundle or MISP events, TLP:RED withheld

Actor names are stored as resolved at import time under the *split* taxonomy (the finest
grain), and mapped to the user's taxonomy when read: switching ``--taxonomy`` or
``EARMARK_TAXONOMY`` needs no re-import.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from earmark.config import DEFAULT_TAXONOMY, TAXONOMY_ENV_VAR
from earmark.correlate.infrastructure import InfrastructureIndex, Observation
from earmark.errors import IntelError, UsageError
from earmark.intel import AliasResolver, Taxonomy, classify_value, indicators_from_strings
from earmark.intel.eset import parse_eset_readme
from earmark.intel.maltrail import actor_name_from_file, parse_aliases, parse_maltrail_blocks
from earmark.intel.warninglists import default_benign_infrastructure
from earmark.model.evidence import Evidence
from earmark.model.intel import ActorProfile, Indicator, IndicatorType, IntelRelation, IntelReport
from earmark.model.kb import Tlp
from earmark.model.sample import SampleFeatures
from earmark.store.base import IntelWriteSummary, Store

if TYPE_CHECKING:
    # The importers are imported where they run: they load stix2 (~0.3 s), which attributing a
    # sample (indicators and infrastructure evidence only) never needs.
    from earmark.intel.importers import ColumnMapping, ImportResult

__all__ = [
    "INTEL_FORMATS",
    "SAMPLE_REPORT_PREFIX",
    "IntelFileOutcome",
    "IntelHit",
    "IntelImportSummary",
    "IntelSearchResult",
    "actor_resolver",
    "export_intel",
    "import_intel",
    "indicators_for_sample",
    "indicators_from_ioc_file",
    "infrastructure_evidence",
    "infrastructure_index",
    "parse_column_mapping",
    "read_intel_file",
    "resolve_taxonomy",
    "search_intel",
]

INTEL_FORMATS = ("auto", "stix", "attack", "misp", "csv", "txt", "text", "eset", "maltrail")
# Observations that come from a stored sample cite "sample:<sha256>" instead of a report id.
SAMPLE_REPORT_PREFIX = "sample:"
_MALTRAIL_REFERENCE = re.compile(r"^#\s*Reference:", re.IGNORECASE | re.MULTILINE)
# ATT&CK group ids (G0032): how profiles from an imported ATT&CK bundle are recognised,
# whatever source name the user gave the import.
_ATTACK_GROUP_ID = re.compile(r"^G\d{4}$")
_ESET_README = "readme.adoc"
# ESET folder names the alias catalogue does not know, mapped to the actor ESET's posts name.
# Other folders resolve by their name or one of its words (``okrum_ke3chang`` → Ke3chang); a
# folder that names no known actor is a malware family (``emotet``, ``grandoreiro``).
ESET_FOLDER_ACTORS: dict[str, str] = {
    "nukesped_lazarus": "Lazarus Group",
    "dukes": "APT29",
    "gamaredon": "Gamaredon Group",
    "donot": "Donot Team",
    "ballisticbobcat": "Charming Kitten",
    "industroyer": "Sandworm Team",
    "aridspy": "Arid Viper",
}
# ESET folders that collect several actors or topics: neither an actor nor a family.
ESET_TOPIC_FOLDERS = frozenset({
    "quarterly_reports", "exchange_exploitation", "badiis", "pwa_phishing", "zimbra_phishing",
    "ua_wipers", "ace_cryptor", "pypi_backdoor", "hotpage", "spyloan", "ngate", "evilvideo",
})


def resolve_taxonomy(value: str | Taxonomy | None = None) -> Taxonomy:
    """The argument, else ``$EARMARK_TAXONOMY``, else the default (split)."""
    chosen = value or os.environ.get(TAXONOMY_ENV_VAR) or DEFAULT_TAXONOMY
    try:
        return Taxonomy(str(chosen).strip().lower())
    except ValueError as error:
        known = ", ".join(t.value for t in Taxonomy)
        raise UsageError(f"unknown taxonomy {chosen!r} (known: {known})") from error


# -- actor names ---------------------------------------------------------------------------

_RESOLVERS: weakref.WeakKeyDictionary[object, dict[tuple[int, Taxonomy], AliasResolver]] = (
    weakref.WeakKeyDictionary()
)


def _attack_profiles(profiles: Iterable[ActorProfile]) -> list[ActorProfile]:
    return [p for p in profiles if any(_ATTACK_GROUP_ID.match(i) for i in p.external_ids)]


def actor_resolver(store: Store, taxonomy: str | Taxonomy | None = None) -> AliasResolver:
    """Names resolver for this knowledge base: ATT&CK groups imported into it replace the
    packaged copy. Built once per (store, intel revision, taxonomy): ≈0.1 s each."""
    chosen = resolve_taxonomy(taxonomy)
    key = (store.intel_revision(), chosen)
    cached = _RESOLVERS.setdefault(store, {})
    if key not in cached:
        groups = _attack_profiles(store.load_actor_profiles())
        cached.clear()  # older revisions are never asked for again
        cached[key] = (AliasResolver.build(chosen, attack_groups=groups) if groups
                       else AliasResolver.default(chosen))
    return cached[key]


# -- reading intel files -------------------------------------------------------------------


def parse_column_mapping(text: str | None) -> ColumnMapping | None:
    """``value=ioc,type=kind,actor=group,date=seen`` → ``ColumnMapping`` (None for None)."""
    from earmark.intel.importers import ColumnMapping
    if not text:
        return None
    fields: dict[str, str] = {}
    allowed = {f.name for f in dataclasses.fields(ColumnMapping)}
    for part in text.split(","):
        name, _, column = part.partition("=")
        name, column = name.strip().lower(), column.strip()
        if name not in allowed or not column:
            raise UsageError(f"bad --mapping part {part!r}: use field=column with field one of "
                             f"{', '.join(sorted(allowed))}")
        fields[name] = column
    if "value" not in fields:
        raise UsageError("--mapping needs value=<column>")
    return ColumnMapping(**fields)


def _tightened(result: ImportResult, tlp: Tlp | None, source: str | None) -> ImportResult:
    from earmark.intel.importers.common import strictest_tlp
    """Parsers with fixed provenance (ESET, maltrail): the caller may tighten TLP, rename."""
    reports = tuple(
        dataclasses.replace(r, tlp=strictest_tlp([r.tlp, tlp]) or r.tlp,
                            source=source or r.source)
        for r in result.reports
    )
    return dataclasses.replace(result, reports=reports)


def _eset_folder(readme: Path, root: Path) -> str:
    """The README's folder relative to the ESET repository root (what its report ids use).
    ``root`` is the path the user gave: the repository (it has a LICENSE) or one folder."""
    base = root if root.is_dir() and (root / "LICENSE").exists() else root.parent
    if root.is_file():
        base = readme.parent.parent
    try:
        return readme.parent.relative_to(base).as_posix()
    except ValueError:
        return readme.parent.name


def _eset_actor(resolver: AliasResolver) -> Callable[[str], str]:
    """Folder (or quarterly section title) → canonical actor, or "" when it names none."""

    def resolve(name: str) -> str:
        if name in ESET_FOLDER_ACTORS:
            return resolver.resolve(ESET_FOLDER_ACTORS[name])
        for candidate in (name, name.replace("_", " "), *name.split("_")):
            if candidate and resolver.is_known(candidate):
                return resolver.resolve(candidate)
        return ""

    return resolve


def _maltrail_actor(file_name: str, text: str, resolver: AliasResolver) -> str:
    """The file's actor: its name (``apt_lazarus`` → lazarus) or the first name on its
    ``# Aliases:`` line that the catalogue knows, resolved; else the file's own name."""
    candidates = [actor_name_from_file(file_name), *parse_aliases(text)]
    known = next((name for name in candidates if resolver.is_known(name)), candidates[0])
    return resolver.resolve(known)


def _eset_names(report: IntelReport, top_folder: str) -> IntelReport:
    actors = tuple(a for a in report.actors if a)
    families = report.families
    if not actors and top_folder not in ESET_TOPIC_FOLDERS:
        families = tuple(dict.fromkeys((top_folder, *families)))
    return dataclasses.replace(report, actors=actors, families=families)


def _file_format(path: Path, text: str, requested: str) -> str:
    if requested != "auto":
        return requested
    if path.name.lower() == _ESET_README or path.suffix.lower() == ".adoc":
        return "eset"
    if path.suffix.lower() == ".txt" and _MALTRAIL_REFERENCE.search(text):
        return "maltrail"
    return "auto"


def _import_one_file(
    path: Path, root: Path, requested: str, source: str | None, tlp: Tlp | None,
    mapping: ColumnMapping | None, published: date | None, resolver: AliasResolver,
) -> tuple[str, ImportResult]:
    from earmark.intel.importers import (
        ImportResult,
        import_attack_bundle,
        import_csv,
        import_file,
        import_misp_events,
        import_report_text,
        import_stix_bundle,
        import_txt,
    )
    from earmark.intel.importers.common import load_json, read_text

    text = read_text(path)
    if not text.strip():
        raise IntelError(f"{path}: the file is empty")
    kind = _file_format(path, text, requested)
    name = source or path.name
    if kind == "auto":
        return "auto", import_file(path, source, tlp, published, mapping, resolver)
    if kind == "eset":
        folder = _eset_folder(path, root)
        reports = parse_eset_readme(text, folder, resolve_actor=_eset_actor(resolver))
        top = folder.split("/")[0]
        reports = [_eset_names(r, top) for r in reports]
        return kind, _tightened(ImportResult(tuple(reports), (), (), ()), tlp, source)
    if kind == "maltrail":
        actor = _maltrail_actor(path.name, text, resolver)
        blocks = parse_maltrail_blocks(text, path.name, resolve_actor=lambda _name: actor)
        result = ImportResult(tuple(b.report for b in blocks), (), (), ())
        return kind, _tightened(result, tlp, source)
    if kind in ("stix", "attack", "misp"):
        data = load_json(text, path)
        if kind == "attack":
            return kind, import_attack_bundle(data, source=name, tlp=tlp, published=published)
        if kind == "stix":
            return kind, import_stix_bundle(data, name, tlp, published, resolver)
        return kind, import_misp_events(data, name, tlp, published, resolver)
    if kind == "csv":
        return kind, import_csv(text, name, mapping, tlp, published, resolver)
    if kind == "txt":
        return kind, import_txt(text, name, tlp, published)
    return kind, import_report_text(text, name, tlp, published, resolver=resolver)


def _directory_files(root: Path, requested: str) -> list[Path]:
    """Files of a folder worth importing: ESET READMEs, maltrail trails, JSON events/bundles.
    The README at the top of an ESET checkout is its index, not a report."""
    chosen = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        lower = path.name.lower()
        if lower == _ESET_README:
            if path.parent == root and (root / "LICENSE").exists():
                continue
            chosen.append(path)
        elif requested != "auto" or path.suffix.lower() in (".json", ".txt", ".csv"):
            chosen.append(path)
    return chosen


def read_intel_file(
    path: str | Path, format: str = "auto", source: str | None = None, tlp: Tlp | None = None,
    mapping: ColumnMapping | None = None, published: date | None = None,
    resolver: AliasResolver | None = None,
) -> list[tuple[Path, str, ImportResult]]:
    """Import values (no database) from a file or folder: (file, format used, result) each.

    Raises ``IntelError`` for unreadable input and ``UsageError`` for an unknown format.
    """
    root = Path(path)
    resolver = resolver or AliasResolver.default(Taxonomy.SPLIT)
    return [(file, *_import_one_file(file, root, format, source, tlp, mapping, published,
                                     resolver)) for file in _intel_files(root, format)]


def _intel_files(root: Path, format: str) -> list[Path]:
    if format not in INTEL_FORMATS:
        raise UsageError(f"unknown intel format {format!r} (known: {', '.join(INTEL_FORMATS)})")
    if root.is_dir():
        files = _directory_files(root, format)
        if not files:
            raise IntelError(f"{root}: no intel files in this folder")
        return files
    if root.is_file():
        return [root]
    raise IntelError(f"{root}: no such file or directory")


@dataclass(frozen=True, slots=True)
class IntelFileOutcome:
    path: str
    format: str  # the importer used ("auto" = detected by earmark.intel.importers)
    written: IntelWriteSummary | None  # None when the file failed
    warnings: tuple[str, ...]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class IntelImportSummary:
    outcomes: tuple[IntelFileOutcome, ...]

    @property
    def failed(self) -> int:
        return sum(1 for outcome in self.outcomes if outcome.error is not None)

    def total(self, field: str) -> int:
        """Sum of one ``IntelWriteSummary`` field over the files written."""
        return sum(int(getattr(o.written, field)) for o in self.outcomes if o.written)


def import_intel(
    store: Store, paths: Sequence[str | Path], *, format: str = "auto",
    source: str | None = None, tlp: Tlp | None = None, mapping: ColumnMapping | None = None,
    published: date | None = None, on_progress: Callable[[IntelFileOutcome], None] | None = None,
) -> IntelImportSummary:
    """Import files and folders into the knowledge base, one transaction per file.

    Re-importing the same files changes nothing (report ids are stable). A file that cannot
    be read is an outcome with ``error`` (the others still go in); ``StoreError`` raises.
    """
    resolver = AliasResolver.default(Taxonomy.SPLIT)  # stored names: the finest grain
    outcomes: list[IntelFileOutcome] = []
    def report(outcome: IntelFileOutcome) -> None:
        outcomes.append(outcome)
        if on_progress:
            on_progress(outcome)

    for given in paths:
        root = Path(given)
        try:
            files = _intel_files(root, format)
        except IntelError as error:
            report(IntelFileOutcome(str(given), format, None, (), str(error)))
            continue
        for file in files:  # one bad file in a folder costs that file only
            try:
                kind, result = _import_one_file(file, root, format, source, tlp, mapping,
                                                published, resolver)
            except IntelError as error:
                report(IntelFileOutcome(str(file), format, None, (), str(error)))
                continue
            written = store.add_intel(result.reports, result.actors, result.relations)
            report(IntelFileOutcome(str(file), kind, written, result.warnings))
    return IntelImportSummary(tuple(outcomes))


# -- the three calls the attribution pipeline makes -----------------------------------------


def indicators_for_sample(features: SampleFeatures) -> list[Indicator]:
    """Indicators in a sample's ASCII and UTF-16 strings, each with its file offset."""
    return indicators_from_strings(features.strings)


def indicators_from_ioc_file(path: Path) -> tuple[list[Indicator], date | None]:
    """The indicators of an incident given as a STIX bundle, MISP event, CSV/TXT list or
    report text, and its date (the newest report date, if any). Raises ``IntelError``."""
    seen: dict[tuple[str, str], Indicator] = {}
    dates: list[date] = []
    for _file, _kind, result in read_intel_file(path):
        for report in result.reports:
            for indicator in report.indicators:
                seen.setdefault((indicator.type.value, indicator.value), indicator)
            if report.published:
                dates.append(report.published)
    return list(seen.values()), max(dates) if dates else None


_INDEXES: weakref.WeakKeyDictionary[object, tuple[tuple[int, int, Taxonomy],
                                                  InfrastructureIndex]] = (
    weakref.WeakKeyDictionary()
)


def _report_observations(report: IntelReport, resolve: Callable[[str], str]) -> IntelReport:
    actors = tuple(dict.fromkeys(resolve(actor) for actor in report.actors))
    return dataclasses.replace(report, actors=actors)


def infrastructure_index(
    store: Store, taxonomy: str | Taxonomy | None = None
) -> InfrastructureIndex:
    """Stored reports plus labelled samples' indicators, as an ``InfrastructureIndex``.

    Cached per store on (sample revision, intel revision, taxonomy), so repeated queries in one
    process reuse it; a write by any process changes a revision and the next call rebuilds.
    """
    chosen = resolve_taxonomy(taxonomy)
    key = (store.revision(), store.intel_revision(), chosen)
    cached = _INDEXES.get(store)
    if cached is not None and cached[0] == key:
        return cached[1]
    resolver = actor_resolver(store, chosen)
    index = InfrastructureIndex()
    for report in store.load_intel_reports():
        if report.indicators:
            index.add_report(_report_observations(report, resolver.resolve))
    for sample in store.load_sample_indicators():
        claims = {(resolver.resolve(lb.actor) if lb.actor else None, lb.family)
                  for lb in sample.labels if not lb.goodware and (lb.actor or lb.family)}
        for actor, family in sorted(claims, key=lambda c: (c[0] or "", c[1] or "")):
            for indicator in sample.indicators:
                index.add_observation(Observation(
                    indicator=indicator, report_id=SAMPLE_REPORT_PREFIX + sample.sha256,
                    title=f"sample {sample.sha256}", actor=actor, family=family,
                    observed_at=sample.first_seen.date(),
                ))
    _INDEXES[store] = (key, index)
    return index


def infrastructure_evidence(
    store: Store, indicators: Sequence[Indicator], at: date | None = None, *,
    taxonomy: str | Taxonomy | None = None, exclude_sha256: str | None = None,
) -> list[Evidence]:
    """Infrastructure evidence: the query's values linked to stored reports and samples.

    ``at`` (the sample's or incident's date) turns on time decay. ``exclude_sha256`` leaves
    out the query sample's own stored indicators (attributing a sample already in the KB).
    Evidence from a sample carries its sha256 in ``match_sha256``.
    """
    index = infrastructure_index(store, taxonomy)
    excluded = SAMPLE_REPORT_PREFIX + exclude_sha256.lower() if exclude_sha256 else None

    def eligible(observation: Observation) -> bool:
        return observation.report_id != excluded

    evidence = index.correlate(indicators, at, eligible if excluded else None)
    return [
        dataclasses.replace(item, match_sha256=item.report_id.removeprefix(SAMPLE_REPORT_PREFIX))
        if item.report_id and item.report_id.startswith(SAMPLE_REPORT_PREFIX) else item
        for item in evidence
    ]


# -- search and export ----------------------------------------------------------------------

# Related values listed by a search: enough to pivot on, bounded for reports with thousands.
SEARCH_RELATED_VALUES_LIMIT = 200


@dataclass(frozen=True, slots=True)
class IntelHit:
    """One link from the searched value to a report or a sample that carries it."""

    pivot: str  # "domain", "registered-domain", "ipv4-/24", …
    key: str
    report_id: str
    title: str
    actor: str | None
    family: str | None
    observed_at: date | None
    sample_sha256: str | None  # set when the link is a stored sample, not a report


@dataclass(frozen=True, slots=True)
class IntelSearchResult:
    query: str
    actor: str | None  # canonical name when the query named an actor
    aliases: tuple[str, ...]
    benign: str | None  # the warninglist that makes the value link nothing, if any
    hits: tuple[IntelHit, ...]
    reports: tuple[IntelReport, ...]
    samples: tuple[str, ...]  # sha256 of linked or labelled samples
    related_values: tuple[Indicator, ...]  # other values of those reports and samples
    relations: tuple[IntelRelation, ...]


def _related(reports: Iterable[IntelReport], sample_values: Iterable[Indicator],
             query: str) -> tuple[Indicator, ...]:
    values: dict[tuple[str, str], Indicator] = {}
    for indicator in (*(i for r in reports for i in r.indicators), *sample_values):
        if indicator.value != query and len(values) < SEARCH_RELATED_VALUES_LIMIT:
            values.setdefault((indicator.type.value, indicator.value),
                              Indicator(indicator.type, indicator.value))
    return tuple(values.values())


def search_intel(
    store: Store, value: str, taxonomy: str | Taxonomy | None = None
) -> IntelSearchResult:
    """Pivot from one value (IP, domain, URL, hash, e-mail) or an actor name (any alias) to
    the reports, actors, samples and values linked to it."""
    query = value.strip()
    if not query:
        raise UsageError("nothing to search for")
    resolver = actor_resolver(store, taxonomy)
    indicator = classify_value(query)
    if indicator is None:
        stored = store.find_actor_names(query)
        if resolver.is_known(query) or stored:
            actor = resolver.resolve(query if resolver.is_known(query) else stored[0])
            return _search_actor(store, query, actor, resolver)
        indicator = Indicator(IndicatorType.DOMAIN, query.lower()) if "." in query else None
    if indicator is None:
        return IntelSearchResult(query, None, (), None, (), (), (), (), ())
    benign = default_benign_infrastructure().is_benign(indicator)
    hits = tuple(
        IntelHit(link.pivot, link.key, link.observation.report_id, link.observation.title,
                 link.observation.actor, link.observation.family, link.observation.observed_at,
                 link.observation.report_id.removeprefix(SAMPLE_REPORT_PREFIX)
                 if link.observation.report_id.startswith(SAMPLE_REPORT_PREFIX) else None)
        for link in infrastructure_index(store, taxonomy).search(indicator)
    )
    samples = tuple(dict.fromkeys(h.sample_sha256 for h in hits if h.sample_sha256))
    reports = tuple(store.load_intel_reports({h.report_id for h in hits if not h.sample_sha256}))
    sample_values = [i for sha in samples for s in store.load_sample_indicators(sha)
                     for i in s.indicators]
    return IntelSearchResult(query, None, (), benign, hits, reports, samples,
                             _related(reports, sample_values, indicator.value), ())


def _search_actor(store: Store, query: str, actor: str,
                  resolver: AliasResolver) -> IntelSearchResult:
    def named(names: Iterable[str]) -> bool:
        return any(resolver.resolve(name) == actor for name in names)

    reports = tuple(r for r in store.load_intel_reports() if named(r.actors))
    samples = tuple(s.sha256 for s in store.list_samples() if named(s.actors))
    actor_types = ("intrusion-set", "threat-actor")
    relations = tuple(
        r for r in store.load_intel_relations()
        if (r.source_type in actor_types and named((r.source_name,)))
        or (r.target_type in actor_types and named((r.target_name,)))
    )
    stored_aliases = [a for p in store.load_actor_profiles() if resolver.resolve(p.name) == actor
                      for a in (p.name, *p.aliases)]
    aliases = tuple(sorted({*resolver.aliases_of(actor), *stored_aliases} - {actor},
                           key=str.casefold))
    return IntelSearchResult(query, actor, aliases, None, (), reports, samples,
                             _related(reports, (), query), relations)


def export_intel(
    store: Store, format: str = "stix", actor: str | None = None, include_red: bool = False,
    taxonomy: str | Taxonomy | None = None,
) -> str:
    """Stored reports with indicators as a STIX 2.1 bundle or MISP events
    (``{"response": [{"Event": …}, …]}``, MISP's own search-result layout). Actor names are
    given in the chosen taxonomy; TLP:RED reports stay out unless ``include_red``."""
    resolver = actor_resolver(store, taxonomy)
    reports = [_report_observations(r, resolver.resolve)
               for r in store.load_intel_reports() if r.indicators]
    if actor:
        wanted = resolver.resolve(actor)
        reports = [r for r in reports if wanted in r.actors]
    # The exporters are imported here, not at module level: pymisp pulls in jsonschema's
    # format checkers (~3 s and ~30 MB at import), which every attribution would pay.
    if format == "stix":
        from earmark.report.stix_export import build_stix_bundle

        return json.dumps(build_stix_bundle(reports, include_red=include_red), indent=2)
    if format == "misp":
        from earmark.report.misp_export import misp_event_for_report, render_misp

        events = [misp_event_for_report(report, include_red) for report in reports]
        documents = [json.loads(render_misp(event)) for event in events if event is not None]
        return json.dumps({"response": documents}, indent=2)
    raise UsageError(f"unknown export format {format!r} (known: stix, misp)")
