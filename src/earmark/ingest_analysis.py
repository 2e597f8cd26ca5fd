"""What an ingest worker computes for one sample, so the process that writes the knowledge
base only writes: the analysis, the rows to insert (``store.rows.prepare_sample``), the
indicators in the sample's strings and, for the next index build, the sample's build rows
(``kb_rows``).

Kept apart from ``earmark.ingest``, which reads the inputs, schedules them
(``earmark.ingest_pool``) and writes the results: what runs here runs in another process,
needs no store and returns plain values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from earmark.config import Limits
from earmark.errors import InputError
from earmark.intel import indicators_from_strings
from earmark.kb_rows import SampleRows, WrittenRows, origin_of, sample_rows, write_rows_file
from earmark.memory import cyclic_collector_paused
from earmark.model.intel import Indicator
from earmark.model.sample import SampleFeatures
from earmark.store.base import FeaturesCodec
from earmark.store.rows import PreparedSample, prepare_sample

__all__ = ["Analysis", "Analyzer", "Prepared", "analyze_for_store", "prepare_for_store"]

Analyzer: TypeAlias = Callable[[bytes, Limits], SampleFeatures]
# The rows to insert, the indicators, and the build rows (as they are, written to a file, or
# not asked for).
Prepared: TypeAlias = tuple[PreparedSample, list[Indicator], SampleRows | WrittenRows | None]
Analysis: TypeAlias = Prepared | InputError  # a typed input error comes back as a value


def prepare_for_store(
    features: SampleFeatures,
    codec: FeaturesCodec,
    rows_for: int | None = None,
    rows_to: Path | None = None,
) -> Prepared:
    """The rows to insert, the indicators in the sample's strings, and with ``rows_for``
    (a ``min_instructions``) the sample's build rows (``kb_rows.BuildRows``): with
    ``rows_to`` (a ``RowCache``'s directory) written there under a temporary name
    (``kb_rows.write_rows_file``) for the writing process to adopt, else as they are."""
    sample = prepare_sample(features, codec.to_bytes(features))
    rows: SampleRows | WrittenRows | None = None
    if rows_for is not None:
        rows = sample_rows(features, rows_for)
        if rows_to is not None:
            rows = write_rows_file(rows_to, rows, origin_of(sample.features_blob), rows_for)
    return sample, indicators_from_strings(features.strings), rows


def analyze_for_store(
    analyzer: Analyzer,
    codec: FeaturesCodec,
    data: bytes,
    limits: Limits,
    rows_for: int | None = None,
    rows_to: Path | None = None,
) -> Analysis:
    """Runs in a worker: analysis, then everything the writing parent would otherwise compute
    (frozen bytes, rows, indicators); only the rows travel back, not the features (the
    parent's unpickling and row building measured more than its inserts), and with
    ``rows_to`` not even the build rows, only the name of the file they were written to
    (``prepare_for_store``). Typed input errors come back as values, bugs propagate.

    The cyclic collector is paused throughout, and the features are dropped before it runs
    again: they (~10 tuples and strings per function) hold no cycles and die with this call,
    but every collection after the recovery's own pause walked them again, the first one as
    soon as the pause ended (~0.7 of ~7.5 CPU s of a worker on the PE bench (a) KB,
    docs/benchmarks.md "Ingest worker CPU (2)")."""
    with cyclic_collector_paused():
        try:
            features = analyzer(data, limits)
        except InputError as error:
            return error
        prepared = prepare_for_store(features, codec, rows_for, rows_to)
        del features  # freed here, by reference counting, not walked when the pause ends
    return prepared
