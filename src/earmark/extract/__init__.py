"""Extraction: one sample file in, one frozen ``SampleFeatures`` out. Pure: no DB, no network.

    analyze_file(path, limits)  -> SampleFeatures
    analyze_bytes(data, limits) -> SampleFeatures

Bad samples raise ``earmark.errors.InputError`` subclasses only (see ``earmark.errors``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lief

import earmark
from earmark.config import DEFAULT_LIMITS, Limits
from earmark.errors import AnalysisTimeoutError, FileTooLargeError, InputError
from earmark.extract import elf_metadata, pe_metadata
from earmark.extract.functions import recover_functions
from earmark.extract.loader import LoadedSample, load_sample, parser_failures_as_malformed
from earmark.extract.metadata import hash_file
from earmark.extract.pe_image import PeHeader
from earmark.extract.strings import extract_strings
from earmark.memory import ANALYSIS_TRIM_SLACK_BYTES, return_free_memory_past
from earmark.model.sample import (
    FEATURES_FORMAT_VERSION,
    ElfInfo,
    Export,
    Import,
    PeInfo,
    SampleFeatures,
    Section,
)

__all__ = ["analyze_bytes", "analyze_file"]


def analyze_file(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> SampleFeatures:
    """Read ``path`` (refusing oversize files before reading them) and analyse its bytes."""
    file_path = Path(path)
    try:
        size = file_path.stat().st_size
        if size > limits.max_file_bytes:
            # Checked here too so a 10 GB file is never read into memory.
            raise FileTooLargeError(
                f"the file has {size} bytes, over the limit of {limits.max_file_bytes} "
                "(Limits.max_file_bytes)"
            )
        data = file_path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {file_path.name}: {e.strerror or e}") from e
    return analyze_bytes(data, limits)


def analyze_bytes(data: bytes, limits: Limits = DEFAULT_LIMITS) -> SampleFeatures:
    """Full extraction of one in-memory sample, bounded by ``limits``."""
    try:
        return _analyze_bytes(data, limits)
    finally:
        # The parse tree, decode tables and per-function work are freed by now; without a trim
        # glibc keeps their pages, and a process analysing sample after sample (queries, an
        # ingest worker) creeps towards its largest sample's size (``earmark.memory``). Up to
        # ANALYSIS_TRIM_SLACK_BYTES are kept for the next analysis to reuse.
        return_free_memory_past(ANALYSIS_TRIM_SLACK_BYTES)


def _analyze_bytes(data: bytes, limits: Limits) -> SampleFeatures:
    started = time.monotonic()
    deadline = started + limits.max_seconds_per_sample
    loaded = load_sample(data, limits)
    hashes = hash_file(data)
    strings, strings_capped = extract_strings(data, limits)
    warnings = list(loaded.warnings)
    if strings_capped:
        warnings.append(
            f"more than {limits.max_strings} strings; kept the first (Limits.max_strings)"
        )
    if time.monotonic() > deadline:
        raise AnalysisTimeoutError(
            f"over {limits.max_seconds_per_sample}s before function recovery "
            "(Limits.max_seconds_per_sample)"
        )
    functions, function_warnings = recover_functions(loaded.image, limits, deadline)
    warnings.extend(function_warnings)
    with parser_failures_as_malformed("metadata"):
        metadata = _format_metadata(loaded, data)
    image = loaded.image
    return SampleFeatures(
        format_version=FEATURES_FORMAT_VERSION,
        analyzer_version=earmark.__version__,
        sha256=hashes.sha256,
        sha1=hashes.sha1,
        md5=hashes.md5,
        size=hashes.size,
        format=loaded.format,
        arch=image.arch,
        bits=image.bits,
        image_base=image.image_base,
        entry_points=image.entry_points,
        tlsh=hashes.tlsh,
        sections=metadata.sections,
        imports=metadata.imports,
        exports=metadata.exports,
        strings=strings,
        functions=functions,
        pe=metadata.pe,
        elf=metadata.elf,
        warnings=tuple(warnings),
        analysis_seconds=round(time.monotonic() - started, 6),
    )


@dataclass(frozen=True, slots=True)
class _FormatMetadata:
    sections: tuple[Section, ...]
    imports: tuple[Import, ...]
    exports: tuple[Export, ...]
    pe: PeInfo | None
    elf: ElfInfo | None


def _format_metadata(loaded: LoadedSample, data: bytes) -> _FormatMetadata:
    binary, header = loaded.binary, loaded.header
    if isinstance(binary, lief.PE.Binary) and isinstance(header, PeHeader):
        base = header.image_base
        return _FormatMetadata(
            sections=pe_metadata.pe_sections(binary, header, data),
            imports=pe_metadata.pe_import_list(binary, base),
            exports=pe_metadata.pe_export_list(binary, base),
            pe=pe_metadata.pe_info(binary, header, data),
            elf=None,
        )
    if isinstance(binary, lief.ELF.Binary):
        return _FormatMetadata(
            sections=elf_metadata.elf_sections(binary, data),
            imports=elf_metadata.elf_import_list(binary),
            exports=elf_metadata.elf_export_list(binary),
            pe=None,
            elf=elf_metadata.elf_info(binary),
        )
    raise TypeError(f"unexpected parsed binary {type(binary).__name__}")  # a bug, not input
