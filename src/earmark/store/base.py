"""The ``Store`` protocol: what the rest of earmark may ask of the knowledge base.

Callers (ingest, index, correlate) see only this protocol; the SQL behind it lives in
``earmark.store.sql``. A second implementation (an in-memory one for tests, or a sharded one) only
has to satisfy this protocol and pass ``tests/test_store.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from earmark.model.kb import FunctionTable, Provenance, SampleLabel, SampleRecord
from earmark.model.sample import SampleFeatures


class FeaturesCodec(Protocol):
    """Turns frozen features into bytes and back (``earmark.freeze`` is the real one).

    Injected rather than imported so the store depends on ``earmark.model`` only.
    """

    def to_bytes(self, features: SampleFeatures) -> bytes: ...

    def from_bytes(self, data: bytes) -> SampleFeatures: ...


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


class Store(Protocol):
    """The knowledge base. Samples are identified by sha256; every write is one transaction."""

    @property
    def codec(self) -> FeaturesCodec:
        """How this store freezes features; ingest workers use it to encode in parallel."""
        ...

    def add_sample(
        self,
        features: SampleFeatures,
        label: SampleLabel | None,
        provenance: Provenance | None = None,
        frozen: bytes | None = None,
    ) -> bool:
        """Store a sample, its functions, its frozen features and its label in one transaction.

        Returns True when the sample is new. A sample already present is not written again:
        only ``label`` is added (and only if an identical claim is not already recorded).
        ``provenance`` describes the sample row itself; by default the label's, else "unknown".
        ``frozen`` is ``codec.to_bytes(features)`` when the caller already has it (encoding is
        most of the cost of a write, so ingest workers do it in parallel).
        """
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

    def load_features(self, sha256: str) -> SampleFeatures:
        """The stored frozen features; raises ``StoreError`` when the sample is not stored."""
        ...

    def load_function_table(self) -> FunctionTable:
        """All stored functions as parallel numpy arrays, ordered by function id."""
        ...

    def stats(self) -> StoreStats: ...

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
