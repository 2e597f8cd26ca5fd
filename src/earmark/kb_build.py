"""The decoding pass of a knowledge-base-wide build (``KnowledgeBase.prepare``) and the
conditions it runs in.

The feature candidate stage and the artefact statistics are built from one pass over every
stored sample, decoded one at a time without its instruction tokens (neither build reads
them; docs/benchmarks.md, "Index build cost").
"""

from __future__ import annotations

import gc
import os
import pickle
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Final

from earmark.errors import StoreError
from earmark.index.artefacts import ArtefactRows, ArtefactStatsBuilder, artefact_rows
from earmark.index.feature_candidates import StageRows, TextKeys, stage_rows
from earmark.memory import cyclic_collector_paused, map_large_blocks, return_free_memory
from earmark.model.kb import SampleRecord
from earmark.model.sample import SampleFeatures
from earmark.store import FeaturesCodec, Store

__all__ = [
    "QUEUED_ROWS_PER_PROCESS",
    "RETURN_MEMORY_EVERY_FUNCTIONS",
    "RowSpool",
    "SampleRows",
    "build_pass",
    "sample_rows",
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
        return _rows(features, self._min_instructions, self._text_keys, self._string_keys)


def _rows(
    features: SampleFeatures,
    min_instructions: int,
    text_keys: TextKeys,
    string_keys: dict[str, int] | None = None,
) -> SampleRows:
    return SampleRows(
        stage=stage_rows(features.functions, min_instructions, text_keys),
        artefacts=artefact_rows(features, string_keys),
        functions=len(features.functions),
    )


def sample_rows(features: SampleFeatures, min_instructions: int) -> SampleRows:
    """The ``SampleRows`` of features at hand (an ingest worker's, just analysed), as the
    build would make them from the stored copy: the frozen format reads back equal (``==``),
    and the rows never read the instruction tokens the build leaves out."""
    return _rows(features, min_instructions, TextKeys())


class RowSpool:
    """The build rows of the samples an ingest has just written, made by its workers while
    they held the features (``ingest_groups(..., rows=spool)``), so that the next build in
    this process reads them instead of decoding those samples again (PE bench (a) KB:
    decoding was ~0.5 of ~1.9 CPU s of ``prepare``, and the rows cost the workers ~0.4 s).

    The rows are pickled into an unnamed temporary file that only this process wrote, with
    their offsets held here. A sample's stored features never change once written, so its
    rows stay valid; ``stored_rows`` uses them only for the ``min_instructions`` they were
    made with, and ``KnowledgeBase.prepare`` empties the spool after each build.

    At most ``max_samples`` are kept (~0.7 KB per function on the PE bench KB): past the
    feature stage's sample limit no build would read them, and an ingest of a large
    collection should not fill the temporary directory."""

    def __init__(self, min_instructions: int, max_samples: int) -> None:
        self.min_instructions = min_instructions
        self.max_samples = max_samples
        self._file: IO[bytes] | None = None
        self._where: dict[str, tuple[int, int]] = {}

    def has_room(self) -> bool:
        return len(self._where) < self.max_samples

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, sha256: object) -> bool:
        return sha256 in self._where

    def add(self, sha256: str, rows: SampleRows) -> None:
        """Keep the rows of ``sha256`` (dropped when the spool is full: decoded instead)."""
        if not self.has_room():
            return
        if self._file is None:
            # Held open across calls (closed by ``clear``): no ``with`` block spans its life.
            self._file = tempfile.TemporaryFile(prefix="earmark-rows-")  # noqa: SIM115
        data = pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL)
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(data)
        self._where[sha256] = (offset, len(data))

    def take(self, sha256: str) -> SampleRows:
        """The rows of ``sha256`` (KeyError when not spooled)."""
        offset, length = self._where[sha256]
        assert self._file is not None  # set by the add that recorded the offset
        self._file.seek(offset)
        rows = pickle.loads(self._file.read(length))  # written by this process, above
        if not isinstance(rows, SampleRows):
            raise StoreError("build row spool damaged")
        return rows

    def clear(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._where = {}


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
            blob = store.load_features_blob(record.sha256)
            queue.append(_submitted(pool, blob))
            if len(queue) >= jobs * QUEUED_ROWS_PER_PROCESS:
                yield _result(queue.popleft())
        while queue:
            yield _result(queue.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


def _merged(
    records: Sequence[SampleRecord], made: Iterator[SampleRows], spool: RowSpool | None
) -> Iterator[SampleRows]:
    """Each record's rows in order: spooled ones read back, the others as ``made`` (which
    holds exactly those, in the same order) gives them."""
    for record in records:
        if spool is not None and record.sha256 in spool:
            yield spool.take(record.sha256)
        else:
            yield next(made)
    for _ in made:  # none left; this lets a pool generator end and shut its pool down
        raise RuntimeError("more decoded rows than samples")


def stored_rows(
    store: Store,
    samples: Mapping[int, SampleRecord],
    min_instructions: int,
    artefacts: ArtefactStatsBuilder,
    jobs: int = 1,
    spool: RowSpool | None = None,
) -> Iterator[tuple[int, StageRows]]:
    """Every stored sample's (sample id, feature stage rows) in ``correlate.code.
    stored_samples``' order (by sha256), its artefact rows added to ``artefacts`` on the
    way, so the feature stage build and the artefact statistics share one decoding pass.

    ``jobs`` > 1 decodes and converts in that many processes (what this process does per
    sample is then adding rows): the result does not depend on it. Samples whose rows are
    in ``spool`` (made for ``min_instructions``) are not decoded."""
    records = sorted(samples.values(), key=lambda record: record.sha256)
    if spool is not None and spool.min_instructions != min_instructions:
        spool = None
    to_decode = [r for r in records if spool is None or r.sha256 not in spool]
    if jobs > 1 and len(to_decode) > 1:
        made = _rows_in_pool(store, to_decode, min_instructions, jobs)
    else:
        maker = _RowMaker(store.codec, min_instructions)
        made = (maker(store.load_features_blob(record.sha256)) for record in to_decode)
    decoded = 0
    for record, rows in zip(records, _merged(records, made, spool), strict=True):
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
