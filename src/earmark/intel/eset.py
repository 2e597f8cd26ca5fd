"""Parser for ESET's malware-ioc repository: one folder per actor/family, a ``README.adoc`` each.

Most documents hold one ``==`` section per published report, each citing its blog post. Others
are a single report whose ``==`` sections are only "Samples", "Network", … with the blog post
cited once above them. So a ``==`` section starts a new report when it cites an ESET
publication (WeLiveSecurity, ESET's own sites); a section that cites none belongs to the report
before it, and sections before any citation belong to the document-level report (title ``=``,
citation in the preamble). Documents in :data:`MIXED_TOPIC_FOLDERS` (quarterly threat reports)
cover a different family per section: every section is its own report there.

Dates come from the cited URL (``/2019/05/``) and, failing that, from the preamble's citation.
Indicators come from the injected extractor (refanging ``1.2.3[.]4``, ``hxxp``…); URLs of the
publications themselves are not indicators and are dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from earmark.errors import IntelError
from earmark.intel.maltrail import date_from_reference_url
from earmark.model.intel import Indicator, IndicatorType, IntelReport
from earmark.model.kb import Tlp

SOURCE = "eset-malware-ioc"

IndicatorExtractor = Callable[[str], list[Indicator]]
ActorResolver = Callable[[str], str]

# Folders whose sections are unrelated topics, not parts of one report.
MIXED_TOPIC_FOLDERS = frozenset({"quarterly_reports"})
# Hosts of ESET's own publications: a link there is a citation, never an indicator.
PUBLICATION_HOSTS = frozenset(
    {"welivesecurity.com", "eset.com", "esetstatic.com", "virusradar.com", "github.com"}
)
# Detection-name families too generic to name malware (packers, droppers of anything).
GENERIC_DETECTION_NAMES = frozenset(
    {"agent", "kryptik", "trojandownloader", "trojandropper", "generik", "packed", "rootkit",
     "trojan", "spy", "backdoor", "exploit", "filecoder", "injector", "autoit", "riskware",
     "hacktool", "pua", "genkryptik", "obfuscated", "dropper", "downloader", "script"}
)

_SECTION_HEADING = re.compile(r"^==\s+(.+?)\s*$")
_DOCUMENT_HEADING = re.compile(r"^=\s+(.+?)\s*$")
# A literal (not defanged) web link in prose; AsciiDoc link text follows in [brackets].
_LITERAL_URL = re.compile(r"(?<![`+\\])\bhttps?://[^\s\[\]`<>]+", re.IGNORECASE)
_DETECTION_NAME = re.compile(
    r"\b(?:Win32|Win64|Linux|MSIL|OSX|MacOS|Android|JS|VBS|PowerShell|Python|Java|BAT|Perl|"
    r"PHP|DOC|Doc|PDF|LNK|HTML|Generik)/(?:[A-Za-z]+\.)*?([A-Za-z][A-Za-z0-9]+)\.[A-Z]{1,3}\b"
)


@dataclass(frozen=True, slots=True)
class _Section:
    title: str
    text: str
    citations: tuple[str, ...]


def _is_publication(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return any(host == known or host.endswith("." + known) for known in PUBLICATION_HOSTS)


def _citations(text: str) -> tuple[str, ...]:
    urls = (match.group(0).rstrip(".,;:)") for match in _LITERAL_URL.finditer(text))
    return tuple(dict.fromkeys(url for url in urls if _is_publication(url)))


def _split_sections(text: str) -> tuple[str, str, list[_Section]]:
    """(document title, preamble, sections) of one README.adoc."""
    title = ""
    preamble: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        heading = _SECTION_HEADING.match(line)
        if heading:
            sections.append((heading.group(1), []))
            continue
        document_heading = _DOCUMENT_HEADING.match(line)
        if document_heading and not title and not sections:
            title = document_heading.group(1)
            continue
        (sections[-1][1] if sections else preamble).append(line)
    parsed = [
        _Section(name, "\n".join(body), _citations("\n".join(body))) for name, body in sections
    ]
    return title, "\n".join(preamble), parsed


def families_from_detection_names(text: str) -> tuple[str, ...]:
    """``Win64/NukeSped.KT`` → ``NukeSped``; generic names (Kryptik, Agent) are skipped."""
    names = (match.group(1) for match in _DETECTION_NAME.finditer(text))
    return tuple(dict.fromkeys(n for n in names if n.lower() not in GENERIC_DETECTION_NAMES))


def _default_extractor() -> IndicatorExtractor:
    try:
        from earmark.intel.indicators import extract_indicators
    except ImportError as error:  # part of the intel package; absent only in a broken install
        raise IntelError("earmark.intel.indicators is not available") from error

    def extract(text: str) -> list[Indicator]:
        return extract_indicators(text)

    return extract


def parse_eset_readme(
    text: str,
    folder: str,
    extract: IndicatorExtractor | None = None,
    resolve_actor: ActorResolver | None = None,
) -> list[IntelReport]:
    """Reports in one README.adoc; ``folder`` is its path relative to the repository root."""
    extract = extract or _default_extractor()
    top_folder = folder.strip("/").split("/")[0]
    actor_label = resolve_actor(top_folder) if resolve_actor else top_folder
    document_title, preamble, sections = _split_sections(text)
    preamble_citations = _citations(preamble)

    groups: list[tuple[str, list[_Section], tuple[str, ...]]] = [
        (document_title or top_folder, [], preamble_citations)
    ]
    if top_folder in MIXED_TOPIC_FOLDERS:
        groups.extend((s.title, [s], s.citations) for s in sections)
    else:
        for section in sections:
            if section.citations:
                groups.append((section.title, [section], section.citations))
            else:
                groups[-1][1].append(section)

    reports: list[IntelReport] = []
    for index, (title, parts, citations) in enumerate(groups):
        body = "\n".join(part.text for part in parts) if parts else ""
        if index == 0 and len(groups) == 1:
            body = preamble + "\n" + body
        indicators = _indicators(extract, body)
        if not indicators:
            continue
        actors: tuple[str, ...] = ()
        if top_folder not in MIXED_TOPIC_FOLDERS:
            actors = (actor_label,)
        elif resolve_actor:
            actors = (resolve_actor(title),)
        reports.append(_report(folder, title, citations or preamble_citations, actors,
                               families_from_detection_names(body), indicators))
    return reports


# AsciiDoc link macros (``https://host/path[label]``) in prose are citations and tool links
# (YARA, Snort docs), never indicators: ESET writes indicators defanged or in backticks.
_LINK_MACRO = re.compile(r"(?<![`+\\])\bhttps?://[^\s\[\]`]+\[[^\]]*\]", re.IGNORECASE)


def _indicators(extract: IndicatorExtractor, text: str) -> tuple[Indicator, ...]:
    found: dict[Indicator, None] = {}
    text = _LINK_MACRO.sub(" ", text)
    for indicator in extract(text):
        if indicator.type == IndicatorType.EMAIL and _is_publication(
            "http://" + indicator.value.rsplit("@", 1)[-1]
        ):
            continue  # the researchers' own contact addresses
        if indicator.type == IndicatorType.URL and _is_publication(
            indicator.value if "://" in indicator.value else "http://" + indicator.value
        ):
            continue
        if indicator.type == IndicatorType.DOMAIN and any(
            indicator.value == host or indicator.value.endswith("." + host)
            for host in PUBLICATION_HOSTS
        ):
            continue
        found.setdefault(Indicator(indicator.type, indicator.value))
    return tuple(found)


def _report(
    folder: str,
    title: str,
    citations: tuple[str, ...],
    actors: tuple[str, ...],
    families: tuple[str, ...],
    indicators: tuple[Indicator, ...],
) -> IntelReport:
    reference = citations[0] if citations else None
    dates = [found for url in citations if (found := date_from_reference_url(url))]
    digest = hashlib.sha1(f"{SOURCE}|{folder}|{title}|{reference}".encode()).hexdigest()[:16]
    return IntelReport(
        report_id=f"{SOURCE}:{digest}",
        source=SOURCE,
        title=title,
        reference=reference,
        published=min(dates) if dates else None,
        tlp=Tlp.CLEAR,
        actors=actors,
        families=families,
        indicators=indicators,
    )


def parse_eset_repository(
    root: Path,
    extract: IndicatorExtractor | None = None,
    resolve_actor: ActorResolver | None = None,
) -> list[IntelReport]:
    """Every ``<folder>/**/README.adoc`` under a checkout of eset/malware-ioc."""
    extract = extract or _default_extractor()
    reports: list[IntelReport] = []
    for readme in sorted(root.glob("*/**/README.adoc")):
        folder = readme.parent.relative_to(root).as_posix()
        try:
            text = readme.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise IntelError(f"cannot read {readme}: {error}") from error
        reports.extend(parse_eset_readme(text, folder, extract, resolve_actor))
    return reports
