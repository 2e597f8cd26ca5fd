"""Labelled collections from a CSV manifest, for ``earmark ingest --manifest`` and
``earmark.ingest.ingest_groups``: one row per path with what to claim about its samples.

    path,actor,family,source,tlp,goodware
    lazarus/contopee.exe,Lazarus Group,contopee,case 17-112,amber,
    runtimes/,,,vendor sweep,green,yes

``path`` is relative to the manifest's folder (an absolute path stays as it is) and may name a
file, a directory or a zip archive, as on the command line. Only ``path`` is required; columns
may come in any order, unknown ones are refused (a misspelt "famly" would otherwise drop every
family claim silently). An empty or absent cell takes the value the caller gives for it (the
``--actor/--family/--source/--tlp/--goodware`` flags), and with no flag makes no claim.

A manifest is checked whole before any sample is read: a bad cell is a ``UsageError`` naming
its line, so a typo never half-imports a collection. A row whose file is missing is not a
manifest error: it fails alone, like a missing path on the command line, and the rest goes in
(files get quarantined or moved between writing a manifest and importing it).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from earmark.errors import UsageError
from earmark.ingest import IngestGroup, LabelTemplate
from earmark.model.kb import Tlp

MANIFEST_COLUMNS = ("path", "actor", "family", "source", "tlp", "goodware")
# Size of a manifest file: read whole before checking. Rows take ~100-300 bytes, so 32 MiB
# holds MAX_MANIFEST_ROWS; a larger file is not a manifest someone wrote.
MAX_MANIFEST_BYTES = 32 * 1024 * 1024
# Rows of one manifest: 10x the design's 10,000-sample laptop collection. The parsed rows are
# held for the whole batch: ~0.8 KB each when every row has labels of its own (measured with
# tracemalloc on 200,000 such rows: 157 MB held, 290 MB at the peak of reading, 2 CPU s per
# 100,000 rows). Larger collections go in as several manifests.
MAX_MANIFEST_ROWS = 100_000
# Characters in one cell: PATH_MAX on Linux (4,096 bytes); names of actors, families and
# sources are far shorter, and a longer cell is a broken quote swallowing the file.
MAX_MANIFEST_CELL_CHARS = 4096
_TRUE = frozenset({"true", "yes", "1", "y"})
_FALSE = frozenset({"false", "no", "0", "n"})


def _text_cell(value: str, column: str, where: str) -> str:
    text = value.strip()
    if any(not ch.isprintable() for ch in text):
        raise UsageError(f"{where}: {column} holds a control character")
    return text


def _tlp_cell(value: str, where: str) -> Tlp:
    text = value.strip().lower().removeprefix("tlp:")
    try:
        return Tlp(text)
    except ValueError:
        levels = ", ".join(level.value for level in Tlp)
        raise UsageError(f"{where}: tlp {value.strip()!r} is not one of {levels}") from None


def _goodware_cell(value: str, where: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"{where}: goodware {value.strip()!r} is not yes/no, true/false or 1/0")


def _read_text(manifest: Path) -> str:
    try:
        with manifest.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise UsageError(f"cannot read the manifest {manifest}: {error.strerror}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise UsageError(
            f"the manifest {manifest} is over {MAX_MANIFEST_BYTES:,} bytes: "
            "split the collection into several manifests"
        )
    try:
        return data.decode("utf-8-sig")  # a spreadsheet's export may start with a BOM
    except UnicodeDecodeError as error:
        raise UsageError(
            f"the manifest {manifest} is not UTF-8 text (byte {error.start})"
        ) from None


def _columns(header: list[str], manifest: Path) -> dict[str, int]:
    names = [name.strip().lower() for name in header]
    unknown = [name for name in names if name not in MANIFEST_COLUMNS]
    if unknown:
        raise UsageError(
            f"{manifest} line 1: unknown column {unknown[0]!r} "
            f"(columns: {', '.join(MANIFEST_COLUMNS)})"
        )
    if len(set(names)) != len(names):
        raise UsageError(f"{manifest} line 1: a column is named twice")
    if "path" not in names:
        raise UsageError(f"{manifest} line 1: the header has no path column")
    return {name: index for index, name in enumerate(names)}


def _row(
    cells: list[str], columns: dict[str, int], defaults: LabelTemplate, folder: Path, where: str
) -> tuple[Path, LabelTemplate]:
    if len(cells) > len(columns):
        raise UsageError(f"{where}: {len(cells)} cells, but the header names {len(columns)}")
    if any(len(cell) > MAX_MANIFEST_CELL_CHARS for cell in cells):
        raise UsageError(f"{where}: a cell is over {MAX_MANIFEST_CELL_CHARS} characters")

    def cell(column: str) -> str:
        index = columns.get(column)
        return cells[index] if index is not None and index < len(cells) else ""

    path = cell("path")
    if not path.strip():
        raise UsageError(f"{where}: the path is empty")
    if "\x00" in path:
        raise UsageError(f"{where}: the path holds a NUL character")
    actor = _text_cell(cell("actor"), "actor", where) or defaults.actor
    family = _text_cell(cell("family"), "family", where) or defaults.family
    source = _text_cell(cell("source"), "source", where) or defaults.source
    tlp_text, goodware_text = cell("tlp").strip(), cell("goodware").strip()
    tlp = _tlp_cell(tlp_text, where) if tlp_text else defaults.tlp
    goodware = _goodware_cell(goodware_text, where) if goodware_text else defaults.goodware
    try:
        labels = LabelTemplate(
            actor=actor, family=family, source=source, tlp=tlp, goodware=goodware
        )
    except UsageError as error:  # the template's own checks (goodware with an actor)
        raise UsageError(f"{where}: {error}") from None
    return folder / path, labels


def read_manifest(manifest: Path, defaults: LabelTemplate | None = None) -> tuple[IngestGroup, ...]:
    """The manifest's rows as ingest groups, in order (consecutive rows with the same labels
    share a group); ``defaults`` fills empty cells. Raises ``UsageError`` naming the line of the
    first bad row, and for a manifest over ``MAX_MANIFEST_BYTES`` or ``MAX_MANIFEST_ROWS``."""
    defaults = defaults or LabelTemplate()
    text = _read_text(manifest)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    groups: list[tuple[LabelTemplate, list[Path]]] = []
    rows = 0
    try:
        header = next(reader, None)
        if header is None:
            raise UsageError(f"the manifest {manifest} is empty")
        columns = _columns(header, manifest)
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue  # a blank line, or a row of empty cells a spreadsheet left behind
            rows += 1
            if rows > MAX_MANIFEST_ROWS:
                raise UsageError(
                    f"the manifest {manifest} has over {MAX_MANIFEST_ROWS} rows: "
                    "split the collection into several manifests"
                )
            where = f"{manifest} line {reader.line_num}"
            path, labels = _row(cells, columns, defaults, manifest.parent, where)
            if groups and groups[-1][0] == labels:
                groups[-1][1].append(path)
            else:
                groups.append((labels, [path]))
    except csv.Error as error:
        raise UsageError(f"{manifest} line {reader.line_num}: not valid CSV ({error})") from None
    return tuple(IngestGroup(tuple(paths), labels) for labels, paths in groups)
