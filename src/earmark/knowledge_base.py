"""The knowledge base a query runs against: an open store plus everything built from it
(the function index, the feature candidate stage, the artefact statistics), built by
``prepare`` at ingest and cached beside a SQLite file, so no query pays a build.

Caches beside ``<db>`` (a SQLite file; in-memory and server databases build in memory, once per
process): ``<db>.index/`` (function index), ``<db>.features/`` (feature candidate stage),
``<db>.artefacts/`` (artefact statistics), each keyed by the store's revision, and
``<db>.rows/`` (each sample's build rows, ``earmark.kb_rows.RowCache``; a server database's
under ``$EARMARK_CACHE_DIR/rows/``, see ``row_cache_path``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.process import BaseProcess
from pathlib import Path

from earmark.correlate.artefacts import artefact_stats_for
from earmark.correlate.code import MAX_FEATURE_STAGE_SAMPLES, build_feature_candidates
from earmark.errors import UsageError
from earmark.index import MIN_INSTRUCTIONS, FunctionIndex, IndexCacheError, saved_index_revision
from earmark.index.artefact_cache import load_artefact_stats, save_artefact_stats
from earmark.index.artefacts import ArtefactStats, ArtefactStatsBuilder
from earmark.index.feature_cache import load_feature_candidates, save_feature_candidates
from earmark.index.feature_candidates import FeatureCandidateIndex
from earmark.intel.warninglists import cache_dir, default_warninglist_tables
from earmark.kb_build import build_pass, stored_rows
from earmark.kb_rows import BuildRows, RowCache, RowSpool
from earmark.memory import return_free_memory
from earmark.model.kb import SampleRecord
from earmark.store import Store, open_store, resolve_database_url

__all__ = ["KnowledgeBase", "index_cache_path", "open_knowledge_base", "row_cache_path"]


@dataclass
class KnowledgeBase:
    """An open store plus its function index, built or loaded on first use."""

    store: Store
    index_path: Path | None  # None: keep the index in memory only
    # The row cache's directory (``row_cache_path``); None: beside ``index_path`` if there is
    # one, else no cache (a spool per ingest).
    rows_path: Path | None = None
    _index: FunctionIndex | None = None
    _revision: int | None = None  # the store revision ``_samples`` and the caches are of
    _samples: dict[int, SampleRecord] = field(default_factory=dict)
    # The second candidate stage of the store revision: built by ``prepare`` (at ingest) and
    # mapped from ``<db>.features``, or built once per process for a KB without a cache path;
    # building it decodes every stored sample, so no query may pay it.
    _feature_candidates: tuple[int, FeatureCandidateIndex | None] | None = None
    _artefacts: ArtefactStats | None = None  # artefact pillar statistics, cached as <db>.artefacts
    # Build rows of samples ingested through ``row_spool``: beside a SQLite KB its row cache.
    _spool: BuildRows | None = None

    def artefact_stats(self) -> ArtefactStats:
        index = self.index()
        if self._artefacts is None or self._artefacts.revision != index.revision:
            # Neither at hand (a server KB's query process): both from one pass, as prepare.
            self._build_stage_and_artefacts(index.revision, index.min_instructions, jobs=1)
        if self._artefacts is None or self._artefacts.revision != index.revision:
            self._artefacts = None  # a stale revision's: not kept alive during the build
            cache = self._artefact_cache_path()
            self._artefacts = artefact_stats_for(self.store, self._samples, index.revision, cache)
        return self._artefacts

    def index(self) -> FunctionIndex:
        revision = self.store.revision()
        if self._index is not None and self._index.revision == revision:
            return self._index
        self._start_revision(revision)
        index: FunctionIndex | None = None
        if self.index_path is not None:
            try:
                index = FunctionIndex.load(self.index_path, revision)
            except IndexCacheError:
                index = None  # damaged cache: rebuilt below, never trusted
        if index is None or index.rarity is None:
            index = FunctionIndex.build(self.store.load_function_table(), revision, self._samples)
            if self.index_path is not None:
                index.save(self.index_path)
        self._index = index
        return index

    def _start_revision(self, revision: int) -> None:
        """Forget what was built for another revision and read this one's samples (and,
        beside a SQLite file, check the caches are this KB's: ``_claim_caches``)."""
        if self._revision == revision:
            return
        # Nothing of a stale revision (index, stage, statistics) is held while the new index
        # is loaded or built (PE bench: (c)'s build after (a)'s queries, peak 259 -> 226 MB).
        self._index = None
        self._feature_candidates = None
        self._artefacts = None
        return_free_memory()
        self._samples = dict(self.store.sample_labels())
        if self.index_path is not None:
            self._claim_caches(revision)
        self._revision = revision

    def _claim_caches(self, revision: int) -> None:
        """Drop the caches beside the SQLite file when another KB built them.

        They are keyed by the store revision, and a KB deleted and created again at the same
        path counts its revisions from the start again: at an equal revision it would be served
        the old KB's index, stage and statistics. ``<db>.owner`` names the samples (ids,
        sha256s, labels) they were built for at that revision. When it names other samples,
        or is missing (caches from before it), the three caches are deleted before anything
        reads them, and it is rewritten. The row cache checks each file against the stored
        bytes instead (``kb_rows.RowCache``)."""
        assert self.index_path is not None
        owner = self._cache_path(".owner")
        expected = {"revision": revision, "samples": _samples_digest(self._samples)}
        try:
            recorded = json.loads(owner.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = None
        if recorded == expected:
            return
        stale = (self.index_path, self._cache_path(".features"), self._cache_path(".artefacts"))
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink(missing_ok=True)
        try:
            temporary = owner.with_name(owner.name + ".tmp")
            temporary.write_text(json.dumps(expected), encoding="utf-8")
            os.replace(temporary, owner)
        except OSError:
            pass  # unwritable: the caches are rebuilt (and dropped) each time, never trusted

    def row_spool(self) -> BuildRows:
        """Where ``ingest_groups(..., rows=...)`` leaves the build rows of the samples it
        stores: the KB's row cache (``row_cache_path``), which every later build reads and
        adds the rows of the samples it decodes to; for an in-memory KB a spool for the next
        ``prepare`` of this object (emptied by it)."""
        if self._spool is None:
            path = self._row_cache_path()
            limit = MAX_FEATURE_STAGE_SAMPLES
            self._spool = (
                RowSpool(MIN_INSTRUCTIONS, max_samples=limit)
                if path is None
                else RowCache(path, MIN_INSTRUCTIONS, max_samples=limit)
            )
        return self._spool

    def samples(self) -> dict[int, SampleRecord]:
        self.index()
        return self._samples

    def prepare(self, jobs: int = 1) -> None:
        """Build (and cache beside a SQLite KB) every index a query reads: the function index,
        the feature candidate stage, the artefact statistics, and the per-installation
        warninglist table. ``earmark ingest`` calls it after writing, so the first query after
        an ingest does not pay the build (seconds: it decodes every stored sample's features,
        once for the feature stage and the artefact statistics together). ``jobs`` > 1
        decodes the samples in that many processes and, beside a SQLite file, builds the
        function index in another process meanwhile (``_index_aside``); the same result."""
        if jobs < 1:
            raise UsageError(f"jobs must be at least 1, not {jobs}")
        try:
            with build_pass():
                revision = self.store.revision()
                self._start_revision(revision)
                aside = self._index_aside(revision, jobs)
                # The stage takes the index's minimum size: the default of a build (aside),
                # else the loaded or built index's own.
                least = MIN_INSTRUCTIONS if aside is not None else self.index().min_instructions
                try:
                    self._build_stage_and_artefacts(revision, least, jobs)
                finally:
                    if aside is not None:
                        aside.join()
                self.index()  # the one saved aside, else built here
                self.feature_candidates()
                self.artefact_stats()
        finally:
            if isinstance(self._spool, RowSpool):
                self._spool.clear()
        # Compiled once per installation (seconds), mapped by every later process.
        default_warninglist_tables()

    def _index_aside(self, revision: int, jobs: int) -> BaseProcess | None:
        """A process building and saving the function index of ``revision`` beside the SQLite
        file while this one builds the stage and statistics, or None (one job, no cache path,
        no ``fork``, or the index at hand or saved already).

        The two builds share nothing but the store, and the index build alone is ~0.15 of
        ~0.5 s of ``prepare`` on the PE bench (a) KB; in a thread it gained nothing (both
        hold the interpreter lock most of the time), in a forked process ``prepare`` took
        0.36-0.39 s against 0.49-0.55 s (docs/benchmarks.md, "The function index built
        aside"). The process reads through its own connection (SQLite's WAL lets it read
        beside this one) and saves only what it read at ``revision``; when it fails or
        skips, ``index`` builds here as before."""
        if (
            jobs < 2
            or self.index_path is None
            or (self._index is not None and self._index.revision == revision)
            or saved_index_revision(self.index_path) == revision
            or not self.store.url.startswith("sqlite")
            or "fork" not in multiprocessing.get_all_start_methods()
        ):
            return None
        # Forked, not spawned: a spawned process would import earmark again (~0.6 s), and
        # ``_samples`` is inherited rather than pickled.
        context = multiprocessing.get_context("fork")
        process = context.Process(
            target=_index_process,
            args=(self.store.url, self.index_path, revision, self._samples),
            name="earmark-index-build",
            daemon=True,
        )
        process.start()
        return process

    def _build_stage_and_artefacts(self, revision: int, min_instructions: int, jobs: int) -> None:
        """When neither the feature stage nor the artefact statistics of this revision are
        at hand, both are built from one decoding pass over the stored samples (PE bench KB:
        prepare 9.1 -> 5.6 CPU s against decoding every sample once per build;
        docs/benchmarks.md, "Query latency and memory")."""
        if (
            len(self._samples) > MAX_FEATURE_STAGE_SAMPLES
            or (self._feature_candidates is not None and self._feature_candidates[0] == revision)
            or (self._artefacts is not None and self._artefacts.revision == revision)
        ):
            return
        cached = self._cached_feature_candidates(revision, min_instructions)
        if cached is not None:
            self._feature_candidates = (revision, cached)
            return
        # A stale revision's stage (mapped pages a query touched count as resident) and
        # statistics are dropped before the build, not held alongside the new ones.
        self._feature_candidates = None
        self._artefacts = None
        cache = self._artefact_cache_path()
        if cache is not None:
            try:
                self._artefacts = load_artefact_stats(cache, revision)
                return
            except IndexCacheError:
                pass  # missing, stale or damaged: built below, never trusted
        artefacts = ArtefactStatsBuilder()
        at_hand = self._spool if self._row_cache_path() is None else self.row_spool()
        rows = stored_rows(self.store, self._samples, min_instructions, artefacts, jobs, at_hand)
        kept = self._build_and_keep_feature_candidates(  # the pass feeds the artefacts too
            lambda: build_feature_candidates(self.store, self._samples, min_instructions, rows),
            revision,
            min_instructions,
        )
        self._feature_candidates = (revision, kept)
        stats = artefacts.finish(revision)
        if cache is not None:
            save_artefact_stats(stats, cache)
        self._artefacts = stats

    def feature_candidates(self) -> FeatureCandidateIndex | None:
        """The optimisation-robust candidate stage (None past its sample limit)."""
        index = self.index()
        if self._feature_candidates is None or self._feature_candidates[0] != index.revision:
            # See artefact_stats.
            self._build_stage_and_artefacts(index.revision, index.min_instructions, jobs=1)
        if self._feature_candidates is None or self._feature_candidates[0] != index.revision:
            self._feature_candidates = None  # a stale revision's: not kept during the build
            built = self._cached_feature_candidates(index.revision, index.min_instructions)
            if built is None:
                build = partial(build_feature_candidates, self.store, self._samples)
                built = self._build_and_keep_feature_candidates(
                    lambda: build(index.min_instructions), index.revision, index.min_instructions
                )
            self._feature_candidates = (index.revision, built)
        return self._feature_candidates[1]

    def _build_and_keep_feature_candidates(
        self,
        build: Callable[[], FeatureCandidateIndex | None],
        revision: int,
        min_instructions: int,
    ) -> FeatureCandidateIndex | None:
        """A stage built, saved beside a SQLite KB and then served from the mapped files (pages
        shared with the page cache). The built arrays are freed before the saved ones are mapped
        and checked, never in memory together (PE bench KB: a 10 MB higher peak when they were)."""
        built, cache = build(), self._feature_cache_path()
        if built is None or cache is None:
            return built
        if not save_feature_candidates(built, cache, revision, min_instructions):
            return built
        del built  # the only reference
        return_free_memory()
        mapped = self._cached_feature_candidates(revision, min_instructions)
        if mapped is None:  # just written, yet unreadable: built again, kept in memory
            return build_feature_candidates(self.store, self._samples, min_instructions)
        # The load checks read whole columns (~12 MB of pages on the PE bench KB); a query
        # faults in only what it reads.
        mapped.release_pages()
        return mapped

    def _cache_path(self, suffix: str) -> Path:
        """``<db><suffix>`` beside ``<db>.index`` (each cache in its own directory: saving the
        function index replaces ``<db>.index`` wholesale)."""
        assert self.index_path is not None
        return self.index_path.with_name(self.index_path.name.removesuffix(".index") + suffix)

    def _artefact_cache_path(self) -> Path | None:
        return None if self.index_path is None else self._cache_path(".artefacts")

    def _row_cache_path(self) -> Path | None:
        """``rows_path``, or ``<db>.rows`` beside ``<db>.index`` (``kb_rows.RowCache``)."""
        if self.rows_path is not None or self.index_path is None:
            return self.rows_path
        return self._cache_path(".rows")

    def _feature_cache_path(self) -> Path | None:
        return None if self.index_path is None else self._cache_path(".features")

    def _cached_feature_candidates(
        self, revision: int, min_instructions: int
    ) -> FeatureCandidateIndex | None:
        cache = self._feature_cache_path()
        if cache is None or len(self._samples) > MAX_FEATURE_STAGE_SAMPLES:
            return None
        try:
            return load_feature_candidates(cache, revision, min_instructions)
        except IndexCacheError:
            return None  # damaged cache: rebuilt by the caller, never trusted


def _save_function_index(
    database: str, path: Path, revision: int, samples: Mapping[int, SampleRecord]
) -> bool:
    """The function index of ``revision`` built from the store at ``database`` and saved at
    ``path`` (atomically, ``FunctionIndex.save``); False, nothing saved, when the store moved
    past ``revision`` before its function table was read whole."""
    with open_store(database) as store:
        if store.revision() != revision:
            return False
        table = store.load_function_table()
        if store.revision() != revision:
            return False  # written meanwhile: the table may hold functions of a later revision
        FunctionIndex.build(table, revision, samples).save(path)
        return True


def _index_process(
    database: str, path: Path, revision: int, samples: Mapping[int, SampleRecord]
) -> None:
    """``KnowledgeBase._index_aside``'s process: ``_save_function_index``, ending with exit
    status 1 on any error, silently: the parent then builds the index itself and meets the
    same error there, where it is reported."""
    try:
        _save_function_index(database, path, revision, samples)
    except BaseException:
        os._exit(1)


def index_cache_path(database: str | None) -> Path | None:
    """``<db file>.index`` for a SQLite file, None for memory or server databases."""
    url = resolve_database_url(database)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    db_path = Path(url.database)
    return db_path.with_name(db_path.name + ".index")


def _samples_digest(samples: Mapping[int, SampleRecord]) -> str:
    """What a KB's caches were built from besides its revision: each sample's id, sha256 and
    the labels rarity reads (~1 ms per 1,000 samples)."""
    digest = hashlib.sha256()
    for sample_id in sorted(samples):
        record = samples[sample_id]
        digest.update(
            f"{sample_id}\t{record.sha256}\t{record.goodware}\t{record.claims}\n".encode()
        )
    return digest.hexdigest()


def row_cache_path(database: str | None) -> Path | None:
    """The row cache's directory: ``<db file>.rows`` for a SQLite file; for a server database,
    one directory per database URL (password left out) in the per-installation cache
    (``$EARMARK_CACHE_DIR/rows/``), since the server has no folder of ours beside it; None in
    memory. A cache file is used only for the stored bytes it was made from, so a server
    database dropped and created again under the same URL is safe (``kb_rows.RowCache``)."""
    url = resolve_database_url(database)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return None
        db_path = Path(url.database)
        return db_path.with_name(db_path.name + ".rows")
    name = hashlib.sha256(url.render_as_string(hide_password=True).encode()).hexdigest()[:32]
    return cache_dir() / "rows" / name


@contextmanager
def open_knowledge_base(database: str | None = None) -> Iterator[KnowledgeBase]:
    """The store at ``database`` (path, URL, None for $EARMARK_DB/./earmark.db) and its index."""
    with open_store(database) as store:
        yield KnowledgeBase(store, index_cache_path(database), rows_path=row_cache_path(database))
