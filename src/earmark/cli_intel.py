"""Threat-intelligence commands: ``earmark intel import``, ``export`` and ``search``.

Each command opens the knowledge base and calls one function of ``earmark.intel_ops``; errors
become messages and exit codes in ``earmark.cli`` (the one place that maps them).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from earmark import intel_ops
from earmark.errors import IntelError
from earmark.intel.importers.common import tlp_from_text
from earmark.model.kb import Tlp
from earmark.store import open_store

# Reports, hits and values printed by ``intel search`` in text mode; --json has them all.
SEARCH_ROWS_SHOWN = 25

_DB_OPTION = click.option(
    "--db", "database", default=None, metavar="URL",
    help="Knowledge base path or SQLAlchemy URL (default: $EARMARK_DB or ./earmark.db).",
)
_TAXONOMY_OPTION = click.option(
    "--taxonomy", type=click.Choice(["split", "umbrella"]), default=None,
    help="Actor taxonomy (default: $EARMARK_TAXONOMY or split).",
)


def _tlp(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Tlp | None:
    if value is None:
        return None
    found = tlp_from_text(value)
    if found is None:
        raise click.BadParameter("use clear, white, green, amber, amber+strict or red")
    return found


@click.group()
def intel() -> None:
    """Threat intelligence in the knowledge base: import, export, search."""


@intel.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--source", default=None, help="Source name kept on every record (default: file).")
@click.option("--tlp", callback=_tlp, default=None,
              help="TLP marking; tightens a file's own marking, never loosens it.")
@click.option("--format", "intel_format", type=click.Choice(intel_ops.INTEL_FORMATS),
              default="auto", show_default=True)
@click.option("--mapping", default=None, metavar="value=COL,type=COL,actor=COL,date=COL",
              help="CSV columns by header name or 0-based index.")
@_DB_OPTION
@click.pass_context
def import_command(
    ctx: click.Context, files: tuple[Path, ...], source: str | None, tlp: Tlp | None,
    intel_format: str, mapping: str | None, database: str | None,
) -> None:
    """Import STIX 2.1 / ATT&CK bundles, MISP events, CSV/TXT IOC lists, report text, ESET
    malware-ioc folders and maltrail trail files. Re-importing the same file changes nothing."""
    column_mapping = intel_ops.parse_column_mapping(mapping)
    console = Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True, highlight=False, soft_wrap=True)

    def show(outcome: intel_ops.IntelFileOutcome) -> None:
        if outcome.error is not None:
            errors.print(Text(f"{outcome.path}: {outcome.error}", style="red"))
            return
        written = outcome.written
        assert written is not None  # set whenever error is None
        console.print(Text(
            f"{outcome.path} [{outcome.format}]: {written.reports_added} new, "
            f"{written.reports_updated} updated, {written.reports_unchanged} unchanged reports; "
            f"{written.indicators_added} indicators, {written.relations_added} relations, "
            f"{written.actors_added + written.actors_updated} actor profiles"
        ))
        for warning in outcome.warnings[:5]:
            errors.print(Text(f"  warning: {warning}", style="yellow"))
        if len(outcome.warnings) > 5:
            errors.print(Text(f"  … {len(outcome.warnings) - 5} more warnings", style="yellow"))

    with open_store(database) as store:
        summary = intel_ops.import_intel(
            store, files, format=intel_format, source=source, tlp=tlp, mapping=column_mapping,
            on_progress=show,
        )
    console.print(Text(
        f"reports: {summary.total('reports_added')} new, {summary.total('reports_updated')} "
        f"updated, {summary.total('reports_unchanged')} unchanged; failed files: "
        f"{summary.failed}", style="bold"))
    if summary.failed:
        ctx.exit(IntelError.exit_code)


@intel.command("export")
@click.option("--format", "export_format", type=click.Choice(["stix", "misp"]), default="stix",
              show_default=True)
@click.option("--actor", default=None, help="Only reports naming this actor (any alias).")
@click.option("--include-red", is_flag=True, help="Also export TLP:RED records.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Write to this file instead of standard output.")
@_TAXONOMY_OPTION
@_DB_OPTION
def export_command(
    export_format: str, actor: str | None, include_red: bool, output: Path | None,
    taxonomy: str | None, database: str | None,
) -> None:
    """Export stored reports as a STIX 2.1 bundle or MISP events (TLP:RED withheld)."""
    with open_store(database) as store:
        document = intel_ops.export_intel(store, export_format, actor, include_red, taxonomy)
    if output is None:
        click.echo(document)
        return
    try:
        output.write_text(document + "\n", encoding="utf-8")
    except OSError as error:
        raise IntelError(f"cannot write {output}: {error.strerror or error}") from error


def _result_json(result: intel_ops.IntelSearchResult) -> dict[str, Any]:
    def report(item: Any) -> dict[str, Any]:
        return {
            "report_id": item.report_id, "source": item.source, "title": item.title,
            "reference": item.reference, "tlp": item.tlp.value,
            "published": item.published.isoformat() if item.published else None,
            "actors": list(item.actors), "families": list(item.families),
            "indicator_count": len(item.indicators),
        }

    return {
        "query": result.query,
        "actor": result.actor,
        "aliases": list(result.aliases),
        "benign": result.benign,
        "hits": [
            {**asdict(hit), "observed_at": hit.observed_at.isoformat() if hit.observed_at
             else None} for hit in result.hits
        ],
        "reports": [report(item) for item in result.reports],
        "samples": list(result.samples),
        "related_values": [{"type": i.type.value, "value": i.value}
                           for i in result.related_values],
        "relations": [asdict(relation) for relation in result.relations],
    }


@intel.command("search")
@click.argument("value")
@click.option("--json", "as_json", is_flag=True, help="The whole result as one JSON object.")
@_TAXONOMY_OPTION
@_DB_OPTION
def search_command(value: str, as_json: bool, taxonomy: str | None, database: str | None) -> None:
    """Everything linked to VALUE: an IP, domain, URL, hash, e-mail or an actor name."""
    with open_store(database) as store:
        result = intel_ops.search_intel(store, value, taxonomy)
    if as_json:
        click.echo(json.dumps(_result_json(result), indent=2, ensure_ascii=True))
        return
    _print_search(Console(highlight=False, soft_wrap=True), result)


def _print_search(console: Console, result: intel_ops.IntelSearchResult) -> None:
    # Intel text is untrusted: it goes in as Text, never as markup.
    if result.actor:
        console.print(Text(f"actor: {result.actor}", style="bold"))
        if result.aliases:
            console.print(Text("aliases: " + ", ".join(result.aliases[:SEARCH_ROWS_SHOWN])))
    if result.benign:
        console.print(Text(f"{result.query} is on the benign list {result.benign!r}: "
                           "it links nothing", style="yellow"))
    if result.hits:
        table = Table(title="links", title_justify="left")
        for column in ("pivot", "key", "actor", "family", "seen", "in"):
            table.add_column(column)
        for hit in result.hits[:SEARCH_ROWS_SHOWN]:
            table.add_row(hit.pivot, Text(hit.key), Text(hit.actor or "-"),
                          Text(hit.family or "-"),
                          hit.observed_at.isoformat() if hit.observed_at else "undated",
                          Text(hit.title))
        console.print(table)
    if result.reports:
        table = Table(title=f"reports ({len(result.reports)})", title_justify="left")
        for column in ("published", "source", "title", "tlp", "indicators"):
            table.add_column(column)
        for report in result.reports[:SEARCH_ROWS_SHOWN]:
            table.add_row(report.published.isoformat() if report.published else "-",
                          Text(report.source), Text(report.title), report.tlp.value,
                          str(len(report.indicators)))
        console.print(table)
    for sha256 in result.samples[:SEARCH_ROWS_SHOWN]:
        console.print(Text(f"sample {sha256}"))
    for relation in result.relations[:SEARCH_ROWS_SHOWN]:
        console.print(Text(f"{relation.source_name} {relation.relation} {relation.target_name}"
                           f" ({relation.target_type})"))
    if result.related_values:
        shown = ", ".join(i.value for i in result.related_values[:SEARCH_ROWS_SHOWN])
        console.print(Text(f"related values ({len(result.related_values)}): {shown}"))
    if not (result.actor or result.hits or result.reports or result.samples):
        console.print(Text(f"nothing in the knowledge base links to {result.query!r}"))
