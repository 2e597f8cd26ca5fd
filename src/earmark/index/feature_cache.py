"""On-disk cache of the feature candidate stage, keyed by the store revision.

Building ``FeatureCandidateIndex`` decodes every stored sample's features (seconds per KB); a
CLI user runs one process per ``earmark attribute``, so without a cache every call pays it.
The cache is plain ``.npy`` arrays (``allow_pickle=False``) plus a JSON manifest: the stage's
own columns (``index.compact_functions`` keeps references flattened already), loaded
memory-mapped, so a query process reads only the pages it touches; the two MinHash columns,
most of the stage, are read by row with ``pread`` instead (``index.row_reads``: through the
mapping, fault-around made a query's scattered rows map most of both files). Nothing is
unpickled, and a directory that fails a check raises IndexCacheError so the caller rebuilds
instead of trusting it. The checks read only small arrays (offsets of the references are
checked where a row is read: a bad offset slices out of bounds or decodes garbage, never beyond
the mapped file).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from earmark.errors import IndexCacheError
from earmark.index.compact_functions import (
    INT_REFERENCES,
    NUMERIC_COLUMNS,
    SIGNATURE_COLUMNS,
    TEXT_REFERENCES,
    CompactFunctions,
    IntColumn,
    TextColumn,
    sample_ranges,
)
from earmark.index.feature_candidates import (
    MAX_POSTINGS_PER_KEY,
    ROBUST_ROWS_PER_BAND,
    FeatureCandidateIndex,
)
from earmark.index.row_reads import RowFile
from earmark.model.sample import MINHASH_PERMUTATIONS

FEATURE_CACHE_FORMAT: Final = "earmark-feature-candidates"
# Bump whenever the keys (feature_keys) or the stored columns change meaning.
# 3: texts as ids into a vocabulary of distinct texts; arrays memory-mapped.
FEATURE_CACHE_FORMAT_VERSION: Final = 3
_MANIFEST: Final = "manifest.json"


def _parameters(min_instructions: int) -> dict[str, int]:
    return {
        "min_instructions": min_instructions,
        "permutations": MINHASH_PERMUTATIONS,
        "robust_rows_per_band": ROBUST_ROWS_PER_BAND,
        "max_postings_per_key": MAX_POSTINGS_PER_KEY,
    }


def _arrays(index: FeatureCandidateIndex) -> dict[str, npt.NDArray[Any]]:
    stored = index.stored
    arrays: dict[str, npt.NDArray[Any]] = {"keys": index.keys, "postings": index.postings}
    for name in (*NUMERIC_COLUMNS, *SIGNATURE_COLUMNS):
        arrays[name] = getattr(stored, name)
    for name in INT_REFERENCES:
        ints = stored.int_references[name]
        arrays.update(
            {f"{name}_values": ints.values, f"{name}_negative": ints.negative,
             f"{name}_offsets": ints.offsets}
        )  # fmt: skip
    for name in TEXT_REFERENCES:
        texts = stored.text_references[name]
        arrays.update(
            {f"{name}_blob": texts.blob, f"{name}_starts": texts.starts,
             f"{name}_ids": texts.ids, f"{name}_offsets": texts.offsets}
        )  # fmt: skip
    arrays["source_codes"] = stored.source_codes
    return arrays


def save_feature_candidates(
    index: FeatureCandidateIndex, path: Path, revision: int, min_instructions: int
) -> bool:
    """Write ``index`` to the directory ``path``; False (nothing written) when it holds values
    the arrays cannot carry exactly (hand-made features), which are then rebuilt per process.

    Written to a temporary sibling and renamed, so a reader never sees half a cache."""
    stored = index.stored
    if stored.irregular:
        return False
    arrays = _arrays(index)
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
        "sources": list(stored.source_names),
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
    """The stage saved at ``path`` for ``revision``, memory-mapped; None when absent, stale or
    built with other parameters. Raises IndexCacheError when the directory is damaged."""
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
        # Plain ndarray views of the maps: indexing an ``np.memmap`` goes through its Python
        # subclass hooks, ~5x slower per element access in the re-ranking loop.
        arrays = {
            name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False).view(np.ndarray)
            for name in manifest["arrays"]
        }
        stage = _assemble(arrays, int(manifest["rows"]), list(manifest["sources"]), path)
        return replace(stage, mappings=tuple(_mappings(arrays.values())))
    except (OSError, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as error:
        raise IndexCacheError(f"cannot read the feature cache at {path}: {error}") from error


def _mappings(arrays: Iterable[npt.NDArray[Any]]) -> Iterator[mmap.mmap]:
    """The file mapping under each array loaded with ``mmap_mode`` (its ``base`` chain:
    ndarray view -> np.memmap -> mmap; an empty file is read without one)."""
    for array in arrays:
        base: object = array
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, mmap.mmap):
            yield base


def _check(condition: bool, path: Path, what: str) -> None:
    if not condition:
        raise IndexCacheError(f"{path}: {what}")


def _check_offsets(offsets: npt.NDArray[Any], rows: int, total: int, path: Path, name: str) -> None:
    """Dtype, length, both ends and order (the offsets are read whole anyway: the stage keeps
    every row's bounds side by side, ``CompactFunctions._reference_bounds``)."""
    _check(offsets.dtype == np.int64 and offsets.shape == (rows + 1,), path, f"{name} offsets")
    _check(int(offsets[0]) == 0 and int(offsets[-1]) == total, path, f"{name} offsets bounds")
    _check(rows == 0 or bool((np.diff(offsets) >= 0).all()), path, f"{name} offsets decrease")


def _int_column(arrays: dict[str, npt.NDArray[Any]], name: str, rows: int, path: Path) -> IntColumn:
    values, negative = arrays[f"{name}_values"], arrays[f"{name}_negative"]
    _check(values.dtype == np.uint64 and values.ndim == 1, path, f"{name} values")
    _check(negative.dtype == np.bool_ and negative.shape == values.shape, path, f"{name} signs")
    offsets = arrays[f"{name}_offsets"]
    _check_offsets(offsets, rows, len(values), path, name)
    return IntColumn(values, negative, offsets)


def _text_column(
    arrays: dict[str, npt.NDArray[Any]], name: str, rows: int, path: Path
) -> TextColumn:
    blob, starts, ids = arrays[f"{name}_blob"], arrays[f"{name}_starts"], arrays[f"{name}_ids"]
    _check(blob.dtype == np.uint8 and blob.ndim == 1, path, f"{name} blob")
    _check(starts.dtype == np.int64 and starts.ndim == 1 and len(starts) >= 1, path, f"{name}")
    _check(int(starts[0]) == 0 and int(starts[-1]) == len(blob), path, f"{name} size")
    _check(bool((np.diff(starts) >= 0).all()), path, f"{name} text starts decrease")
    # The distinct texts are decoded lazily; decoding the blob once here (1-2 MB on the PE
    # bench KB) turns damaged bytes into IndexCacheError at load, not an error mid-query.
    blob.tobytes().decode("utf-8", "surrogatepass")
    _check(ids.dtype == np.int64 and ids.ndim == 1, path, f"{name} ids")
    # Ids index the vocabulary: checked in full (8 bytes per text occurrence, small).
    _check(
        len(ids) == 0 or (int(ids.min()) >= 0 and int(ids.max()) < len(starts) - 1),
        path,
        f"{name} ids point outside the texts",
    )
    offsets = arrays[f"{name}_offsets"]
    _check_offsets(offsets, rows, len(ids), path, name)
    return TextColumn(blob, starts, ids, offsets)


def _assemble(
    arrays: dict[str, npt.NDArray[Any]], rows: int, sources: list[str], path: Path
) -> FeatureCandidateIndex:
    for name, dtype in NUMERIC_COLUMNS.items():
        _check(arrays[name].dtype == dtype and arrays[name].shape == (rows,), path, name)
    for name in SIGNATURE_COLUMNS:
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
    sample_id = arrays["sample_id"]
    stored = CompactFunctions(
        **{name: arrays[name] for name in (*NUMERIC_COLUMNS, *SIGNATURE_COLUMNS)},
        int_references={name: _int_column(arrays, name, rows, path) for name in INT_REFERENCES},
        text_references={name: _text_column(arrays, name, rows, path) for name in TEXT_REFERENCES},
        source_codes=codes,
        source_names=tuple(str(name) for name in sources),
        irregular={},
        sample_ranges=sample_ranges(sample_id),
        row_files={name: RowFile(path / f"{name}.npy") for name in SIGNATURE_COLUMNS},
    )
    return FeatureCandidateIndex(keys=keys, postings=postings, stored=stored)
