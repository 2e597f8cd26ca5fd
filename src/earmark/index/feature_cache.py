"""On-disk cache of the feature candidate stage, keyed by the store revision.

Building ``FeatureCandidateIndex`` decodes every stored sample's features (seconds per KB); a
CLI user runs one process per ``earmark attribute``, so without a cache every call pays it.
The cache is plain ``.npy`` arrays (``allow_pickle=False``) plus a JSON manifest: the
per-function reference tuples are flattened into value arrays with offsets, strings into one
UTF-8 blob. Nothing is unpickled, and a directory that fails any check raises IndexCacheError
so the caller rebuilds instead of trusting it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from earmark.errors import IndexCacheError
from earmark.index.feature_candidates import (
    MAX_POSTINGS_PER_KEY,
    ROBUST_ROWS_PER_BAND,
    CompactFunctions,
    FeatureCandidateIndex,
    sample_ranges,
)
from earmark.model.sample import MINHASH_PERMUTATIONS

FEATURE_CACHE_FORMAT: Final = "earmark-feature-candidates"
# Bump whenever the keys (feature_keys) or the stored columns change meaning.
FEATURE_CACHE_FORMAT_VERSION: Final = 1
_MANIFEST: Final = "manifest.json"

_NUMERIC_COLUMNS: Final = {
    "sample_id": np.int64,
    "function_id": np.int64,
    "address": np.uint64,
    "size": np.int64,
    "block_count": np.int64,
    "edge_count": np.int64,
    "instruction_count": np.int64,
    "exact_hash": np.uint64,
    "minhash_length": np.int64,
    "robust_length": np.int64,
}
_SIGNATURE_COLUMNS: Final = ("minhash", "robust_minhash")
# The per-function reference tuples (see feature_candidates._References), by field.
_References = tuple[
    tuple[int, ...], tuple[str, ...], tuple[str, ...], tuple[int, ...], tuple[int, ...]
]
_INT_REFERENCES: Final[dict[str, Callable[[_References], tuple[int, ...]]]] = {
    "calls": lambda references: references[0],
    "constants": lambda references: references[3],
    "immediates": lambda references: references[4],
}
_TEXT_REFERENCES: Final[dict[str, Callable[[_References], tuple[str, ...]]]] = {
    "called_imports": lambda references: references[1],
    "strings": lambda references: references[2],
}
_UINT64_MASK: Final = (1 << 64) - 1
_INT_LOW: Final = -(1 << 64) + 1  # stored as value mod 2**64 plus a sign flag
_INT_END: Final = 1 << 64


def _parameters(min_instructions: int) -> dict[str, int]:
    return {
        "min_instructions": min_instructions,
        "permutations": MINHASH_PERMUTATIONS,
        "robust_rows_per_band": ROBUST_ROWS_PER_BAND,
        "max_postings_per_key": MAX_POSTINGS_PER_KEY,
    }


def _flatten_ints(
    index: FeatureCandidateIndex, field: Callable[[_References], tuple[int, ...]]
) -> dict[str, npt.NDArray[Any]] | None:
    values: list[int] = []
    offsets = [0]
    for references in index.stored.references:
        values.extend(field(references))
        offsets.append(len(values))
    if any(not _INT_LOW <= value < _INT_END for value in values):
        return None
    return {
        "values": np.array([value & _UINT64_MASK for value in values], dtype=np.uint64),
        "negative": np.array([value < 0 for value in values], dtype=bool),
        "offsets": np.array(offsets, dtype=np.int64),
    }


def _flatten_texts(
    index: FeatureCandidateIndex, field: Callable[[_References], tuple[str, ...]]
) -> dict[str, npt.NDArray[Any]]:
    # surrogatepass: extracted strings may hold lone surrogates; they must round-trip exactly.
    encoded = [
        text.encode("utf-8", "surrogatepass")
        for references in index.stored.references
        for text in field(references)
    ]
    counts = [len(field(references)) for references in index.stored.references]
    return {
        "blob": np.frombuffer(b"".join(encoded), dtype=np.uint8),
        "lengths": np.array([len(item) for item in encoded], dtype=np.int64),
        "offsets": np.concatenate(([0], np.cumsum(counts, dtype=np.int64))).astype(np.int64),
    }


def save_feature_candidates(
    index: FeatureCandidateIndex, path: Path, revision: int, min_instructions: int
) -> bool:
    """Write ``index`` to the directory ``path``; False (nothing written) when it holds values
    the arrays cannot carry exactly (hand-made features), which are then rebuilt per process.

    Written to a temporary sibling and renamed, so a reader never sees half a cache."""
    stored = index.stored
    if stored.irregular:
        return False
    arrays: dict[str, npt.NDArray[Any]] = {"keys": index.keys, "postings": index.postings}
    for name in (*_NUMERIC_COLUMNS, *_SIGNATURE_COLUMNS):
        arrays[name] = getattr(stored, name)
    for name, field in _INT_REFERENCES.items():
        flat = _flatten_ints(index, field)
        if flat is None:
            return False
        arrays.update({f"{name}_{part}": array for part, array in flat.items()})
    for name, text_field in _TEXT_REFERENCES.items():
        flat_texts = _flatten_texts(index, text_field)
        arrays.update({f"{name}_{part}": array for part, array in flat_texts.items()})
    source_names = sorted(set(stored.sources))
    code_of = {name: code for code, name in enumerate(source_names)}
    arrays["source_codes"] = np.array([code_of[s] for s in stored.sources], dtype=np.int64)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name, array in arrays.items():
        np.save(staging / f"{name}.npy", array, allow_pickle=False)
    manifest = {
        "format": FEATURE_CACHE_FORMAT,
        "version": FEATURE_CACHE_FORMAT_VERSION,
        "revision": revision,
        "parameters": _parameters(min_instructions),
        "rows": len(stored),
        "sources": source_names,
        "arrays": sorted(arrays),
    }
    (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if path.exists():
        shutil.rmtree(path)
    staging.rename(path)
    return True


def load_feature_candidates(
    path: Path, revision: int, min_instructions: int
) -> FeatureCandidateIndex | None:
    """The stage saved at ``path`` for ``revision``; None when absent, stale or built with
    other parameters. Raises IndexCacheError when the directory is damaged."""
    manifest_path = path / _MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FEATURE_CACHE_FORMAT:
            raise IndexCacheError(f"{path} is not an earmark feature candidate cache")
        if (
            manifest.get("version") != FEATURE_CACHE_FORMAT_VERSION
            or manifest.get("parameters") != _parameters(min_instructions)
            or manifest.get("revision") != revision
        ):
            return None
        arrays = {
            name: np.load(path / f"{name}.npy", allow_pickle=False) for name in manifest["arrays"]
        }
        return _assemble(arrays, int(manifest["rows"]), list(manifest["sources"]), path)
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
        raise IndexCacheError(f"cannot read the feature cache at {path}: {error}") from error


def _check(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise IndexCacheError(f"{path}: {what}")


def _checked_offsets(
    offsets: npt.NDArray[Any], rows: int, total: int, path: Path, name: str
) -> list[int]:
    _check(offsets.dtype == np.int64 and offsets.shape == (rows + 1,), path, f"{name} offsets")
    _check(rows == 0 or bool((np.diff(offsets) >= 0).all()), path, f"{name} offsets decrease")
    _check(int(offsets[0]) == 0 and int(offsets[-1]) == total, path, f"{name} offsets bounds")
    return [int(value) for value in offsets.tolist()]


def _unflatten_ints(
    arrays: dict[str, npt.NDArray[Any]], name: str, rows: int, path: Path
) -> list[tuple[int, ...]]:
    values, negative = arrays[f"{name}_values"], arrays[f"{name}_negative"]
    _check(values.dtype == np.uint64 and values.ndim == 1, path, f"{name} values")
    _check(negative.dtype == np.bool_ and negative.shape == values.shape, path, f"{name} signs")
    offsets = _checked_offsets(arrays[f"{name}_offsets"], rows, len(values), path, name)
    numbers = [
        value - _INT_END if is_negative else value
        for value, is_negative in zip(values.tolist(), negative.tolist(), strict=True)
    ]
    return [tuple(numbers[start:stop]) if stop > start else () for start, stop in pairwise(offsets)]


def _unflatten_texts(
    arrays: dict[str, npt.NDArray[Any]], name: str, rows: int, path: Path
) -> list[tuple[str, ...]]:
    blob, lengths = arrays[f"{name}_blob"], arrays[f"{name}_lengths"]
    _check(blob.dtype == np.uint8 and blob.ndim == 1, path, f"{name} blob")
    _check(lengths.dtype == np.int64 and lengths.ndim == 1, path, f"{name} lengths")
    _check(bool((lengths >= 0).all()) and int(lengths.sum()) == len(blob), path, f"{name} size")
    offsets = _checked_offsets(arrays[f"{name}_offsets"], rows, len(lengths), path, name)
    data = blob.tobytes()
    ends = np.cumsum(lengths).tolist()
    starts = [0, *ends[:-1]]
    texts = [
        data[start:end].decode("utf-8", "surrogatepass")
        for start, end in zip(starts, ends, strict=True)
    ]
    return [tuple(texts[start:stop]) if stop > start else () for start, stop in pairwise(offsets)]


def _assemble(
    arrays: dict[str, npt.NDArray[Any]], rows: int, sources: list[str], path: Path
) -> FeatureCandidateIndex:
    for name, dtype in _NUMERIC_COLUMNS.items():
        _check(arrays[name].dtype == dtype and arrays[name].shape == (rows,), path, name)
    for name in _SIGNATURE_COLUMNS:
        column = arrays[name]
        _check(
            column.dtype == np.uint32 and column.shape == (rows, MINHASH_PERMUTATIONS), path, name
        )
    for name in ("minhash_length", "robust_length"):
        lengths = arrays[name]
        _check(bool(np.isin(lengths, (0, MINHASH_PERMUTATIONS)).all()), path, f"{name} values")
    keys, postings = arrays["keys"], arrays["postings"]
    _check(keys.dtype == np.uint64 and keys.ndim == 1, path, "keys")
    _check(postings.dtype == np.int64 and postings.shape == keys.shape, path, "postings")
    _check(len(keys) < 2 or bool((keys[1:] >= keys[:-1]).all()), path, "keys are not sorted")
    _check(
        len(postings) == 0 or (int(postings.min()) >= 0 and int(postings.max()) < rows),
        path,
        "postings point outside the functions",
    )
    codes = arrays["source_codes"]
    _check(codes.dtype == np.int64 and codes.shape == (rows,), path, "source codes")
    _check(rows == 0 or 0 <= int(codes.min()) <= int(codes.max()) < len(sources), path, "sources")
    _check(all(isinstance(name, str) for name in sources), path, "source names")
    interned = [str(name) for name in sources]
    calls, constants, immediates = (
        _unflatten_ints(arrays, name, rows, path) for name in ("calls", "constants", "immediates")
    )
    called_imports, strings = (
        _unflatten_texts(arrays, name, rows, path) for name in ("called_imports", "strings")
    )
    references = tuple(zip(calls, called_imports, strings, constants, immediates, strict=True))
    sample_id = arrays["sample_id"]
    stored = CompactFunctions(
        sample_id=sample_id,
        function_id=arrays["function_id"],
        address=arrays["address"],
        size=arrays["size"],
        block_count=arrays["block_count"],
        edge_count=arrays["edge_count"],
        instruction_count=arrays["instruction_count"],
        exact_hash=arrays["exact_hash"],
        minhash=arrays["minhash"],
        minhash_length=arrays["minhash_length"],
        robust_minhash=arrays["robust_minhash"],
        robust_length=arrays["robust_length"],
        references=references,
        sources=tuple(interned[code] for code in codes.tolist()),
        irregular={},
        sample_ranges=sample_ranges(sample_id),
    )
    return FeatureCandidateIndex(
        keys=keys,
        postings=postings,
        stored=stored,
    )
