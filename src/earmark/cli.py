"""The ``earmark`` command: a thin click + rich face over ``earmark.pipeline``.

Errors become messages and exit codes in one place, ``main``: every ``EarmarkError`` carries its
own ``exit_code`` (see ``earmark.errors``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

import earmark
from earmark import pipeline
from earmark.errors import EarmarkError, UsageError
from earmark.extract.lief_assembly import release_lief_assembly
from earmark.model.sample import SampleFeatures

# Functions listed in the human summary; the JSON output has all of them.
TOP_FUNCTIONS_SHOWN = 10


class _EarmarkGroup(click.Group):
    """Maps every ``EarmarkError`` to a one-line message and its exit code: the one place
    where library errors meet the terminal. Other exceptions are bugs and propagate."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except EarmarkError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(error.exit_code)


@click.group(cls=_EarmarkGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(earmark.__version__, prog_name="earmark")
def cli() -> None:
    """Evidence-based attribution of cyber attacks."""


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file (JSON Lines).")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Directory for <sha256>.emf features files, or a .emf file for a single input.",
)
@click.pass_context
def analyze(
    ctx: click.Context, files: tuple[Path, ...], as_json: bool, output: Path | None
) -> None:
    """Analyse PE/ELF FILES: metadata, strings and functions. Bad files are reported and
    skipped; the exit code says what went wrong (see docs/features-format.md)."""
    if output is not None and output.suffix == pipeline.FEATURES_SUFFIX and len(files) != 1:
        raise UsageError(f"-o {output.name} names one file, but {len(files)} inputs were given")
    console = Console(highlight=False, soft_wrap=False)
    errors = Console(stderr=True, highlight=False)
    outcomes = []
    for outcome in pipeline.analyze_paths(files):
        outcomes.append(outcome)
        if outcome.features is not None and output is not None:
            pipeline.save_features(outcome.features, output, len(files))
        if as_json:
            click.echo(json.dumps(pipeline.describe_outcome(outcome), ensure_ascii=True))
        elif outcome.features is not None:
            _print_summary(console, outcome.path, outcome.features)
        else:
            errors.print(Text(f"{outcome.path}: {outcome.error}", style="red"))
    failed = sum(1 for outcome in outcomes if outcome.error is not None)
    summary = f"analysed {len(outcomes) - failed}, failed {failed}"
    # In JSON mode stdout is pure JSON Lines, so the summary goes to stderr.
    (errors if as_json else console).print(Text(summary, style="bold"))
    ctx.exit(pipeline.batch_exit_code(outcomes))


def _print_summary(console: Console, path: Path, features: SampleFeatures) -> None:
    # Every sample-derived string goes in as Text, never markup, so it cannot style the terminal.
    console.rule(Text(str(path)))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("format", f"{features.format} {features.arch} {features.bits}-bit")
    facts.add_row("sha256", features.sha256)
    facts.add_row("sha1 / md5", f"{features.sha1} / {features.md5}")
    facts.add_row("size", f"{features.size} bytes")
    facts.add_row("tlsh", features.tlsh or "-")
    if features.pe is not None:
        pe = features.pe
        facts.add_row("imphash", pe.imphash or "-")
        rich = pe.rich_header
        if rich is None:
            facts.add_row("rich header", "none")
        else:
            validity = "valid" if rich.checksum_valid else "INVALID checksum (edited?)"
            facts.add_row(
                "rich header", f"{len(rich.entries)} entries, key {rich.key:08x}, {validity}"
            )
        facts.add_row(
            "pdb", Text(f"{pe.pdb_path} {pe.pdb_guid} age {pe.pdb_age}" if pe.pdb_path else "-")
        )
        stamp = datetime.fromtimestamp(pe.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        facts.add_row("timestamp", f"{pe.timestamp} ({stamp})")
        facts.add_row("linker / os", f"{pe.linker_version} / {pe.os_version}, {pe.subsystem}")
        if pe.signers:
            facts.add_row("signed by", Text("; ".join(signer.subject for signer in pe.signers)))
    if features.elf is not None:
        elf = features.elf
        facts.add_row("elf", f"{elf.elf_type} {elf.os_abi}")
        facts.add_row("interpreter", Text(elf.interpreter or "-"))
        facts.add_row("build id", elf.build_id or "-")
        facts.add_row("compiler", Text("; ".join(elf.comment) or "-"))
    facts.add_row(
        "counts",
        f"{len(features.imports)} imports, {len(features.exports)} exports, "
        f"{len(features.strings)} strings, {len(features.functions)} functions",
    )
    console.print(facts)
    console.print(_section_table(features))
    console.print(_top_functions_table(features))
    for warning in features.warnings:
        console.print(Text(f"warning: {warning}", style="yellow"))


def _section_table(features: SampleFeatures) -> Table:
    table = Table(title="sections", title_justify="left")
    for column in ("name", "address", "virtual size", "raw size", "entropy", "flags"):
        table.add_column(column)
    for section in features.sections:
        table.add_row(
            Text(section.name),
            f"0x{section.virtual_address:x}",
            str(section.virtual_size),
            str(section.raw_size),
            f"{section.entropy:.2f}",
            ",".join(section.flags),
        )
    return table


def _top_functions_table(features: SampleFeatures) -> Table:
    table = Table(title=f"largest {TOP_FUNCTIONS_SHOWN} functions", title_justify="left")
    for column in ("address", "size", "blocks", "instructions", "found by", "name"):
        table.add_column(column)
    largest = sorted(features.functions, key=lambda function: -function.size)
    for function in largest[:TOP_FUNCTIONS_SHOWN]:
        table.add_row(
            f"0x{function.address:x}",
            str(function.size),
            str(function.block_count),
            str(function.instruction_count),
            function.source,
            Text(function.name or "-"),
        )
    return table


def main(argv: list[str] | None = None) -> None:
    """Console-script entry (``earmark.cli:main``); exits with the command's exit code."""
    # The command owns its process, which never disassembles with LIEF (capstone does).
    release_lief_assembly()
    cli.main(args=argv, prog_name="earmark")


# Knowledge-base commands live in their own module (earmark.cli_kb); registered here so the
# group's error handling covers them.
from earmark import cli_kb  # noqa: E402

for _command in (cli_kb.ingest, cli_kb.attribute, cli_kb.compare, cli_kb.demo):
    cli.add_command(_command)
from earmark.cli_intel import intel as _intel_group  # noqa: E402

cli.add_command(_intel_group)
