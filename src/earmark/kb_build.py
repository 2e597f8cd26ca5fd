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
from dataclasses import dataclass
from typing import Final

from earmark.errors import StoreError
from earmark.index.artefacts import ArtefactRows, ArtefactStatsBuilder, artefact_rows
from earmark.index.feature_candidates import StageRows, TextKeys, stage_rows
from earmark.memory import cyclic_collector_paused, map_large_blocks, return_free_memory
from earmark.model.kb import SampleRecord
from earmark.store import FeaturesCodec, Store

__all__ = [
    "QUEUED_ROWS_PER_PROCESS",
    "RETURN_MEMORY_EVERY_FUNCTIONS",
    "SampleRows",
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


@dataclass(frozen=True, slots=True)
class SampleRows:
    """What one stored sample adds to a KB-wide build: its feature stage rows and its
    artefact rows, made from its decoded features alone (``_RowMaker``)."""

    stage: StageRows
    artefacts: ArtefactRows
    functions: int  # functions decoded (the pass's memory bookkeeping)


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
        return SampleRows(
            stage=stage_rows(features.functions, self._min_instructions, self._text_keys),
            artefacts=artefact_rows(features, self._string_keys),
            functions=len(features.functions),
        )


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
) -> Iterator[SampleRows]:
    """Each record's ``SampleRows``, in order, made by ``jobs`` processes. This process reads
    the blobs (the store's connection stays here) and keeps QUEUED_ROWS_PER_PROCESS per
    process in flight, so at most that many blobs and results wait in memory."""
    pool = ProcessPoolExecutor(
        max_workers=jobs, initializer=_start_worker, initargs=(store.codec, min_instructions)
    )
    queue: deque[Future[SampleRows]] = deque()
    try:
        for record in records:
            queue.append(pool.submit(_rows_in_worker, store.load_features_blob(record.sha256)))
            if len(queue) >= jobs * QUEUED_ROWS_PER_PROCESS:
                yield _result(queue.popleft())
        while queue:
            yield _result(queue.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future: Future[SampleRows]) -> SampleRows:
    try:
        return future.result()
    except BrokenProcessPool as error:  # the stored features are ours: a bug, or killed
        raise StoreError("a process decoding stored features for the build died") from error


def stored_rows(
    store: Store,
    samples: Mapping[int, SampleRecord],
    min_instructions: int,
    artefacts: ArtefactStatsBuilder,
    jobs: int = 1,
) -> Iterator[tuple[int, StageRows]]:
    """Every stored sample's (sample id, feature stage rows) in ``correlate.code.
    stored_samples``' order (by sha256), its artefact rows added to ``artefacts`` on the
    way, so the feature stage build and the artefact statistics share one decoding pass.

    ``jobs`` > 1 decodes and converts in that many processes (what this process does per
    sample is then adding rows): the result does not depend on it."""
    records = sorted(samples.values(), key=lambda record: record.sha256)
    if jobs > 1 and len(records) > 1:
        made = _rows_in_pool(store, records, min_instructions, jobs)
    else:
        maker = _RowMaker(store.codec, min_instructions)
        made = (maker(store.load_features_blob(record.sha256)) for record in records)
    decoded = 0
    for record, rows in zip(records, made, strict=True):
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
