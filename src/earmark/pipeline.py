"""The library API behind the CLI and the web API: each command is one call here.

Batch functions report per-file outcomes instead of raising, so one bad sample never stops a
batch; the caller decides the exit code with ``batch_exit_code``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from earmark.config import DEFAULT_LIMITS, Limits
from earmark.errors import InputError, UsageError
from earmark.extract import analyze_file
from earmark.freeze import dump_features, load_features
from earmark.model.sample import FunctionFeatures, SampleFeatures

__all__ = [
    "FEATURES_SUFFIX",
    "AnalysisOutcome",
    "analyze_paths",
    "batch_exit_code",
    "describe_features",
    "describe_outcome",
    "features_output_path",
    "load_features",
    "save_features",
]

FEATURES_SUFFIX = ".emf"


@dataclass(frozen=True, slots=True)
class AnalysisOutcome:
    """One file of a batch: features on success, the refusal otherwise."""

    path: Path
    features: SampleFeatures | None
    error: InputError | None
    sha256: str | None  # known even for refused files when they could be read


def analyze_paths(
    paths: Iterable[str | Path], limits: Limits = DEFAULT_LIMITS
) -> Iterator[AnalysisOutcome]:
    """Analyse each file in turn; input problems become outcomes, bugs still propagate."""
    for raw_path in paths:
        path = Path(raw_path)
        try:
            features = analyze_file(path, limits)
        except InputError as error:
            yield AnalysisOutcome(path, None, error, _sha256_if_readable(path, limits))
        else:
            yield AnalysisOutcome(path, features, None, features.sha256)


def _sha256_if_readable(path: Path, limits: Limits) -> str | None:
    # A refused sample is still worth identifying in a report; oversize files are not read.
    try:
        if not path.is_file() or path.stat().st_size > limits.max_file_bytes:
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def batch_exit_code(outcomes: Iterable[AnalysisOutcome]) -> int:
    """0 when every file was analysed; the shared exit code when all failures are of one kind;
    ``InputError.exit_code`` (10) when failures are of different kinds."""
    codes = {outcome.error.exit_code for outcome in outcomes if outcome.error is not None}
    if not codes:
        return 0
    if len(codes) == 1:
        return codes.pop()
    return InputError.exit_code


def features_output_path(output: Path, features: SampleFeatures, input_count: int) -> Path:
    """``-o`` semantics: a ``.emf`` path is the file itself (one input only), otherwise a
    directory that receives ``<sha256>.emf``."""
    if output.suffix == FEATURES_SUFFIX:
        if input_count != 1:
            raise UsageError(
                f"-o {output.name} names one file, but {input_count} inputs were given"
            )
        return output
    return output / f"{features.sha256}{FEATURES_SUFFIX}"


def save_features(features: SampleFeatures, output: Path, input_count: int) -> Path:
    target = features_output_path(output, features, input_count)
    target.parent.mkdir(parents=True, exist_ok=True)
    dump_features(features, target)
    return target


def _describe_function(function: FunctionFeatures) -> dict[str, Any]:
    return {
        "address": function.address,
        "size": function.size,
        "name": function.name,
        "source": function.source,
        "block_count": function.block_count,
        "edge_count": function.edge_count,
        "instruction_count": function.instruction_count,
        "exact_hash": f"{function.exact_hash:016x}",
        "calls": len(function.calls),
        "called_imports": list(function.called_imports),
    }


def describe_features(features: SampleFeatures) -> dict[str, Any]:
    """The JSON view of one analysed sample: all metadata, functions without their MinHash and
    token streams (those live in the features file), strings counted rather than listed."""
    pe, elf = features.pe, features.elf
    return {
        "sha256": features.sha256,
        "sha1": features.sha1,
        "md5": features.md5,
        "size": features.size,
        "format": features.format,
        "arch": features.arch,
        "bits": features.bits,
        "image_base": features.image_base,
        "entry_points": list(features.entry_points),
        "tlsh": features.tlsh,
        "sections": [
            {
                "name": section.name,
                "virtual_address": section.virtual_address,
                "virtual_size": section.virtual_size,
                "raw_offset": section.raw_offset,
                "raw_size": section.raw_size,
                "entropy": round(section.entropy, 4),
                "flags": list(section.flags),
            }
            for section in features.sections
        ],
        "imports": [f"{item.library}!{item.name}" for item in features.imports],
        "exports": [{"name": item.name, "address": item.address} for item in features.exports],
        "string_count": len(features.strings),
        "functions": [_describe_function(function) for function in features.functions],
        "pe": _describe_pe(features) if pe is not None else None,
        "elf": {
            "os_abi": elf.os_abi,
            "type": elf.elf_type,
            "interpreter": elf.interpreter,
            "needed": list(elf.needed),
            "build_id": elf.build_id,
            "comment": list(elf.comment),
        }
        if elf is not None
        else None,
        "warnings": list(features.warnings),
        "analysis_seconds": features.analysis_seconds,
        "analyzer_version": features.analyzer_version,
        "error": None,
    }


def _describe_pe(features: SampleFeatures) -> dict[str, Any]:
    pe = features.pe
    assert pe is not None  # only called for PE samples
    rich = pe.rich_header
    return {
        "timestamp": pe.timestamp,
        "linker_version": pe.linker_version,
        "os_version": pe.os_version,
        "subsystem": pe.subsystem,
        "characteristics": list(pe.characteristics),
        "imphash": pe.imphash,
        "rich_header": {
            "key": f"{rich.key:08x}",
            "checksum_valid": rich.checksum_valid,
            "entries": [
                {"product_id": e.product_id, "build": e.build, "count": e.count}
                for e in rich.entries
            ],
        }
        if rich is not None
        else None,
        "pdb_path": pe.pdb_path,
        "pdb_guid": pe.pdb_guid,
        "pdb_age": pe.pdb_age,
        "signers": [
            {"subject": s.subject, "issuer": s.issuer, "serial": s.serial, "sha1": s.sha1}
            for s in pe.signers
        ],
        "version_info": dict(pe.version_info),
        "resource_languages": list(pe.resource_languages),
    }


def describe_outcome(outcome: AnalysisOutcome) -> dict[str, Any]:
    """JSON view of one batch entry; refused files keep the same keys with nulls."""
    if outcome.features is not None:
        return {"path": str(outcome.path), **describe_features(outcome.features)}
    error = outcome.error
    return {
        "path": str(outcome.path),
        "sha256": outcome.sha256,
        "format": None,
        "arch": None,
        "bits": None,
        "functions": [],
        "error": str(error),
        "error_type": type(error).__name__,
        "exit_code": error.exit_code if error is not None else 0,
    }
