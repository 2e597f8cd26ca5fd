"""The artefact statistics builder counts what the former per-key dicts counted: owners per
key, goodware samples per key, the listed (owner, sample) pairs and rare strings per sample."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.index import artefacts
from earmark.index.artefacts import (
    MAX_LISTED_OWNERS,
    MAX_LISTED_SAMPLES,
    RARE_ARTEFACT_WEIGHT,
    ArtefactStatsBuilder,
    SampleArtefact,
)
from earmark.index.rarity import rarity_weight
from earmark.model.kb import Provenance, SampleLabel, SampleRecord

_PROVENANCE = Provenance("test", datetime(2026, 1, 1, tzinfo=UTC))

# A sample: its label (actor index, family index, goodware) and its artefact keys (unique),
# each a string or not. Keys span the whole uint64 range; few owners, so that some keys pass
# MAX_LISTED_OWNERS, and many samples of one owner pass MAX_LISTED_SAMPLES.
_KEYS = st.sampled_from([0, 1, 7, 2**32, 2**63 - 1, 2**63, 2**64 - 1, *range(100, 112)])
_SAMPLE = st.tuples(
    st.one_of(st.none(), st.integers(0, 11)),
    st.one_of(st.none(), st.integers(0, 3)),
    st.booleans(),
    st.lists(st.tuples(_KEYS, st.booleans()), unique_by=lambda item: item[0], max_size=12),
)


def _record(sample_id: int, actor: int | None, family: int | None, goodware: bool) -> SampleRecord:
    label = SampleLabel(
        actor=None if actor is None else f"actor {actor}",
        family=None if family is None else f"family {family}",
        goodware=goodware,
        provenance=_PROVENANCE,
    )
    return SampleRecord(sample_id, f"{sample_id:064x}", "pe", "x86-64", 1, 0, (label,))


def _reference(samples: list[tuple[SampleRecord, list[tuple[int, bool]]]]) -> dict[str, Any]:
    """The counting as the per-key dicts did it."""
    owners_of: dict[int, dict[int, list[int]]] = {}
    goodware_of: dict[int, int] = {}
    strings_of: dict[int, list[int]] = {}
    owner_codes: dict[str, int] = {}
    for record, items in samples:
        strings_of[record.sample_id] = [key for key, is_string in items if is_string]
        if record.goodware:
            for key, _ in items:
                goodware_of[key] = goodware_of.get(key, 0) + 1
        else:
            codes = [owner_codes.setdefault(o, len(owner_codes)) for o in record.owner_keys]
            for key, _ in items:
                listed = owners_of.setdefault(key, {})
                for code in codes:
                    listed.setdefault(code, []).append(record.sample_id)
    keys = sorted(set(owners_of) | set(goodware_of))
    owner_count = np.array([len(owners_of.get(k, ())) for k in keys], dtype=np.uint32)
    goodware_count = np.array([goodware_of.get(k, 0) for k in keys], dtype=np.uint32)
    listed_owner: list[int] = []
    listed_sample: list[int] = []
    offsets = [0]
    for key in keys:
        listed = owners_of.get(key, {})
        if len(listed) <= MAX_LISTED_OWNERS:
            pairs = sorted((code, sample) for code, ids in listed.items() for sample in ids)
            for code, sample in pairs[:MAX_LISTED_SAMPLES]:
                listed_owner.append(code)
                listed_sample.append(sample)
        offsets.append(len(listed_owner))
    weight = rarity_weight(owner_count, goodware_count, len(owner_codes))
    rare = {k for k, w in zip(keys, weight.tolist(), strict=True) if w >= RARE_ARTEFACT_WEIGHT}
    return {
        "keys": keys,
        "owner_count": owner_count.tolist(),
        "goodware_count": goodware_count.tolist(),
        "listed_offsets": offsets,
        "listed_owner": listed_owner,
        "listed_sample": listed_sample,
        "sample_ids": sorted(strings_of),
        "rare_strings": [sum(k in rare for k in strings_of[s]) for s in sorted(strings_of)],
    }


@settings(max_examples=120, deadline=None)
@given(st.lists(_SAMPLE, max_size=90))
def test_builder_counts_as_the_per_key_dicts_did(samples: list[Any]) -> None:
    records = [
        (_record(1000 - position, actor, family, goodware), items)
        for position, (actor, family, goodware, items) in enumerate(samples)
    ]
    builder = ArtefactStatsBuilder()
    with pytest.MonkeyPatch.context() as patch:
        # Artefacts given directly: the features object is the sample's item list.
        patch.setattr(
            artefacts,
            "sample_artefacts",
            lambda items, memo: tuple(
                SampleArtefact("string" if is_string else "export", "v", key)
                for key, is_string in items
            ),
        )
        patch.setattr(artefacts, "imported_libraries", lambda items: {})
        for record, items in records:
            builder.add(record, items)  # type: ignore[arg-type]
    stats = builder.finish(revision=3)
    expected = _reference(records)
    for name, value in expected.items():
        assert getattr(stats, name).tolist() == value, name
    assert stats.keys.dtype == np.uint64 and stats.listed_owner.dtype == np.int32
    assert stats.owner_count.dtype == np.uint32 and stats.listed_offsets.dtype == np.int64
