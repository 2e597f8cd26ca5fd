"""Run MCRIT fully in-process: in-memory storage, no queue server, no process pool.

How it is wired (read from mcrit 1.9's own code, site-packages/mcrit):
- ``McritConfig`` with fresh ``StorageConfig(STORAGE_METHOD="memory")``,
  ``QueueConfig(QUEUE_METHOD="fake")`` and ``MinHashConfig(MINHASH_POOL_INDEXING=False,
  MINHASH_POOL_MATCHING=False)``. Fresh instances matter: McritConfig keeps them as *class*
  attributes, so mutating the defaults would leak into every other MCRIT user in the process.
- A ``Worker`` over ``MemoryStorage`` and a ``LocalQueue``. Indexing is what
  ``Worker._addReport`` does, split so each step can be timed: ``storage.addSmdaReport`` (sample
  and function entries, PicHash and block hashes), then ``worker.updateMinHashesForSample``
  (MinHash signatures and LSH bands).
- A query is what the queued job ``getMatchesForSmdaReport`` runs: ``MatcherQuery(worker)
  .getMatchesForSmdaReport(report)``, called directly so the JSON round-trip of the job queue
  is not timed.

Family ranking ("the way MCRIT's family view does"):
``MatchingResult.getBestSampleMatchesPerFamily`` — for each family, the best single sample's
``matched.percent.frequency_weighted``: the share of the query's matchable bytes matched by
that sample, each function weighted by its best MinHash/PicHash score and divided by
1 + log2(number of families it matched) when it matched 3 or more. Families are ranked by
that percentage; the score we return is that percentage / 100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from bench.common import Stopwatch
from bench.peers import PeerUnavailableError, quiet_peer_output
from bench.peers.smda_peer import SMDA_TIMEOUT_SECONDS, disassemble_with_smda

if TYPE_CHECKING:
    from smda.common.SmdaReport import SmdaReport

INSTALL_HINT = "MCRIT is not installed: pip install -e '.[bench]'"


def _mcrit_modules() -> dict[str, Any]:
    quiet_peer_output()
    try:
        from mcrit.config.McritConfig import McritConfig  # type: ignore[import-untyped]
        from mcrit.config.MinHashConfig import MinHashConfig  # type: ignore[import-untyped]
        from mcrit.config.QueueConfig import QueueConfig  # type: ignore[import-untyped]
        from mcrit.config.ShinglerConfig import ShinglerConfig  # type: ignore[import-untyped]
        from mcrit.config.StorageConfig import StorageConfig  # type: ignore[import-untyped]
        from mcrit.matchers.MatcherQuery import MatcherQuery  # type: ignore[import-untyped]
        from mcrit.minhash.MinHash import MinHash  # type: ignore[import-untyped]
        from mcrit.minhash.MinHasher import MinHasher  # type: ignore[import-untyped]
        from mcrit.queue.LocalQueue import LocalQueue  # type: ignore[import-untyped]
        from mcrit.storage.MatchingResult import MatchingResult  # type: ignore[import-untyped]
        from mcrit.storage.StorageFactory import StorageFactory  # type: ignore[import-untyped]
        from mcrit.Worker import Worker  # type: ignore[import-untyped]
    except ImportError as error:
        raise PeerUnavailableError(INSTALL_HINT) from error
    quiet_peer_output()  # mcrit's import configured logging; lower its loggers again
    return {
        "McritConfig": McritConfig,
        "MinHashConfig": MinHashConfig,
        "QueueConfig": QueueConfig,
        "ShinglerConfig": ShinglerConfig,
        "StorageConfig": StorageConfig,
        "MatcherQuery": MatcherQuery,
        "MinHash": MinHash,
        "MinHasher": MinHasher,
        "LocalQueue": LocalQueue,
        "MatchingResult": MatchingResult,
        "StorageFactory": StorageFactory,
        "Worker": Worker,
    }


def in_process_config() -> Any:
    """An McritConfig that needs no MongoDB and starts no processes (see module docstring)."""
    modules = _mcrit_modules()
    config = modules["McritConfig"]()
    config.STORAGE_CONFIG = modules["StorageConfig"](STORAGE_METHOD="memory")
    config.QUEUE_CONFIG = modules["QueueConfig"](QUEUE_METHOD="fake")
    config.MINHASH_CONFIG = modules["MinHashConfig"](
        MINHASH_POOL_INDEXING=False, MINHASH_POOL_MATCHING=False
    )
    config.SHINGLER_CONFIG = modules["ShinglerConfig"]()
    return config


# --------------------------------------------------------------------------- sample level


@dataclass(frozen=True, slots=True)
class IndexedFile:
    path: Path
    family: str
    status: str  # SMDA status, or "error"
    function_count: int
    minhashed_count: int  # functions large enough for MCRIT to compute a MinHash
    disassembly_seconds: float
    indexing_seconds: float  # storage entries + MinHashes + bands


@dataclass(frozen=True, slots=True)
class FamilyScore:
    family: str
    score: float  # best sample's frequency-weighted matched share of the query, 0..1
    best_sample_sha256: str


@dataclass(frozen=True, slots=True)
class QueryResult:
    path: Path
    status: str
    ranked: tuple[FamilyScore, ...]  # best first
    function_count: int
    disassembly_seconds: float
    matching_seconds: float

    def scores(self) -> dict[str, float]:
        return {entry.family: entry.score for entry in self.ranked}


class McritInProcess:
    """One MCRIT knowledge base held in memory; index labelled files, then query files."""

    def __init__(self, timeout_seconds: int = SMDA_TIMEOUT_SECONDS) -> None:
        self._modules = _mcrit_modules()
        self._config = in_process_config()
        self._storage = self._modules["StorageFactory"].getStorage(self._config)
        self._worker = self._modules["Worker"](
            queue=self._modules["LocalQueue"](), config=self._config, storage=self._storage
        )
        self._timeout_seconds = timeout_seconds
        self.indexed: list[IndexedFile] = []

    @property
    def families(self) -> list[str]:
        return sorted({entry.family for entry in self.indexed if entry.status != "error"})

    def add_file(self, path: Path, family: str, version: str = "") -> IndexedFile:
        """Disassemble ``path`` with SMDA and index it under ``family``."""
        report, disassembly_seconds = disassemble_with_smda(path, self._timeout_seconds)
        if report.status == "error" or not report.xcfg:
            indexed = IndexedFile(path, family, "error", 0, 0, disassembly_seconds, 0.0)
            self.indexed.append(indexed)
            return indexed
        report.family = family
        report.version = version
        report.filename = path.name
        minhasher = self._worker.minhasher
        minhashable = sum(1 for fn in report.getFunctions() if minhasher.isMinHashableFunction(fn))
        with Stopwatch() as watch:
            sample_entry = self._storage.getSampleBySha256(report.sha256)
            if sample_entry is None:
                sample_entry = self._storage.addSmdaReport(report)
                self._worker.updateMinHashesForSample(sample_entry.sample_id)
        indexed = IndexedFile(
            path,
            family,
            str(report.status),
            int(report.num_functions),
            minhashable,
            disassembly_seconds,
            watch.wall,
        )
        self.indexed.append(indexed)
        return indexed

    def query_file(self, path: Path) -> QueryResult:
        """Rank the indexed families for ``path`` (see the module docstring for the aggregation)."""
        report, disassembly_seconds = disassemble_with_smda(path, self._timeout_seconds)
        if report.status == "error" or not report.xcfg:
            return QueryResult(path, "error", (), 0, disassembly_seconds, 0.0)
        with Stopwatch() as watch:
            match_report = self._query_report(report)
            result = self._modules["MatchingResult"].fromDict(match_report)
            best_per_family = result.getBestSampleMatchesPerFamily(unfiltered=True)
        ranked = tuple(
            FamilyScore(
                entry.family, float(entry.matched_percent_frequency_weighted) / 100.0, entry.sha256
            )
            for entry in best_per_family
        )
        return QueryResult(
            path,
            str(report.status),
            ranked,
            int(report.num_functions),
            disassembly_seconds,
            watch.wall,
        )

    def _query_report(self, report: SmdaReport) -> dict[str, Any]:
        matcher = self._modules["MatcherQuery"](self._worker)
        match_report: dict[str, Any] = matcher.getMatchesForSmdaReport(report)
        # MemoryStorage keeps every query sample and its functions forever; drop them so the
        # memory measured for query N does not include queries 1..N-1.
        query_sample_id = match_report["info"]["sample"]["sample_id"]
        for function_id in self._storage._sample_id_to_function_ids.pop(query_sample_id, []):
            self._storage._query_functions.pop(function_id, None)
        self._storage._query_samples.pop(query_sample_id, None)
        return match_report


# --------------------------------------------------------------------------- function level


@dataclass(frozen=True, slots=True)
class FunctionSignatures:
    """MCRIT's MinHash of every function SMDA found in one file."""

    path: Path
    status: str
    signatures: dict[int, bytes]  # function start VA -> MCRIT signature (64 x 8-bit by default)
    too_small: frozenset[int]  # starts SMDA found but MCRIT does not hash (<= 10 instructions)
    disassembly_seconds: float
    hashing_seconds: float
    message: str = ""  # SMDA's last status line (why a file failed or timed out)

    @property
    def function_starts(self) -> frozenset[int]:
        return frozenset(self.signatures) | self.too_small


class McritFunctionHasher:
    """MCRIT's own MinHasher (default shinglers, seed, 64 x 8-bit segmented signature)."""

    def __init__(self, timeout_seconds: int = SMDA_TIMEOUT_SECONDS) -> None:
        self._modules = _mcrit_modules()
        config = in_process_config()
        self._minhash_config = config.MINHASH_CONFIG
        self._minhasher = self._modules["MinHasher"](config.MINHASH_CONFIG, config.SHINGLER_CONFIG)
        self._timeout_seconds = timeout_seconds

    @property
    def signature_bits(self) -> int:
        return int(self._minhash_config.MINHASH_SIGNATURE_BITS)

    def hash_file(self, path: Path) -> FunctionSignatures:
        report, disassembly_seconds = disassemble_with_smda(path, self._timeout_seconds)
        if report.status == "error" or not report.xcfg:
            message = str(report.message or "").strip().splitlines()
            return FunctionSignatures(
                path,
                "error",
                {},
                frozenset(),
                disassembly_seconds,
                0.0,
                message[-1] if message else "",
            )
        signatures: dict[int, bytes] = {}
        too_small: set[int] = set()
        with Stopwatch() as watch:
            for function in report.getFunctions():
                if function.offset is None:
                    continue
                address = int(function.offset)
                if not self._minhasher.isMinHashableFunction(function):
                    too_small.add(address)
                    continue
                minhash = self._minhasher.calculateMinHashFromStorage((address, function))
                signatures[address] = bytes(minhash.getMinHash())
        return FunctionSignatures(
            path,
            str(report.status),
            signatures,
            frozenset(too_small),
            disassembly_seconds,
            watch.wall,
        )

    def score(self, first: bytes, second: bytes) -> float:
        """MCRIT's own pairwise score (MinHash.calculateMinHashScore), scaled to 0..1."""
        minhash_class = self._modules["MinHash"]
        return (
            float(
                minhash_class.calculateMinHashScore(first, second, minhash_bits=self.signature_bits)
            )
            / 100.0
        )

    def signature_matrix(self, signatures: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
        """Stack signatures for vectorised scoring: (matrix, has_signature mask).

        ``score_against`` computes exactly what ``score`` does (share of equal signature
        fields), for a whole pool at once; the function-search benchmark checks the two agree.
        """
        dtype = np.uint8 if self.signature_bits <= 8 else np.uint32
        length = int(self._minhash_config.MINHASH_SIGNATURE_LENGTH)
        matrix = np.zeros((len(signatures), length), dtype=dtype)
        present = np.zeros(len(signatures), dtype=bool)
        for row, signature in enumerate(signatures):
            if signature is not None:
                matrix[row] = np.frombuffer(signature, dtype=dtype)
                present[row] = True
        return matrix, present

    @staticmethod
    def score_against(query: np.ndarray, matrix: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Scores (0..1) of one signature against every row; rows without a signature score 0."""
        scores = (matrix == query).mean(axis=1)
        return np.where(present, scores, 0.0)
