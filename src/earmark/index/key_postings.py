"""Posting lists of the feature candidate stage, built while the stored samples stream by.

The stage files each KB function under its keys (``feature_candidates.feature_keys``) and
keeps only keys held by at most ``limit`` functions (``MAX_POSTINGS_PER_KEY``): a key held by
more cannot single out a function. On the PE bench KB 60 % of the 1.1 M (key, function)
entries belong to such common keys. Counts only grow as samples are added, so a key is known
to be dropped as soon as its running count passes the limit: ``PostingsBuilder`` sweeps its
entries for such keys whenever they have grown by SWEEP_GROWTH since the last sweep, drops
their entries, and turns away their later entries on arrival. The postings it finishes with
are those of sorting every entry at the end and dropping the common keys there (a key that
stays is never touched by a sweep); the build just does not hold the common keys' entries.
"""

from __future__ import annotations

from array import array
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

__all__ = ["FINISH_CHUNK_ENTRIES", "FIRST_SWEEP_ENTRIES", "SWEEP_GROWTH", "PostingsBuilder"]

# Entries held before the first sweep for common keys (2 MB of keys), and the growth of the
# entries since the last sweep that sets off the next one (the sweeps together cost a few sorts
# of the final entries). PE bench KB (1.1 M entries, 435k kept): at most 999k entries held
# without sweeps, 541k at growth 2, 490k at 1.5, 458k at 1.25, the build's CPU unchanged
# (~1.25 s); the end sort then also works on half as many entries.
FIRST_SWEEP_ENTRIES: Final = 1 << 18
SWEEP_GROWTH: Final = 1.5
# Entries ``finish`` converts or moves per step: its temporaries stay near 1 MB whatever the
# number of entries, and the per-step overhead is nothing beside the sort.
FINISH_CHUNK_ENTRIES: Final = 1 << 16

UInt64Array = npt.NDArray[np.uint64]
_Item = TypeVar("_Item", bound=np.generic)
Int64Array = npt.NDArray[np.int64]


def _members(values: UInt64Array, sorted_set: UInt64Array) -> npt.NDArray[np.bool_]:
    """Which of ``values`` are in ``sorted_set`` (sorted, unique)."""
    if len(sorted_set) == 0 or len(values) == 0:
        return np.zeros(len(values), dtype=np.bool_)
    places = np.searchsorted(sorted_set, values)
    places[places == len(sorted_set)] = 0
    found: npt.NDArray[np.bool_] = sorted_set[places] == values
    return found


def _keys_of(values: array[int]) -> UInt64Array:
    # "Q"/"q" are C long long: 8 bytes on every platform numpy supports.
    return np.frombuffer(values, dtype=np.uint64) if values else np.zeros(0, np.uint64)


def _counts_of(values: array[int]) -> Int64Array:
    return np.frombuffer(values, dtype=np.int64) if values else np.zeros(0, np.int64)


def _append(column: array[int], values: npt.NDArray[np.generic]) -> None:
    """``values`` (8-byte items, contiguous) appended without an intermediate bytes copy."""
    column.frombytes(np.ascontiguousarray(values).data.cast("B"))


class PostingsBuilder:
    """(key, function position) entries, sample by sample, in function position order."""

    def __init__(self, limit: int, first_sweep: int = FIRST_SWEEP_ENTRIES) -> None:
        self._limit = limit
        self._first_sweep = first_sweep
        self._next_sweep = first_sweep
        self._keys = array("Q")
        # Keys per function (in position order) rather than an owner per key: the owners are
        # derived from the sort order at the end, so no second array as long as the keys.
        self._counts = array("q")
        self._common: UInt64Array = np.zeros(0, np.uint64)  # sorted: keys past the limit

    def add(self, keys: UInt64Array, counts: Int64Array) -> None:
        """The next functions' keys, end to end, and how many keys each function has."""
        common = _members(keys, self._common)
        if common.any():
            owners = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
            counts = counts - np.bincount(owners[common], minlength=len(counts))
            keys = keys[~common]
        _append(self._keys, keys.astype(np.uint64, copy=False))
        _append(self._counts, counts.astype(np.int64, copy=False))
        if len(self._keys) >= self._next_sweep:
            self._sweep()
            self._next_sweep = max(self._first_sweep, int(SWEEP_GROWTH * len(self._keys)))

    def _sweep(self) -> None:
        """Drop the entries of keys whose running count passed the limit."""
        entries = _keys_of(self._keys)
        ordered = np.sort(entries)
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        runs = np.diff(np.r_[starts, len(ordered)])
        newly = ordered[starts[runs > self._limit]]
        del ordered, starts, runs
        if len(newly) == 0:
            return
        drop = _members(entries, newly)
        counts = _counts_of(self._counts)
        ends = np.cumsum(counts)
        dropped_owners = np.searchsorted(ends, np.flatnonzero(drop), side="right")
        kept_counts = counts - np.bincount(dropped_owners, minlength=len(counts))
        kept = entries[~drop]
        del entries, counts, ends, drop, dropped_owners
        self._keys, self._counts = array("Q"), array("q")  # the old buffers are freed here
        _append(self._keys, kept)
        _append(self._counts, kept_counts.astype(np.int64, copy=False))
        self._common = np.union1d(self._common, newly)

    def finish(self) -> tuple[UInt64Array, Int64Array]:
        """The kept keys, sorted, and the function position of each (functions of one key in
        position order).

        Worked in place over the entry buffer and the sort order: the owners overwrite the
        order and the kept entries move to the front of both, chunk by chunk, so the end holds
        two full-length arrays and a mask rather than four (PE bench (a+c) KB, 0.5 M entries:
        ~4 MB less at what was the build's peak). The returned arrays are the front of those
        buffers; behind them lie the few entries of keys that passed the limit after the last
        sweep."""
        key_array = _keys_of(self._keys)
        counts = _counts_of(self._counts)
        self._keys, self._counts = array("Q"), array("q")  # key_array holds the buffer now
        order = np.argsort(key_array, kind="stable")
        key_array.sort()  # in place: the same values as key_array[order], without a copy
        # Runs of equal keys in the sorted array, rather than ``np.unique``: no second sorted
        # copy.
        run_starts = np.flatnonzero(np.r_[True, key_array[1:] != key_array[:-1]])
        runs = np.diff(np.r_[run_starts, len(key_array)])
        keep = np.repeat(runs <= self._limit, runs)
        del run_starts, runs
        # Key entry e belongs to the function whose range of entries holds it; a stable sort
        # keeps each key's functions in position order, as an owner column sorted along would.
        ends = np.cumsum(counts)
        del counts
        for start in range(0, len(order), FINISH_CHUNK_ENTRIES):
            window = order[start : start + FINISH_CHUNK_ENTRIES]
            window[:] = np.searchsorted(ends, window, side="right")
        kept = _keep_in_place(key_array, keep)
        _keep_in_place(order, keep)
        return key_array[:kept], order[:kept]


def _keep_in_place(values: npt.NDArray[_Item], keep: npt.NDArray[np.bool_]) -> int:
    """Move ``values[keep]`` to the front of ``values`` (order kept); how many there are. A
    chunk's kept values land at or before the chunk's start, so no later chunk is overwritten
    before it is read."""
    kept = 0
    for start in range(0, len(values), FINISH_CHUNK_ENTRIES):
        stop = start + FINISH_CHUNK_ENTRIES
        chosen = values[start:stop][keep[start:stop]]
        values[kept : kept + len(chosen)] = chosen
        kept += len(chosen)
    return kept
