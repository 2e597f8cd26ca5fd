"""Put samples into the knowledge base: files, directories, zip archives and frozen features.

``ingest_groups`` is the library function behind ``earmark ingest``: several groups of paths,
each with its own labels (one folder per family, the rows of a manifest), go through one process
pool, so a labelled collection pays for one pool start and one idle tail, not one per group;
``ingest_paths`` is its one-group case. The parent process hashes every input first and skips
analysis of samples the store already has (only the label is added); new samples are analysed in
the pool and written by the parent, one transaction per sample, so a killed batch leaves whole
samples or nothing. A sample met several times in a batch is analysed once and gets the label of
every group it was met in, as separate calls would give it.

Inputs are hostile: archive members are read into memory with bounded size and count (zip bombs)
and never written to disk at all (analysis works on bytes); a worker killed by a crashing parser
costs the one file that crashed it, not the batch.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import cast

import pyzipper

from earmark.config import DEFAULT_LIMITS, Limits
from earmark.errors import (
    EarmarkError,
    EmptyFileError,
    FeaturesFileError,
    FileTooLargeError,
    InputError,
    MalformedFileError,
    UnsupportedFormatError,
    UsageError,
)
from earmark.extract import analyze_bytes
from earmark.freeze import load_features as load_frozen_features
from earmark.ingest_analysis import Analysis, Analyzer, analyze_for_store, prepare_for_store
from earmark.ingest_pool import run_in_pool
from earmark.intel.indicators import compile_patterns
from earmark.intel.public_suffixes import host_parts
from earmark.kb_rows import BuildRows, RowCache, WrittenRows
from earmark.model.intel import Indicator
from earmark.model.kb import Provenance, SampleLabel, Tlp
from earmark.model.sample import SampleFeatures
from earmark.store.base import FeaturesCodec, Store
from earmark.store.rows import PreparedSample

# Password the malware-sharing community puts on sample archives (VirusTotal, MalwareBazaar, ...).
COMMUNITY_ARCHIVE_PASSWORD = b"infected"
# Members read from one archive; MalwareBazaar daily batches hold a few thousand, and an archive
# with more is more likely a bomb of tiny members than a collection.
MAX_ARCHIVE_MEMBERS = 100_000
# Frozen features files written by ``earmark.freeze`` (analysed once, replayed here).
FROZEN_FEATURES_SUFFIX = ".emf"
# Analyses queued per worker: keeps workers busy while bounding the sample bytes held in memory
# for queued work (at most workers x 2 x Limits.max_file_bytes).
QUEUED_ANALYSES_PER_WORKER = 2
# Finished analyses per worker that may wait for an earlier, slower one (samples are written in
# input order, so sample ids do not depend on scheduling): workers go on with later files while
# a large one is analysed. A waiting result is a sample's rows, frozen features and indicators:
# 0.4 MB on average, 1.6 MB at most (2-4.6x the file) over the 130 corpus PE files <= 1 MB.
QUEUED_RESULTS_HELD_PER_WORKER = 8
ZIP_MAGIC = b"PK\x03\x04"
DEFAULT_SOURCE = "ingest"


class IngestStatus(StrEnum):
    INGESTED = "ingested"  # new sample written
    SKIPPED = "skipped"  # already in the knowledge base (or twice in the batch): label added only
    FAILED = "failed"  # refused or unreadable; see error


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    name: str  # the path, or "archive.zip!member" (control characters replaced)
    status: IngestStatus
    sha256: str | None = None
    error_type: str | None = None  # exception class name, e.g. "UnsupportedFormatError"
    error: str | None = None
    exit_code: int | None = None  # the exit code of that error (earmark.errors)


@dataclass(frozen=True, slots=True)
class IngestSummary:
    outcomes: tuple[IngestOutcome, ...]

    def _count(self, status: IngestStatus) -> int:
        return sum(1 for outcome in self.outcomes if outcome.status is status)

    @property
    def ingested(self) -> int:
        return self._count(IngestStatus.INGESTED)

    @property
    def skipped(self) -> int:
        return self._count(IngestStatus.SKIPPED)

    @property
    def failed(self) -> int:
        return self._count(IngestStatus.FAILED)

    @property
    def failures(self) -> tuple[IngestOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status is IngestStatus.FAILED)


@dataclass(frozen=True, slots=True)
class LabelTemplate:
    """What ``--actor/--family/--goodware/--source/--tlp`` say about every sample of a batch."""

    actor: str | None = None
    family: str | None = None
    goodware: bool = False
    source: str = DEFAULT_SOURCE
    tlp: Tlp = Tlp.AMBER

    def __post_init__(self) -> None:
        if self.goodware and self.actor:
            raise UsageError("a sample cannot be goodware and attributed to an actor at once")
        if not self.source.strip():
            raise UsageError("the source of a label cannot be empty")

    def provenance(self, recorded_at: datetime) -> Provenance:
        return Provenance(source=self.source, recorded_at=recorded_at, tlp=self.tlp)

    def label(self, recorded_at: datetime) -> SampleLabel | None:
        """The label to record, or None when the template makes no claim (provenance only)."""
        if not (self.actor or self.family or self.goodware):
            return None
        return SampleLabel(
            actor=self.actor or None,
            family=self.family or None,
            goodware=self.goodware,
            provenance=self.provenance(recorded_at),
        )


def _printable(text: str) -> str:
    """Names from archives are untrusted: no control characters reach a terminal or log."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _failure(name: str, error: EarmarkError, sha256: str | None = None) -> IngestOutcome:
    return IngestOutcome(
        name=name,
        status=IngestStatus.FAILED,
        sha256=sha256,
        error_type=type(error).__name__,
        error=_printable(str(error)),
        exit_code=error.exit_code,
    )


@dataclass(frozen=True, slots=True)
class IngestGroup:
    """Paths (files, directories, zip archives, ``.emf`` files) and what to claim about every
    sample found under them."""

    paths: tuple[str | Path, ...]
    labels: LabelTemplate = LabelTemplate()


@dataclass(frozen=True, slots=True)
class _Claim:
    """A group's label and provenance, stamped with the batch's time: equal templates give
    equal claims, so a sample met twice under the same labels is labelled once."""

    label: SampleLabel | None
    provenance: Provenance

    @classmethod
    def of(cls, template: LabelTemplate, recorded_at: datetime) -> _Claim:
        return cls(template.label(recorded_at), template.provenance(recorded_at))


@dataclass(slots=True)
class _Job:
    """One sample waiting for analysis, with its bytes (read once, hashed, then analysed), or
    with the features of a frozen features file (no analysis: prepared by the parent, but
    written in its turn like the others)."""

    name: str
    sha256: str
    data: bytes
    claim: _Claim
    frozen: SampleFeatures | None = None


@dataclass(slots=True)
class _Seen:
    """What the batch knows of one sha256 it has met."""

    stored: bool = False  # in the knowledge base, before this batch or written by it
    failure: IngestOutcome | None = None  # its analysis failed (every copy fails alike)
    claims: set[_Claim] = field(default_factory=set)  # recorded on it by this batch
    # Later copies met while the first one is still being analysed: settled with its result.
    waiting: list[tuple[str, _Claim]] = field(default_factory=list)


@dataclass(slots=True)
class _Batch:
    store: Store
    limits: Limits
    on_progress: Callable[[IngestOutcome], None] | None
    outcomes: list[IngestOutcome] = field(default_factory=list)
    seen: dict[str, _Seen] = field(default_factory=dict)  # by sha256
    spool: BuildRows | None = None  # build rows of the samples written, for the next prepare

    def report(self, outcome: IngestOutcome) -> None:
        self.outcomes.append(outcome)
        if self.on_progress is not None:
            self.on_progress(outcome)

    def _relabel(self, name: str, sha256: str, seen: _Seen, claim: _Claim) -> None:
        """A copy of a stored sample: its claim is added (once per batch) and it is skipped."""
        if claim not in seen.claims:
            seen.claims.add(claim)
            if claim.label is not None:
                self.store.add_label(sha256, claim.label)
        self.report(IngestOutcome(name, IngestStatus.SKIPPED, sha256))

    def known(self, name: str, sha256: str, claim: _Claim, *, frozen: bool = False) -> bool:
        """True when this sample needs no analysis: its outcome is reported now, or when the
        analysis of an earlier copy in this batch ends. A ``frozen`` features file is stored
        unless the sample is, whatever the analysis of a copy gives (as separate calls would)."""
        seen = self.seen.get(sha256)
        if seen is None:
            seen = self.seen[sha256] = _Seen()
            if not self.store.has_sample(sha256):
                return False
            seen.stored = True
        if seen.stored:
            self._relabel(name, sha256, seen, claim)
        elif frozen:
            return False
        elif seen.failure is not None:
            self.report(replace(seen.failure, name=name))
        else:
            seen.waiting.append((name, claim))
        return True

    def write(
        self, name: str, sample: PreparedSample, indicators: Sequence[Indicator], claim: _Claim
    ) -> bool:
        """Store the sample (or add its claim when it is stored already); True when its
        features were written by this call."""
        is_new = self.store.add_prepared(sample, claim.label, claim.provenance, indicators)
        status = IngestStatus.INGESTED if is_new else IngestStatus.SKIPPED
        self.report(IngestOutcome(name, status, sample.sha256))
        seen = self.seen.setdefault(sample.sha256, _Seen())
        seen.stored = True
        seen.claims.add(claim)
        waiting, seen.waiting = seen.waiting, []
        for copy_name, copy_claim in waiting:
            self._relabel(copy_name, sample.sha256, seen, copy_claim)
        return is_new

    def fail(self, name: str, sha256: str, error: EarmarkError) -> None:
        """The analysis of ``sha256`` failed: so do the copies waiting for it."""
        failure = _failure(name, error, sha256)
        self.report(failure)
        seen = self.seen.setdefault(sha256, _Seen())
        seen.failure = failure
        waiting, seen.waiting = seen.waiting, []
        for copy_name, _ in waiting:
            self.report(replace(failure, name=copy_name))


def _walk(path: Path) -> Iterator[Path]:
    """Files under a directory, sorted, without following symlinked directories (no loops)."""
    for directory, subdirectories, files in os.walk(path, followlinks=False):
        subdirectories.sort()
        for name in sorted(files):
            yield Path(directory) / name


def _read_member(archive: pyzipper.AESZipFile, info: pyzipper.ZipInfo, limit: int) -> bytes:
    """The member's bytes, trying no password and then the community one; bounded by ``limit``."""
    last_error: RuntimeError | None = None
    for password in (None, COMMUNITY_ARCHIVE_PASSWORD):
        try:
            with archive.open(info, pwd=password) as handle:
                data = cast(bytes, handle.read(limit + 1))
        except RuntimeError as error:  # pyzipper: "password required" / "Bad password"
            last_error = error
            continue
        if len(data) > limit:  # the declared size lied: stop at the limit, never inflate more
            raise FileTooLargeError(f"expands to more than {limit} bytes")
        return data
    raise UnsupportedFormatError(f"encrypted with an unknown password ({last_error})")


def _archive_jobs(path: Path, claim: _Claim, batch: _Batch) -> Iterator[_Job]:
    shown = _printable(str(path))
    try:
        archive = pyzipper.AESZipFile(path)
    except (pyzipper.BadZipFile, OSError, ValueError) as error:
        batch.report(_failure(shown, MalformedFileError(f"not a readable zip archive: {error}")))
        return
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) > MAX_ARCHIVE_MEMBERS:
            too_many = FileTooLargeError(
                f"{len(members)} members; only the first {MAX_ARCHIVE_MEMBERS} are read"
            )
            batch.report(_failure(shown, too_many))
            members = members[:MAX_ARCHIVE_MEMBERS]
        for info in members:
            name = f"{shown}!{_printable(info.filename)}"
            limit = min(batch.limits.max_archive_member_bytes, batch.limits.max_file_bytes)
            try:
                if info.file_size > limit:
                    raise FileTooLargeError(f"declares {info.file_size} bytes, over {limit}")
                data = _read_member(archive, info, limit)
            except InputError as error:
                batch.report(_failure(name, error))
                continue
            except (pyzipper.BadZipFile, zlib.error, EOFError, NotImplementedError) as error:
                batch.report(_failure(name, MalformedFileError(f"damaged member: {error}")))
                continue
            if not data:
                batch.report(_failure(name, EmptyFileError("empty archive member")))
                continue
            sha256 = hashlib.sha256(data).hexdigest()
            if not batch.known(name, sha256, claim):
                yield _Job(name, sha256, data, claim)


def _file_jobs(path: Path, claim: _Claim, batch: _Batch) -> Iterator[_Job]:
    shown = _printable(str(path))
    if path.suffix.lower() == FROZEN_FEATURES_SUFFIX:
        try:
            features = load_frozen_features(path)
        except (FeaturesFileError, InputError) as error:
            batch.report(_failure(shown, error))
            return
        if not batch.known(shown, features.sha256, claim, frozen=True):
            yield _Job(shown, features.sha256, b"", claim, features)
        return
    data: bytes | None = None  # stays None for a zip archive: its members are the samples
    limit = batch.limits.max_file_bytes
    try:
        with path.open("rb") as handle:
            if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
                handle.seek(0)
                data = handle.read(limit + 1)  # bounded even if the file grows meanwhile
                if not data:
                    raise EmptyFileError("empty file")
                if len(data) > limit:
                    raise FileTooLargeError(f"over the limit of {limit} bytes")
    except OSError as error:
        batch.report(_failure(shown, InputError(f"cannot read: {error.strerror}")))
        return
    except InputError as error:
        batch.report(_failure(shown, error))
        return
    if data is None:
        yield from _archive_jobs(path, claim, batch)
        return
    sha256 = hashlib.sha256(data).hexdigest()
    if not batch.known(shown, sha256, claim):
        yield _Job(shown, sha256, data, claim)


def _jobs(groups: Iterable[IngestGroup], recorded_at: datetime, batch: _Batch) -> Iterator[_Job]:
    """Every group's samples in order, read lazily: the pool runs on from one group into the
    next, with no idle tail in between."""
    for group in groups:
        claim = _Claim.of(group.labels, recorded_at)
        for given in group.paths:
            path = Path(given)
            if path.is_dir():
                for file in _walk(path):
                    yield from _file_jobs(file, claim, batch)
            elif path.is_file():
                yield from _file_jobs(path, claim, batch)
            else:
                missing = InputError("no such file or directory")
                batch.report(_failure(_printable(str(path)), missing))


def _finish(job: _Job, result: Analysis, batch: _Batch) -> None:
    if isinstance(result, InputError):
        batch.fail(job.name, job.sha256, result)
        return
    sample, indicators, rows = result
    stored = False
    if sample.sha256 != job.sha256:
        error = InputError(f"analysis reported sha256 {sample.sha256}, the bytes hash otherwise")
        batch.fail(job.name, job.sha256, error)
    else:
        stored = batch.write(job.name, sample, indicators, job.claim)  # features stored now
    spool = batch.spool
    if isinstance(rows, WrittenRows):  # only ever asked for with a RowCache (_rows_to)
        if stored and isinstance(spool, RowCache):
            spool.adopt(sample.sha256, rows)
        else:
            Path(rows.path).unlink(missing_ok=True)
    elif stored and rows is not None and spool is not None:
        spool.add(sample.sha256, rows, sample.features_blob)


def _rows_wanted(batch: _Batch) -> int | None:
    """The ``min_instructions`` to make build rows for, while the batch's spool has room."""
    spool = batch.spool
    return spool.min_instructions if spool is not None and spool.has_room() else None


def _rows_to(batch: _Batch) -> Path | None:
    """Where workers write the build rows themselves: the batch's row cache directory (a
    spool of an in-memory KB takes the rows in this process)."""
    spool = batch.spool
    return spool.directory if isinstance(spool, RowCache) else None


def _warm_before_fork() -> None:
    """Build in this process what every worker would otherwise build on its first sample,
    so the forked workers share it: the public-suffix table of the indicator search, ~20 ms
    of CPU per worker (~0.5 of ~10 CPU s when the PE bench (a) KB took 13 pools of 2 workers),
    and the indicator search's candidate patterns (~25 ms to compile them all, once per process)."""
    host_parts("example.com")
    compile_patterns()


def _run_in_pool(
    jobs: Iterator[_Job], analyzer: Analyzer, codec: FeaturesCodec, workers: int, batch: _Batch
) -> None:
    """Analyse in ``workers`` processes; this process writes (``earmark.ingest_pool``)."""

    def submit(pool: ProcessPoolExecutor, job: _Job) -> Future[Analysis]:
        rows_for = _rows_wanted(batch)
        if job.frozen is None:
            rows_to = _rows_to(batch)
            limits = batch.limits
            return pool.submit(
                analyze_for_store, analyzer, codec, job.data, limits, rows_for, rows_to
            )
        prepared: Future[Analysis] = Future()  # a result already at hand, for its turn
        prepared.set_result(prepare_for_store(job.frozen, codec, rows_for))
        return prepared

    def crashed(job: _Job) -> None:
        crash = MalformedFileError("the analysis process crashed on this file")
        batch.fail(job.name, job.sha256, crash)

    _warm_before_fork()
    run_in_pool(
        jobs,
        submit,
        lambda job, result: _finish(job, result, batch),
        crashed,
        workers=workers,
        queued_per_worker=QUEUED_ANALYSES_PER_WORKER,
        held_per_worker=QUEUED_RESULTS_HELD_PER_WORKER,
    )


def ingest_groups(
    store: Store,
    groups: Sequence[IngestGroup],
    *,
    jobs: int = 1,
    limits: Limits = DEFAULT_LIMITS,
    on_progress: Callable[[IngestOutcome], None] | None = None,
    analyzer: Analyzer = analyze_bytes,
    rows: BuildRows | None = None,
) -> IngestSummary:
    """Ingest several groups of paths, each with its own labels, through one process pool.

    The store ends as after one ``ingest_paths`` call per group, in order: the same samples,
    rows and labels, and the same sample ids (samples are written in input order, whichever
    worker finishes first). A sample met in several groups is analysed once and gets each
    group's label once. A group without labels makes no claim (source "ingest").
    ``jobs`` > 1 analyses in that many processes; 1 analyses in this process. ``on_progress``
    is called in this process after each file. ``analyzer`` must be a module-level function
    (it is sent to worker processes). ``rows`` (``KnowledgeBase.row_spool()``) receives the
    build rows of every sample this call stores, made while its features are at hand, so the
    next ``prepare`` does not decode them again. Raises ``UsageError`` for ``jobs`` < 1 and
    ``StoreError`` when the knowledge base cannot be written; per-file problems are outcomes,
    not exceptions.
    """
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, not {jobs}")
    batch = _Batch(store=store, limits=limits, on_progress=on_progress, spool=rows)
    pending_jobs = _jobs(groups, datetime.now(UTC), batch)
    if jobs == 1:
        for job in pending_jobs:
            rows_for = _rows_wanted(batch)
            if job.frozen is None:
                result = analyze_for_store(analyzer, store.codec, job.data, limits, rows_for)
            else:
                result = prepare_for_store(job.frozen, store.codec, rows_for)
            _finish(job, result, batch)
    else:
        _run_in_pool(pending_jobs, analyzer, store.codec, jobs, batch)
    return IngestSummary(tuple(batch.outcomes))


def ingest_paths(
    store: Store,
    paths: Sequence[str | Path],
    labels: LabelTemplate | None = None,
    *,
    jobs: int = 1,
    limits: Limits = DEFAULT_LIMITS,
    on_progress: Callable[[IngestOutcome], None] | None = None,
    analyzer: Analyzer = analyze_bytes,
) -> IngestSummary:
    """Ingest files, directories (recursively), zip archives and ``.emf`` features files, with
    ``labels`` applied to every sample (``None``: no claim): ``ingest_groups`` with one group."""
    group = IngestGroup(tuple(paths), labels or LabelTemplate())
    return ingest_groups(
        store, [group], jobs=jobs, limits=limits, on_progress=on_progress, analyzer=analyzer
    )
