"""The decoding pass of a knowledge-base-wide build (``KnowledgeBase.prepare``) and the
conditions it runs in.

The feature candidate stage and the artefact statistics are built from one pass over every
stored sample, decoded one at a time without its instruction tokens (neither build reads
them; docs/benchmarks.md, "Index build cost").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Final

from earmark.index.artefacts import ArtefactStatsBuilder
from earmark.memory import cyclic_collector_paused, map_large_blocks, return_free_memory
from earmark.model.kb import SampleRecord
from earmark.model.sample import SampleFeatures
from earmark.store import Store

__all__ = ["RETURN_MEMORY_EVERY_FUNCTIONS", "build_pass", "stored_outlines"]

# Decoded functions after which the pass hands freed heap back to the system
# (``malloc_trim``): freed samples leave holes between the growing build arrays that glibc
# keeps. PE bench KB (38.9k functions, ~385 per sample): prepare's peak over the process's RSS
# before it 77-83 MB without, 69-70 MB at every ~1,500 functions (4 samples), 75 MB after
# every sample, whose 101 calls also cost ~0.15 CPU s against ~0.04 s.
RETURN_MEMORY_EVERY_FUNCTIONS: Final = 1_500


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


def stored_outlines(
    store: Store, samples: Mapping[int, SampleRecord], artefacts: ArtefactStatsBuilder
) -> Iterator[tuple[SampleRecord, SampleFeatures]]:
    """Every stored sample in ``correlate.code.stored_samples``' order (by sha256), decoded
    without its instruction tokens and added to ``artefacts`` on the way, so the consumer (the
    feature stage build) and the artefact statistics share one decoding pass."""
    decoded = 0
    for record in sorted(samples.values(), key=lambda record: record.sha256):
        features = store.load_features(record.sha256, instructions=False)
        artefacts.add(record, features)
        decoded += len(features.functions)
        yield record, features
        del features  # not alive while the next sample is decoded
        if decoded >= RETURN_MEMORY_EVERY_FUNCTIONS:
            return_free_memory()
            decoded = 0
    # The consumer finishes its build next (the feature stage's sorts and columns, the peak
    # of ``prepare``): the memo of the artefact pass and the last samples' freed heap are
    # not held through it.
    artefacts.stop_adding()
    return_free_memory()
