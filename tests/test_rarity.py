"""Rarity: counts of families/actors/goodware per near-identical cluster, and the weight order."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from earmark.index import FunctionIndex, rarity_weight
from earmark.index.rarity import cluster_near_identical, connected_components
from earmark.model.kb import Provenance, SampleLabel, SampleRecord
from test_index import make_table, minhash_of, queries_for, random_minhash

_PROVENANCE = Provenance(source="test", recorded_at=datetime(2025, 1, 1, tzinfo=UTC))


def record(
    sample_id: int, family: str | None = None, actor: str | None = None, goodware: bool = False
) -> SampleRecord:
    return SampleRecord(
        sample_id=sample_id,
        sha256=f"{sample_id:064x}",
        format="pe",
        arch="x86_64",
        size=1000,
        function_count=3,
        labels=(
            SampleLabel(actor=actor, family=family, goodware=goodware, provenance=_PROVENANCE),
        ),
    )


class KnowledgeBase:
    """Samples 0-4: five families of five actors; 5: goodware; 6-7: two families of one actor."""

    def __init__(self) -> None:
        rng = np.random.default_rng(20)
        self.samples = {
            0: record(0, "contopee", "Lazarus Group"),
            1: record(1, "plugx", "APT10"),
            2: record(2, "shadowpad", "APT41"),
            3: record(3, "emotet", "TA542"),
            4: record(4, "trickbot", "Wizard Spider"),
            5: record(5, goodware=True),
            6: record(6, "bankshot", "Kimsuky"),
            7: record(7, "babyshark", "Kimsuky"),
        }
        self.library = random_minhash(rng, 1)[0]  # e.g. zlib's inflate, in everything
        self.family_unique = random_minhash(rng, 1)[0]  # only in contopee
        self.actor_unique = random_minhash(rng, 1)[0]  # in both Kimsuky families
        self.goodware_only = random_minhash(rng, 1)[0]
        rows: list[tuple[int, np.ndarray, int]] = []  # (sample, signature, exact hash)
        for sample in range(6):
            rows.append((sample, self.library, 111))
        rows.append((0, self.family_unique, 222))
        rows.append((6, self.actor_unique, 333))
        rows.append((7, self.actor_unique, 333))
        rows.append((5, self.goodware_only, 444))
        for sample in range(8):  # unrelated filler so the KB is not only shared code
            for _ in range(20):
                rows.append((sample, random_minhash(rng, 1)[0], int(rng.integers(1 << 62))))
        self.table = make_table(
            np.stack([signature for _, signature, _ in rows]),
            sample_id=np.array([sample for sample, _, _ in rows], dtype=np.int64),
            exact_hash=np.array([exact for _, _, exact in rows], dtype=np.uint64),
        )
        self.index = FunctionIndex.build(self.table, revision=1, samples=self.samples)

    def rarity_of(self, signature: np.ndarray, exact: int) -> tuple[float, str, int]:
        matches = self.index.query(
            queries_for(signature.reshape(1, -1), np.array([exact], dtype=np.uint64))
        )
        assert self.index.rarity is not None and len(matches) > 0
        explained = self.index.rarity.explain(int(matches.row[0]))
        assert float(self.index.rarity.weights(matches.row)[0]) == pytest.approx(explained.weight)
        return explained.weight, explained.reason, explained.family_count


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return KnowledgeBase()


def test_family_unique_code_has_top_weight_and_named_reason(kb: KnowledgeBase) -> None:
    weight, reason, families = kb.rarity_of(kb.family_unique, 222)
    assert weight == pytest.approx(1.0)
    assert families == 1
    assert reason.startswith("in 1 family (contopee), 1 actor (Lazarus Group), 0 goodware")


def test_actor_unique_code_across_two_families_has_top_weight(kb: KnowledgeBase) -> None:
    weight, reason, families = kb.rarity_of(kb.actor_unique, 333)
    assert weight == pytest.approx(1.0)
    assert families == 2
    assert "1 actor (Kimsuky)" in reason and "unique to one group" in reason


def test_library_in_five_families_and_goodware_weighs_almost_nothing(kb: KnowledgeBase) -> None:
    library, reason, families = kb.rarity_of(kb.library, 111)
    family_unique, _, _ = kb.rarity_of(kb.family_unique, 222)
    assert families == 5
    assert library < 0.02 < family_unique
    assert "5 families" in reason and "+2 more" in reason
    assert "1 goodware: public library or runtime code" in reason


def test_goodware_only_code_weighs_zero(kb: KnowledgeBase) -> None:
    weight, reason, _ = kb.rarity_of(kb.goodware_only, 444)
    assert weight == 0.0
    assert "0 families" in reason


def test_near_identical_copies_share_a_cluster() -> None:
    """Not byte-identical (different exact hash) but MinHash ~0.9: one cluster, two families."""
    rng = np.random.default_rng(21)
    base = rng.choice(1 << 31, size=300, replace=False)
    variant = np.concatenate((base[:285], rng.choice(1 << 31, size=15) + (1 << 31)))
    filler = random_minhash(rng, 40)
    table = make_table(
        np.vstack([minhash_of(base), minhash_of(variant), filler]),
        sample_id=np.array([0, 1] + [2] * 40, dtype=np.int64),
    )
    samples = {0: record(0, "alpha"), 1: record(1, "beta"), 2: record(2, "gamma")}
    index = FunctionIndex.build(table, revision=1, samples=samples)
    matches = index.query(queries_for(minhash_of(base).reshape(1, -1)))
    assert index.rarity is not None
    explained = index.rarity.explain(int(matches.row[0]))
    assert explained.family_count == 2
    assert set(explained.families) == {"alpha", "beta"}
    assert explained.weight < 0.5  # split between two owners


def test_unlabelled_samples_count_as_their_own_groups() -> None:
    rng = np.random.default_rng(22)
    shared = random_minhash(rng, 1)
    table = make_table(
        np.vstack([shared, shared, shared, random_minhash(rng, 10)]),
        sample_id=np.array([0, 1, 2] + [3] * 10, dtype=np.int64),
        exact_hash=np.array([5, 5, 5, *range(100, 110)], dtype=np.uint64),
    )
    index = FunctionIndex.build(table, revision=1, samples={0: record(0, "alpha")})
    assert index.rarity is not None
    matches = index.query(queries_for(shared, np.array([5], dtype=np.uint64)))
    explained = index.rarity.explain(int(matches.row[0]))
    assert explained.owner_count == 3  # alpha + two unlabelled samples
    assert explained.weight < 0.34


def test_rarity_weight_formula_anchors() -> None:
    owners = np.array([1, 2, 5, 10, 0, 1], dtype=np.uint32)
    goodware = np.array([0, 0, 0, 0, 3, 1], dtype=np.uint32)
    weights = rarity_weight(owners, goodware, total_owners=10)
    assert weights[0] == pytest.approx(1.0)
    assert weights[0] > weights[1] > weights[2] > weights[3] == pytest.approx(0.0)
    assert weights[4] == 0.0
    assert weights[5] == pytest.approx(0.1)


@given(
    owners=st.integers(1, 500),
    goodware=st.integers(0, 500),
    total=st.integers(1, 1000),
)
def test_rarity_weight_is_bounded_and_monotone(owners: int, goodware: int, total: int) -> None:
    total = max(total, owners)
    weight = float(rarity_weight(np.array([owners]), np.array([goodware]), total)[0])
    more_owners = float(rarity_weight(np.array([owners + 1]), np.array([goodware]), total + 1)[0])
    more_goodware = float(rarity_weight(np.array([owners]), np.array([goodware + 1]), total)[0])
    assert 0.0 <= weight <= 1.0
    assert more_goodware <= weight
    assert more_owners <= float(
        rarity_weight(np.array([owners]), np.array([goodware]), total + 1)[0]
    )


def test_connected_components_follow_chains() -> None:
    labels = connected_components(
        7, np.array([5, 4, 3, 0], dtype=np.int64), np.array([6, 5, 4, 1], dtype=np.int64)
    )
    assert labels.tolist() == [0, 0, 2, 3, 3, 3, 3]


def test_stored_profiles_equal_counts_per_cluster() -> None:
    """Clusters within one sample are counted per sample and equal profiles stored once; the
    counts, names and weights must still be what counting each cluster's own samples gives."""
    rng = np.random.default_rng(23)
    labels = [("alpha", "Actor A"), ("beta", "Actor A"), ("gamma", None), (None, None)]
    samples = {
        s: record(s, *labels[s % 4]) if s != 9 else record(s, goodware=True) for s in range(12)
    }
    shared = random_minhash(rng, 30)
    signatures, sample_ids = [], []
    for sample in range(12):
        own = random_minhash(rng, 25)
        picked = shared[rng.choice(30, size=10, replace=False)]
        twice = own[:2]  # code that a sample holds twice stays a one-sample cluster
        for block in (own, picked, twice):
            signatures.append(block)
            sample_ids.extend([sample] * len(block))
    table = make_table(np.vstack(signatures), sample_id=np.array(sample_ids, dtype=np.int64))
    index = FunctionIndex.build(table, revision=1, samples=samples)
    assert index.rarity is not None
    clusters = cluster_near_identical(index.signatures, index.band_orders, index.exact_hash)
    row_samples = index.sample_id(np.arange(len(index)))
    spanning = {c for c in clusters.tolist() if len(set(row_samples[clusters == c])) > 1}
    assert len(index.rarity.owner_count) < 12 + len(spanning)  # samples + shared clusters
    total_owners = index.rarity.total_owners
    described = set()
    for row in range(len(index)):
        members = {int(s) for s in row_samples[clusters == clusters[row]]}
        records = [samples[s] for s in members]
        malware = [r for r in records if not r.goodware]
        families = {f for r in malware for f in r.families} | {
            f for r in records if r.goodware for f in r.families
        }
        actors = {a for r in records for a in r.actors}
        owners = {
            ("actor", a) if r.actors else ("family", f) if r.families else ("sample", r.sample_id)
            for r in malware
            for a in (sorted(r.actors) or [None])
            for f in (sorted(r.families) or [None])
        }
        goodware = sum(1 for r in records if r.goodware)
        explained = index.rarity.explain(row)
        assert index.rarity.explain_rows([row, row]) == [explained, explained]
        described.add(
            (
                explained.family_count,
                explained.actor_count,
                explained.owner_count,
                explained.goodware_count,
                explained.families,
                explained.actors,
            )
        )
        assert set(explained.families) <= families and set(explained.actors) <= actors
        assert len(explained.families) == min(len(families), 3)
        assert (explained.family_count, explained.actor_count) == (len(families), len(actors))
        assert (explained.owner_count, explained.goodware_count) == (len(owners), goodware)
        expected = rarity_weight(np.array([len(owners)]), np.array([goodware]), total_owners)
        assert explained.weight == pytest.approx(float(expected[0]))
    assert len(described) == len(set(index.rarity.profile.tolist()))  # one profile per content
