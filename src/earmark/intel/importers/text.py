"""Plain report text (a blog post saved as text, an e-mail): indicators and the actors named."""

from __future__ import annotations

from datetime import date

from earmark.intel.aliases import AliasResolver
from earmark.intel.importers.common import DEFAULT_TLP, ImportResult, report_id, unique_indicators
from earmark.intel.indicators import extract_indicators
from earmark.model.intel import IntelReport
from earmark.model.kb import Tlp

__all__ = ["import_report_text"]

_FIRST_LINE_CHARS = 200  # a title longer than this is a paragraph, not a title


def import_report_text(text: str, source: str, tlp: Tlp | None = None,
                       published: date | None = None, title: str | None = None,
                       resolver: AliasResolver | None = None) -> ImportResult:
    """One report: every indicator in the text, actors matched against known names.

    The first URL in the text is not taken as the reference: in reports it is as often C2 as
    the article's own address. The title is the first non-empty line unless given.
    """
    resolver = resolver or AliasResolver.default()
    indicators = extract_indicators(text)
    first_line = next((line.strip() for line in text.splitlines() if line.strip()), source)
    title = title or first_line[:_FIRST_LINE_CHARS]
    report = IntelReport(
        report_id=report_id(source, title),
        source=source,
        title=title,
        reference=None,
        published=published,
        tlp=tlp or DEFAULT_TLP,
        actors=resolver.find_mentions(text),
        families=(),
        indicators=unique_indicators(indicators),
    )
    warnings = () if report.indicators else ("no indicators found in the text",)
    return ImportResult((report,), (), (), warnings)
