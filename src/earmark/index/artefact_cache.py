"""The artefact statistics' cache beside a SQLite KB (``<db>.artefacts/``): one ``.npy`` per
array and a JSON manifest (format, version, store revision, owner names, library usage),
written atomically and checked whole when read back (a stale or damaged cache is an
``IndexCacheError``, rebuilt by the caller and never trusted)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Final

import numpy as np

from earmark.errors import IndexCacheError
from earmark.index.artefacts import ARTEFACT_STATS_FORMAT_VERSION, ArtefactStats, LibraryUsage

__all__ = ["ARTEFACT_STATS_FORMAT", "load_artefact_stats", "save_artefact_stats"]

ARTEFACT_STATS_FORMAT: Final = "earmark-artefact-stats"
_MANIFEST: Final = "manifest.json"

_ARRAYS: Final = {
    "keys": np.uint64,
    "owner_count": np.uint32,
    "goodware_count": np.uint32,
    "weight": np.float32,
    "listed_offsets": np.int64,
    "listed_owner": np.int32,
    "listed_sample": np.int64,
    "sample_ids": np.int64,
    "rare_strings": np.int64,
}


def save_artefact_stats(stats: ArtefactStats, directory: Path) -> None:
    """Write the cache atomically: a sibling temporary directory renamed over the old one."""
    temporary = directory.with_name(directory.name + f".tmp{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for name in _ARRAYS:
        np.save(temporary / f"{name}.npy", getattr(stats, name), allow_pickle=False)
    manifest: dict[str, Any] = {
        "format": ARTEFACT_STATS_FORMAT,
        "version": ARTEFACT_STATS_FORMAT_VERSION,
        "revision": stats.revision,
        "owner_names": list(stats.owner_names),
        "total_owners": stats.total_owners,
        "libraries": {
            library: [usage.importers, list(usage.examples), sorted(usage.names)]
            for library, usage in stats.libraries.items()
        },
    }
    (temporary / _MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    temporary.rename(directory)


def load_artefact_stats(directory: Path, revision: int) -> ArtefactStats:
    """The cached statistics of ``revision``; IndexCacheError when missing, stale or damaged."""
    try:
        manifest = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))
        if (
            manifest.get("format") != ARTEFACT_STATS_FORMAT
            or manifest.get("version") != ARTEFACT_STATS_FORMAT_VERSION
            or manifest.get("revision") != revision
        ):
            raise IndexCacheError(f"{directory}: artefact statistics of another revision")
        arrays = {}
        for name, dtype in _ARRAYS.items():
            array = np.load(directory / f"{name}.npy", allow_pickle=False)
            if array.dtype != dtype or array.ndim != 1:
                raise IndexCacheError(f"{directory}: {name} has the wrong type")
            arrays[name] = array
        libraries = {
            str(library): LibraryUsage(
                int(entry[0]), tuple(map(str, entry[1])), frozenset(map(str, entry[2]))
            )
            for library, entry in manifest["libraries"].items()
        }
        owner_names = tuple(str(name) for name in manifest["owner_names"])
        total_owners = int(manifest["total_owners"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise IndexCacheError(f"{directory}: unreadable artefact statistics ({error})") from error
    size = len(arrays["keys"])
    offsets = arrays["listed_offsets"]
    if (
        any(len(arrays[n]) != size for n in ("owner_count", "goodware_count", "weight"))
        or len(offsets) != size + 1
        or (
            size
            and (
                int(offsets[-1]) != len(arrays["listed_owner"])
                or len(arrays["listed_sample"]) != len(arrays["listed_owner"])
            )
        )
        or (len(arrays["listed_owner"]) and int(arrays["listed_owner"].max()) >= len(owner_names))
        or len(arrays["sample_ids"]) != len(arrays["rare_strings"])
    ):
        raise IndexCacheError(f"{directory}: artefact statistics arrays disagree")
    return ArtefactStats(
        revision=revision,
        keys=arrays["keys"],
        owner_count=arrays["owner_count"],
        goodware_count=arrays["goodware_count"],
        weight=arrays["weight"],
        listed_offsets=offsets,
        listed_owner=arrays["listed_owner"],
        listed_sample=arrays["listed_sample"],
        sample_ids=arrays["sample_ids"],
        rare_strings=arrays["rare_strings"],
        owner_names=owner_names,
        total_owners=total_owners,
        libraries=libraries,
    )
