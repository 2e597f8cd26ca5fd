"""The ``Store`` protocol: what the rest of earmark may ask of the knowledge base.

Callers (ingest, index, correlate) see only this protocol; the SQL behind it lives in
``earmark.store.sql``. A second implementation (an in-memory one for tests, or a sharded one) only
has to satisfy this protocol and pass ``tests/test_store.py``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self

import numpy as np
import numpy.typing as npt

from earmark.model.intel import ActorProfile, Indicator, IntelRelation, IntelReport
from earmark.model.kb import FunctionTable, Provenance, SampleLabel, SampleRecord
from earmark.model.sample import SampleFeatures
from earmark.store.rows import PreparedSample


class FeaturesCodec(Protocol):
    """Turns frozen features into bytes and back (``earmark.freeze`` is the real one).

    Injected rather than imported so the store depends on ``earmark.model`` only.
    """

    def to_bytes(self, features: SampleFeatures) -> bytes: ...

    def from_bytes(self, data: bytes, *, instructions: bool = True) -> SampleFeatures:
        """``instructions=False``: every function's ``normalized`` left empty (cheaper)."""
        ...


@dataclass(frozen=True, slots=True)
class StoreStats:
    samples: int
    functions: int
    labels: int
    goodware_samples: int  # samples with at least one goodware label
    labelled_samples: int  # samples with at least one label of any kind
    actors: int  # distinct actor names over all labels
    families: int  # distinct family names over all labels
    schema_version: int
    revision: int


@dataclass(frozen=True, slots=True)
class IntelWriteSummary:
    """What one ``add_intel`` call changed. Re-importing the same file gives all zeros except
    ``reports_unchanged`` (and ``actors_unchanged``)."""

    reports_added: int
    reports_updated: int  # same report_id, different content: its rows were replaced
    reports_unchanged: int
    indicators_added: int  # indicator rows written for added or updated reports
    relations_added: int
    relations_skipped: int  # relations citing a report that is neither given nor stored
    actors_added: int
    actors_updated: int
    actors_unchanged: int


@dataclass(frozen=True, slots=True)
class IntelStats:
    reports: int
    indicators: int  # indicator rows over all reports
    distinct_values: int
    actor_profiles: int
    aliases: int
    relations: int
    sample_indicators: int  # indicator rows found in stored samples
    samples_with_indicators: int
    revision: int


@dataclass(frozen=True, slots=True)
class SampleIndicators:
    """The indicators found in one stored sample, with the sample's labels (its claims)."""

    sha256: str
    first_seen: datetime  # when the sample row was stored (UTC)
    labels: tuple[SampleLabel, ...]
    indicators: tuple[Indicator, ...]  # with their file offsets


class Store(Protocol):
    """The knowledge base. Samples are identified by sha256; every write is one transaction."""

    @property
    def codec(self) -> FeaturesCodec:
        """How this store freezes features; ingest workers use it to encode in parallel."""
        ...

    @property
    def url(self) -> str:
        """The database's SQLAlchemy URL, any password hidden (enough to reopen a SQLite
        file from another process: ``KnowledgeBase.prepare``'s function index build)."""
        ...

    def add_sample(
        self,
        features: SampleFeatures,
        label: SampleLabel | None,
        provenance: Provenance | None = None,
        frozen: bytes | None = None,
        indicators: Sequence[Indicator] = (),
    ) -> bool:
        """Store a sample, its functions, its frozen features, the indicators found in its
        strings and its label in one transaction.

        Returns True when the sample is new. A sample already present is not written again:
        only ``label`` is added (and only if an identical claim is not already recorded).
        ``provenance`` describes the sample row itself; by default the label's, else "unknown".
        ``frozen`` is ``codec.to_bytes(features)`` when the caller already has it (encoding is
        most of the cost of a write, so ingest workers do it in parallel).
        """
        ...

    def add_prepared(
        self,
        sample: PreparedSample,
        label: SampleLabel | None,
        provenance: Provenance | None = None,
        indicators: Sequence[Indicator] = (),
    ) -> bool:
        """``add_sample`` for rows already computed by ``earmark.store.rows.prepare_sample``
        (ingest workers prepare them in parallel; the writer only inserts)."""
        ...

    def add_label(self, sha256: str, label: SampleLabel) -> bool:
        """Record one more claim about a stored sample; False when the same claim exists.

        Raises ``StoreError`` when the sample is not stored.
        """
        ...

    def has_sample(self, sha256: str) -> bool: ...

    def get_sample(self, sha256: str) -> SampleRecord | None: ...

    def list_samples(self) -> list[SampleRecord]:
        """Every sample with its labels, ordered by sample id (insertion order)."""
        ...

    def sample_labels(self) -> Mapping[int, SampleRecord]:
        """Every sample keyed by ``sample_id``, the key used in ``FunctionTable.sample_id``."""
        ...

    def load_features(self, sha256: str, *, instructions: bool = True) -> SampleFeatures:
        """The stored frozen features; raises ``StoreError`` when the sample is not stored.
        ``instructions=False`` leaves every function's ``normalized`` empty, for KB-wide
        builds that never read the instruction tokens (half the cost of decoding)."""
        ...

    def load_features_blob(self, sha256: str) -> bytes:
        """The stored frozen features as ``codec`` wrote them, undecoded (a KB-wide build
        decodes them in other processes); raises ``StoreError`` when the sample is not
        stored."""
        ...

    def load_function_table(self) -> FunctionTable:
        """All stored functions as parallel numpy arrays, ordered by function id."""
        ...

    def load_function_ids(
        self,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
        """``load_function_table``'s function_id, sample_id and address columns alone (what
        maps a sample's function to its id), without reading the MinHash rows."""
        ...

    def stats(self) -> StoreStats: ...

    # -- threat intelligence -----------------------------------------------------------

    def add_intel(
        self,
        reports: Sequence[IntelReport],
        actors: Sequence[ActorProfile] = (),
        relations: Sequence[IntelRelation] = (),
        imported_at: datetime | None = None,
    ) -> IntelWriteSummary:
        """Store imported intel in one transaction; idempotent by ``report_id``.

        A known report with the same content is left alone; with different content its names,
        indicators and relations are replaced. Actor profiles are keyed by (name, source).
        """
        ...

    def load_intel_reports(self, report_ids: Collection[str] | None = None) -> list[IntelReport]:
        """Stored reports (all, or those with the given ids), ordered by first import."""
        ...

    def load_actor_profiles(self) -> list[ActorProfile]: ...

    def load_intel_relations(self, names: Collection[str] | None = None) -> list[IntelRelation]:
        """Relations (all, or those whose source or target name is one of ``names``)."""
        ...

    def find_actor_names(self, alias: str) -> list[str]:
        """Profile names that have ``alias`` (case-insensitive) as their name or an alias."""
        ...

    def load_sample_indicators(self, sha256: str | None = None) -> list[SampleIndicators]:
        """Samples that carry indicators (all, or one), with their labels."""
        ...

    def intel_stats(self) -> IntelStats: ...

    def intel_revision(self) -> int:
        """A counter that goes up with every committed intel change (cache key for the
        infrastructure index, together with ``revision`` for sample indicators)."""
        ...

    def revision(self) -> int:
        """A counter that goes up with every committed sample or label change."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None: ...
