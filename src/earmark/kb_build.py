"""The decoding pass of a knowledge-base-wide build (``KnowledgeBase.prepare``) and the
conditions it runs in.

The feature candidate stage and the artefact statistics are built from one pass over every
stored sample, decoded one at a time without its instruction tokens (neither build reads
them; docs/benchmarks.md, "Index build cost").
"""

from __future__ import annotations

import gc
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Final

from earmark.errors import StoreError
from earmark.index.artefacts import ArtefactStatsBuilder
from earmark.index.feature_candidates import StageRows, TextKeys
from earmark.kb_rows import (
    BuildRows,
    Origin,
    RowCache,
    RowSpool,
    SampleRows,
    origin_of,
    rows_of,
)
from earmark.memory import cyclic_collector_paused, map_large_blocks, return_free_memory
from earmark.model.kb import SampleRecord
from earmark.store import FeaturesCodec, Store

__all__ = [
    "QUEUED_ROWS_PER_PROCESS",
    "RETURN_MEMORY_EVERY_FUNCTIONS",
    "build_pass",
    "stored_rows",
]

# Decoded functions after which the pass hands freed heap back to the system
# (``malloc_trim``): freed samples leave holes between the growing build arrays that glibc
# keeps. PE bench KB (38.9k functions, ~385 per sample): prepare's peak over the process's RSS
# before it 77-83 MB without, 69-70 MB at every ~1,500 functions (4 samples), 75 MB after
# every sample, whose 101 calls also cost ~0.15 CPU s against ~0.04 s.
RETURN_MEMORY_EVERY_FUNCTIONS: Final = 1_500

# Samples in flight per build process (a blob sent, or rows waiting to be added): two keep a
# process busy while this one adds the rows before, and bound what waits in memory.
QUEUED_ROWS_PER_PROCESS: Final = 2


@contextmanager
def build_pass() -> Iterator[None]:
    """A KB-wide build with the cyclic garbage collector paused, and the memory it freed
    handed back to the system afterwards.

    Decoding every stored sample allocates millions of tuples and strings, none of them in a
    reference cycle; each allocation burst set off collections that walked every live object
    (PE bench KB: 0.6 of 2.6 CPU s of ``prepare``). Paused for the build only, and only
    re-enabled if it was on. Reference counting still frees each decoded sample at once.
    Its large arrays are mapped blocks from here on (``memory.map_large_blocks``)."""
    map_large_blocks()
    try:
        with cyclic_collector_paused():
            yield
    finally:
        return_free_memory()


class _RowMaker:
    """Decodes a stored sample (without instruction tokens) into its ``SampleRows``; its
    memos of text keys and string keys last as long as it does (one build, in one process)."""

    def __init__(self, codec: FeaturesCodec, min_instructions: int) -> None:
        self._codec = codec
        self._min_instructions = min_instructions
        self._text_keys = TextKeys()
        self._string_keys: dict[str, int] = {}

    def __call__(self, blob: bytes) -> SampleRows:
        features = self._codec.from_bytes(blob, instructions=False)
        return rows_of(features, self._min_instructions, self._text_keys, self._string_keys)


_worker_rows: _RowMaker | None = None  # a build process's maker (``_start_worker``)


def _start_worker(codec: FeaturesCodec, min_instructions: int) -> None:
    """Initializer of a build process: its maker, and no cyclic collection (the decoded
    samples hold no cycles, and a collection would walk the whole tree of each; the
    process ends with the build)."""
    global _worker_rows
    gc.disable()
    _worker_rows = _RowMaker(codec, min_instructions)


def _rows_in_worker(blob: bytes) -> SampleRows:
    if _worker_rows is None:  # only ever run through _start_worker's pool
        raise RuntimeError("build process started without its initializer")
    return _worker_rows(blob)


def _rows_in_pool(
    store: Store, records: Sequence[SampleRecord], min_instructions: int, jobs: int
) -> Iterator[tuple[Origin, SampleRows]]:
    """Each record's stored bytes' origin and ``SampleRows``, in order, made by ``jobs``
    processes. This process reads the blobs (the store's connection stays here) and keeps
    QUEUED_ROWS_PER_PROCESS per process in flight, so at most that many blobs and results
    wait in memory."""
    pool = ProcessPoolExecutor(
        max_workers=jobs, initializer=_start_worker, initargs=(store.codec, min_instructions)
    )
    queue: deque[tuple[Origin, Future[SampleRows]]] = deque()
    try:
        for record in records:
            blob = store.load_features_blob(record.sha256)
            queue.append((origin_of(blob), _submitted(pool, blob)))
            if len(queue) >= jobs * QUEUED_ROWS_PER_PROCESS:
                origin, future = queue.popleft()
                yield origin, _result(future)
        while queue:
            origin, future = queue.popleft()
            yield origin, _result(future)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _rows_here(
    store: Store, records: Sequence[SampleRecord], maker: _RowMaker
) -> Iterator[tuple[Origin, SampleRows]]:
    for record in records:
        blob = store.load_features_blob(record.sha256)
        yield origin_of(blob), maker(blob)


# The stored features are ours, so a build process that dies is a bug or was killed (out of
# memory): the pool breaks, which a submit or a result reports, and the build stops.
_DIED: Final = "a process decoding stored features for the build died"


def _submitted(pool: ProcessPoolExecutor, blob: bytes) -> Future[SampleRows]:
    try:
        return pool.submit(_rows_in_worker, blob)
    except BrokenProcessPool as error:
        raise StoreError(_DIED) from error


def _result(future: Future[SampleRows]) -> SampleRows:
    try:
        return future.result()
    except BrokenProcessPool as error:
        raise StoreError(_DIED) from error


def _kept(
    store: Store, records: Sequence[SampleRecord], kept: BuildRows | None
) -> dict[str, Origin | None]:
    """The samples whose rows ``kept`` holds, each with the origin its rows must have been
    made from (None: spooled, or cached by that object, so known to be this store's). A cache
    file some other process wrote is checked against the stored bytes (reading them costs
    ~0.3 ms per sample against ~10 ms to decode one)."""
    if kept is None:
        return {}
    if isinstance(kept, RowSpool):
        return {record.sha256: None for record in records if record.sha256 in kept}
    found: dict[str, Origin | None] = {}
    for record in records:
        if record.sha256 in kept:
            found[record.sha256] = None
        elif kept.origin_needed(record.sha256):
            origin = origin_of(store.load_features_blob(record.sha256))
            if kept.usable(record.sha256, origin):
                found[record.sha256] = origin
    return found


def _merged(
    store: Store,
    records: Sequence[SampleRecord],
    made: Iterator[tuple[Origin, SampleRows]],
    kept: BuildRows | None,
    found: Mapping[str, Origin | None],
    maker: _RowMaker,
) -> Iterator[SampleRows]:
    """Each record's rows in order: those ``kept`` holds read back, the others as ``made``
    (which holds exactly those, in the same order) gives them, and then kept in a cache."""
    for record in records:
        sha256 = record.sha256
        if sha256 in found:
            if isinstance(kept, RowSpool):
                yield kept.take(sha256)
                continue
            assert kept is not None  # found is empty without it
            rows = kept.get(sha256, found[sha256])
            if rows is None:  # damaged since it was checked: decoded here instead
                blob = store.load_features_blob(sha256)
                rows = maker(blob)
                kept.keep(sha256, rows, origin_of(blob))
            yield rows
        else:
            origin, rows = next(made)
            if isinstance(kept, RowCache):
                kept.keep(sha256, rows, origin)
            yield rows
    for _ in made:  # none left; this lets a pool generator end and shut its pool down
        raise RuntimeError("more decoded rows than samples")


def stored_rows(
    store: Store,
    samples: Mapping[int, SampleRecord],
    min_instructions: int,
    artefacts: ArtefactStatsBuilder,
    jobs: int = 1,
    kept: BuildRows | None = None,
) -> Iterator[tuple[int, StageRows]]:
    """Every stored sample's (sample id, feature stage rows) in ``correlate.code.
    stored_samples``' order (by sha256), its artefact rows added to ``artefacts`` on the
    way, so the feature stage build and the artefact statistics share one decoding pass.

    ``jobs`` > 1 decodes and converts in that many processes (what this process does per
    sample is then adding rows): the result does not depend on it. Samples whose rows
    ``kept`` holds (made for ``min_instructions``) are not decoded; with a ``RowCache``,
    the rows of every sample decoded are written to it for the next build."""
    records = sorted(samples.values(), key=lambda record: record.sha256)
    if kept is not None and kept.min_instructions != min_instructions:
        kept = None
    if isinstance(kept, RowCache):
        kept.prune({record.sha256 for record in records})
    found = _kept(store, records, kept)
    to_decode = [record for record in records if record.sha256 not in found]
    maker = _RowMaker(store.codec, min_instructions)
    if jobs > 1 and len(to_decode) > 1:
        made = _rows_in_pool(store, to_decode, min_instructions, jobs)
    else:
        made = _rows_here(store, to_decode, maker)
    decoded = 0
    merged = _merged(store, records, made, kept, found, maker)
    for record, rows in zip(records, merged, strict=True):
        artefacts.add_rows(record, rows.artefacts)
        decoded += rows.functions
        yield record.sample_id, rows.stage
        del rows  # not alive while the next sample is made
        if decoded >= RETURN_MEMORY_EVERY_FUNCTIONS:
            return_free_memory()
            decoded = 0
    # The consumer finishes its build next (the feature stage's sorts and columns, the peak
    # of ``prepare``): the memo of the artefact pass and the last samples' freed heap are
    # not held through it.
    artefacts.stop_adding()
    return_free_memory()
