"""Knowledge-base commands: ingest, attribute, compare, demo.

Each command opens the knowledge base and calls one library function (``earmark.ingest``,
``earmark.attribution``); library errors become messages and exit codes in ``earmark.cli``'s
group, the one place that maps them. Rendering: the report package makes plain text and JSON,
this module prints it (rich ``Text``, never markup, so sample strings cannot style the terminal).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from earmark.attribution import (
    DEFAULT_TOP_HYPOTHESES,
    attribute_indicators,
    attribute_sample,
    compare_samples,
    load_query,
    open_knowledge_base,
    read_ioc_file,
    run_demo,
)
from earmark.demo_build import Target
from earmark.errors import InputError, UsageError
from earmark.ingest import IngestGroup, IngestOutcome, IngestStatus, LabelTemplate, ingest_groups
from earmark.ingest_manifest import read_manifest
from earmark.model.kb import Tlp
from earmark.report.document import CaseReport
from earmark.report.text import printable, render_case_text, render_compare_text

__all__ = ["attribute", "compare", "demo", "ingest"]

_DB_OPTION = click.option(
    "--db",
    "database",
    metavar="URL",
    help="Knowledge base: a SQLite path or a database URL (default $EARMARK_DB, ./earmark.db).",
)
_TLP_CHOICE = click.Choice([level.value for level in Tlp], case_sensitive=False)


def _ingest_exit_code(failures: tuple[IngestOutcome, ...]) -> int:
    """0 when every file went in; the failures' shared exit code, else InputError's."""
    codes = {outcome.exit_code for outcome in failures if outcome.exit_code is not None}
    if not failures:
        return 0
    return codes.pop() if len(codes) == 1 else InputError.exit_code


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--manifest",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="CSV of path,actor,family,source,tlp,goodware rows (paths relative to its folder; "
    "empty cells take the flags' values), instead of PATHS.",
)
@click.option("--actor", help="Actor every sample is attributed to.")
@click.option("--family", help="Malware family (or tool) of every sample.")
@click.option("--source", default="ingest", show_default=True, help="Who says so (provenance).")
@click.option("--tlp", type=_TLP_CHOICE, default=Tlp.AMBER.value, show_default=True)
@click.option("--goodware", is_flag=True, help="Benign/library code: discounts what it contains.")
@click.option(
    "--jobs",
    type=int,
    default=1,
    show_default=True,
    help="Processes for the analysis, and for the index build that follows.",
)
@_DB_OPTION
@click.pass_context
def ingest(
    ctx: click.Context,
    paths: tuple[Path, ...],
    manifest: Path | None,
    actor: str | None,
    family: str | None,
    source: str,
    tlp: str,
    goodware: bool,
    jobs: int,
    database: str | None,
) -> None:
    """Add files, directories, zip archives (password `infected` tried) and .emf features files
    to the knowledge base, or a labelled collection listed in a --manifest, in one process
    pool. Re-ingesting a known sample only adds the new label."""
    if bool(paths) == (manifest is not None):
        raise UsageError("give PATHS or --manifest FILE (one of them)")
    template = LabelTemplate(
        actor=actor, family=family, goodware=goodware, source=source, tlp=Tlp(tlp.lower())
    )
    # A manifest is checked whole before the knowledge base is opened: a bad row writes nothing.
    groups = read_manifest(manifest, template) if manifest else (IngestGroup(paths, template),)
    errors = Console(stderr=True, highlight=False)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed} files"),
        TimeElapsedColumn(),
        console=errors,
        transient=True,
    )

    with open_knowledge_base(database) as kb, progress:
        task = progress.add_task("ingesting", total=None)

        def report(outcome: IngestOutcome) -> None:
            progress.advance(task)
            if outcome.status is IngestStatus.FAILED:
                progress.console.print(
                    Text(f"{printable(outcome.name)}: {printable(outcome.error)}", style="red")
                )

        summary = ingest_groups(
            kb.store, groups, jobs=jobs, on_progress=report, rows=kb.row_spool()
        )
        if summary.ingested or summary.skipped:
            # Index building belongs to ingest: the next ``attribute`` finds it on disk.
            progress.update(task, description="indexing")
            kb.prepare(jobs=jobs)
    click.echo(
        f"ingested {summary.ingested}, skipped {summary.skipped} (already known: labels added), "
        f"failed {summary.failed}"
    )
    ctx.exit(_ingest_exit_code(summary.failures))


def _emit(text: str, output: Path | None) -> None:
    if output is None:
        click.echo(text)
    else:
        output.write_text(text + "\n")


def _render_case(case: CaseReport, output_format: str, tlp: Tlp) -> str:
    if output_format == "text":
        return render_case_text(case)
    # Imported for the formats that need it: the JSON/STIX/MISP renderers load pymisp, whose
    # import (jsonschema's format grammars) takes ~2.5 s of every text-only call otherwise.
    from earmark.report.json_report import render_case_json, render_case_misp, render_case_stix

    if output_format == "json":
        return render_case_json(case)
    if output_format == "stix":
        return render_case_stix(case, tlp)
    if output_format == "misp":
        rendered = render_case_misp(case, tlp)
        if rendered is None:
            raise UsageError("a TLP:RED case is not exported to MISP")
        return rendered
    return render_case_text(case)


@click.command()
@click.argument("sample", required=False)
@click.option("--iocs", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Attribute an incident from an IOC file (with or without a sample).")
@click.option("--format", "output_format", type=click.Choice(["text", "json", "stix", "misp"]),
              default="text", show_default=True)
@click.option("--top", type=int, default=DEFAULT_TOP_HYPOTHESES, show_default=True,
              help="Hypotheses kept.")
@click.option("--tlp", type=_TLP_CHOICE, default=Tlp.AMBER.value, show_default=True,
              help="Marking of the exported case (stix, misp).")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the result to this file instead of standard output.")
@_DB_OPTION
def attribute(
    sample: str | None,
    iocs: Path | None,
    output_format: str,
    top: int,
    tlp: str,
    output: Path | None,
    database: str | None,
) -> None:
    """Who is behind SAMPLE (a file, a .emf features file, or a stored sample's sha256):
    ranked actor and family hypotheses with the shared rare code as evidence."""
    if sample is None and iocs is None:
        raise UsageError("give a SAMPLE, --iocs FILE, or both")
    with open_knowledge_base(database) as kb:
        indicators, when = read_ioc_file(iocs) if iocs is not None else ([], None)
        if sample is None:
            case = attribute_indicators(
                kb, indicators, at=when, name=iocs.name if iocs else "incident", top=top
            )
        else:
            case = attribute_sample(
                kb, load_query(kb, sample), top=top, name=Path(sample).name,
                extra_indicators=indicators, at=when,
            )
    _emit(_render_case(case, output_format, Tlp(tlp.lower())), output)


@click.command()
@click.argument("sample_a")
@click.argument("sample_b")
@click.option("--json", "as_json", is_flag=True,
              help="Every function of A with its --top best candidates in B.")
@click.option("--top", type=int, default=5, show_default=True, help="Candidates per function.")
@_DB_OPTION
def compare(sample_a: str, sample_b: str, as_json: bool, top: int, database: str | None) -> None:
    """Shared functions of two samples (files, .emf files or stored sha256s), side by side with
    addresses and normalised disassembly: the reproducible proof of shared code."""
    with open_knowledge_base(database) as kb:
        first, second = load_query(kb, sample_a), load_query(kb, sample_b)
    report = compare_samples(first, second, top)
    if as_json:
        from earmark.report.json_report import render_compare_json  # see _render_case

        click.echo(render_compare_json(report))
    else:
        click.echo(render_compare_text(report))


@click.command()
@click.option("--compiler", default="gcc", show_default=True)
@click.option("--target", type=click.Choice(["elf64", "elf32", "pe64", "pe32"]),
              default="elf64", show_default=True)
@click.option("--opt", default="O2", show_default=True, help="Optimisation level of the build.")
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False),
              help="Build and keep the corpus and KB here instead of a temporary folder.")
@click.option("--json", "as_json", is_flag=True, help="The cases as a JSON array.")
def demo(compiler: str, target: str, opt: str, keep: Path | None, as_json: bool) -> None:
    """Offline demo: compile the benign demo corpus (docs/demo-corpus.md), build a KB from its
    older versions and goodware, and attribute the held-back queries."""
    errors = Console(stderr=True, highlight=False)
    errors.print(Text(f"building the demo corpus with {compiler} ({target}, -{opt})…"))
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    cases = run_demo(keep, compiler=compiler, target=cast(Target, target), opt=opt)
    if as_json:
        from earmark.report.json_report import render_case_json  # see _render_case

        click.echo("[" + ",\n".join(render_case_json(c.case) for c in cases) + "]")
        return
    for demo_case in cases:
        click.echo("=" * 78)
        click.echo(f"query {demo_case.binary.name}: expected {demo_case.expected}")
        click.echo(render_case_text(demo_case.case))
