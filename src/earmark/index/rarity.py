"""How rare each indexed function is across the knowledge base, and the weight that follows.

Near-identical functions (equal exact hash, or b-bit MinHash estimate >= RARITY_SIMILARITY)
are grouped into clusters once for the whole KB: every LSH band already sorts rows by key, so
rows that share a key sit next to each other and one pass over neighbours per band yields the
candidate pairs; verified pairs are joined by connected components. Per cluster we count the
distinct families, actors and goodware samples, and turn the counts into a weight (the formula
and its reasons are in docs/index.md, "Rarity weight").

What is stored is a *profile* per row: the counts and example names of its cluster. Most
clusters hold the code of one sample only (in a KB of unrelated samples, nearly all of them)
and their counts are that sample's own labels, so they are counted once per sample, not per
cluster; clusters spanning several samples are counted on their own. Equal (counts, names)
rows are then stored once: all the code shared by the versions of one family, or unique to
samples of one family, has one profile. Per row only the profile number is kept, in the
fewest whole bytes that hold it; counts and name codes use the narrowest integer dtype, and
the weight is computed from the counts when asked, not stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from earmark.index.lsh import (
    BAND_COUNT,
    band_keys,
    count_agreeing_slots,
    estimate_jaccard_from_agreement,
    expand_ranges,
)
from earmark.index.packed import PackedColumns, PackedUInts, narrowest_signed, narrowest_unsigned
from earmark.model.kb import SampleRecord

# Similarity from which two stored functions count as "the same code" for rarity. Chosen above
# the LSH threshold (0.5): at 0.7 the 1-sigma estimate error (0.057) keeps unrelated functions
# of the usual 0.1-0.3 similarity out, while recompiled copies of one function stay in.
RARITY_SIMILARITY: Final = 0.7

# Each goodware sample containing the code divides the weight by (1 + 9 * count): one goodware
# copy already cuts it to 0.1, because public code proves nothing about who wrote the malware.
GOODWARE_DISCOUNT: Final = 9.0

# Names shown in a reason ("in 2 families (a, b)"); further names are summarised as "+N more".
EXAMPLE_NAMES: Final = 3

# A cluster held by this many owners (actors, or families without an actor) is called shared
# library code in the reason text.
SHARED_OWNER_COUNT: Final = 3

Int64Array = npt.NDArray[np.int64]
UInt32Array = npt.NDArray[np.uint32]
Float32Array = npt.NDArray[np.float32]
CountArray = npt.NDArray[np.unsignedinteger[Any]]  # narrowest unsigned dtype holding the counts
NameCodes = npt.NDArray[np.signedinteger[Any]]  # (profiles, EXAMPLE_NAMES) codes, -1 = none


@dataclass(frozen=True, slots=True)
class FunctionRarity:
    """Rarity of one stored function, with the reason in words for the analyst."""

    weight: float  # 0 (evidence of nothing) .. 1 (unique to one actor or family)
    family_count: int
    actor_count: int
    owner_count: int  # distinct attribution groups: actors, else families, else the sample
    goodware_count: int
    families: tuple[str, ...]  # up to EXAMPLE_NAMES names
    actors: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class RarityTable:
    """Rarity profiles; ``profile[row]`` maps an index row to its profile (see the module doc)."""

    profile: PackedUInts  # (rows,)
    family_count: CountArray  # (profiles,)
    actor_count: CountArray
    owner_count: CountArray
    goodware_count: CountArray
    family_examples: NameCodes
    actor_examples: NameCodes
    family_names: tuple[str, ...]
    actor_names: tuple[str, ...]
    total_owners: int

    def weights(self, rows: npt.ArrayLike) -> Float32Array:
        """Rarity weight of each index row (vectorised)."""
        profiles = self.profile[np.asarray(rows, dtype=np.int64).reshape(-1)]
        return rarity_weight(
            self.owner_count[profiles], self.goodware_count[profiles], self.total_owners
        )

    @property
    def weight(self) -> Float32Array:
        """Weight of every profile (computed from the counts)."""
        return rarity_weight(self.owner_count, self.goodware_count, self.total_owners)

    def explain(self, row: int) -> FunctionRarity:
        return self.explain_rows(np.array([row], dtype=np.int64))[0]

    def explain_rows(self, rows: npt.ArrayLike) -> list[FunctionRarity]:
        """``explain`` of each index row. Rows of one profile share one explanation: code
        evidence explains ~1,500 matched rows per query and they fall in a few hundred
        profiles, so the names and reason text are built once per profile."""
        profiles = self.profile[np.asarray(rows, dtype=np.int64).reshape(-1)]
        distinct, inverse = np.unique(profiles, return_inverse=True)
        weights = rarity_weight(
            self.owner_count[distinct], self.goodware_count[distinct], self.total_owners
        ).tolist()
        explained = [
            self._explain_profile(profile, weight)
            for profile, weight in zip(distinct.tolist(), weights, strict=True)
        ]
        return [explained[position] for position in inverse.reshape(-1).tolist()]

    def _explain_profile(self, profile: int, weight: float) -> FunctionRarity:
        families = tuple(
            self.family_names[c] for c in self.family_examples[profile].tolist() if c >= 0
        )
        actors = tuple(self.actor_names[c] for c in self.actor_examples[profile].tolist() if c >= 0)
        family_count = int(self.family_count[profile])
        actor_count = int(self.actor_count[profile])
        owner_count = int(self.owner_count[profile])
        goodware_count = int(self.goodware_count[profile])
        return FunctionRarity(
            weight=weight,
            family_count=family_count,
            actor_count=actor_count,
            owner_count=owner_count,
            goodware_count=goodware_count,
            families=families,
            actors=actors,
            reason=_reason(
                family_count, families, actor_count, actors, owner_count, goodware_count
            ),
        )

    def arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """Arrays to persist next to the index (names go into the manifest)."""
        return {
            "rarity_profile": self.profile.data,
            "rarity_family_count": self.family_count,
            "rarity_actor_count": self.actor_count,
            "rarity_owner_count": self.owner_count,
            "rarity_goodware_count": self.goodware_count,
            "rarity_family_examples": self.family_examples,
            "rarity_actor_examples": self.actor_examples,
        }

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays().values())


def _plural(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def _named(count: int, names: tuple[str, ...]) -> str:
    if not names:
        return ""
    more = count - len(names)
    return " (" + ", ".join(names) + (f", +{more} more" if more > 0 else "") + ")"


def _reason(
    family_count: int,
    families: tuple[str, ...],
    actor_count: int,
    actors: tuple[str, ...],
    owner_count: int,
    goodware_count: int,
) -> str:
    text = (
        f"in {_plural(family_count, 'family', 'families')}{_named(family_count, families)}, "
        f"{_plural(actor_count, 'actor', 'actors')}{_named(actor_count, actors)}, "
        f"{goodware_count} goodware"
    )
    if goodware_count:
        return text + ": public library or runtime code"
    if owner_count >= SHARED_OWNER_COUNT:
        return text + ": shared by many groups, library or leaked code"
    if owner_count == 1:
        return text + ": unique to one group"
    return text


def rarity_weight(
    owner_count: npt.NDArray[np.integer],
    goodware_count: npt.NDArray[np.integer],
    total_owners: int,
) -> Float32Array:
    """weight = idf(g) / g x 1 / (1 + GOODWARE_DISCOUNT x goodware), g = owners holding it.

    idf(g) = log(T / g) / log(T) is 1 for code of one group and 0 for code every group has;
    dividing by g shares the credit among the g groups a match could point to, so code in five
    families is near 0 even in a large KB. Goodware-only code (g = 0) weighs 0.
    """
    owners = owner_count.astype(np.float64)
    if total_owners <= 1:
        idf = np.ones_like(owners)
    else:
        idf = np.log(total_owners / np.maximum(owners, 1.0)) / math.log(total_owners)
    specificity = np.where(owners > 0, np.clip(idf, 0.0, 1.0) / np.maximum(owners, 1.0), 0.0)
    discount = 1.0 / (1.0 + GOODWARE_DISCOUNT * goodware_count.astype(np.float64))
    return (specificity * discount).astype(np.float32)


def _adjacent_pairs(
    sorted_keys: npt.NDArray[np.generic], order: Int64Array
) -> tuple[Int64Array, Int64Array]:
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    return order[same], order[same + 1]


def connected_components(row_count: int, first: Int64Array, second: Int64Array) -> Int64Array:
    """Smallest row id of each row's component (min-label propagation with pointer jumping).

    Written in numpy to avoid a scipy dependency for this one call; converges in a few rounds
    because every edge links rows already sorted next to each other.
    """
    labels = np.arange(row_count, dtype=np.int64)
    while True:
        smaller = np.minimum(labels[first], labels[second])
        before = labels.copy()
        np.minimum.at(labels, first, smaller)
        np.minimum.at(labels, second, smaller)
        while True:  # pointer jumping: follow labels to their roots
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
        if np.array_equal(labels, before):
            return labels


def _edge_codes(first: Int64Array, second: Int64Array, row_count: int) -> Int64Array:
    """Each pair as one number, the same whichever way round it was found."""
    codes: Int64Array = np.minimum(first, second) * row_count + np.maximum(first, second)
    return codes


def cluster_near_identical(
    signatures: npt.NDArray[np.uint8],
    band_orders: PackedColumns,
    exact_hash: npt.NDArray[np.uint64],
    similarity: float = RARITY_SIMILARITY,
) -> UInt32Array:
    """Dense cluster id per index row (rows must be sorted by band-0 key, as in the index)."""
    row_count = signatures.shape[0]
    if row_count == 0:
        return np.zeros(0, dtype=np.uint32)
    keys = band_keys(signatures)
    # Each band's verified pairs as (lower row) * row_count + (higher row), made distinct
    # once at the end: the 17 pair lists name mostly the same pairs (PE bench (a+c) KB: 394k
    # pairs, 30.8k distinct), and the components depend only on which pairs are joined, so
    # they are found over the distinct ones (their label arrays then stay small).
    edges: list[Int64Array] = []
    identity = np.arange(row_count, dtype=np.int64)
    # Exact hash: always the same code, no verification needed.
    by_hash = np.argsort(exact_hash, kind="stable")
    edges.append(_edge_codes(*_adjacent_pairs(exact_hash[by_hash], by_hash), row_count))
    for band in range(BAND_COUNT):
        order = identity if band == 0 else band_orders.column(band - 1).unpack()
        first, second = _adjacent_pairs(keys[order, band], order)
        agreeing = count_agreeing_slots(signatures, first, signatures, second)
        keep = estimate_jaccard_from_agreement(agreeing) >= similarity
        edges.append(_edge_codes(first[keep], second[keep], row_count))
    distinct = np.unique(np.concatenate(edges))
    del edges
    labels = connected_components(row_count, distinct // row_count, distinct % row_count)
    return np.unique(labels, return_inverse=True)[1].astype(np.uint32)


@dataclass(frozen=True)
class _SampleGroups:
    """Per distinct sample in the index: goodware flag and CSR lists of family/actor/owner codes."""

    goodware: npt.NDArray[np.bool_]
    family: tuple[Int64Array, Int64Array]  # (offsets (S+1,), codes)
    actor: tuple[Int64Array, Int64Array]
    owner: tuple[Int64Array, Int64Array]
    family_names: tuple[str, ...]
    actor_names: tuple[str, ...]
    total_owners: int


def _csr(lists: list[list[int]]) -> tuple[Int64Array, Int64Array]:
    lengths = np.array([len(x) for x in lists], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    codes = np.array([c for x in lists for c in x], dtype=np.int64)
    return offsets, codes


def _sample_groups(sample_ids: Int64Array, samples: Mapping[int, SampleRecord]) -> _SampleGroups:
    family_codes: dict[str, int] = {}
    actor_codes: dict[str, int] = {}
    owner_codes: dict[str, int] = {}
    goodware: list[bool] = []
    families: list[list[int]] = []
    actors: list[list[int]] = []
    owners: list[list[int]] = []
    for sample_id in sample_ids.tolist():
        record = samples.get(sample_id)
        is_goodware = record is not None and record.goodware
        family_set = sorted(record.families) if record is not None else []
        actor_set = sorted(record.actors) if record is not None else []
        goodware.append(is_goodware)
        families.append([family_codes.setdefault(f, len(family_codes)) for f in family_set])
        actors.append([actor_codes.setdefault(a, len(actor_codes)) for a in actor_set])
        if is_goodware:
            owner_keys: list[str] = []
        elif record is not None:
            owner_keys = record.owner_keys
        else:  # no record: its own group, so code shared by unknown samples is not "unique"
            owner_keys = [f"sample:{sample_id}"]
        owners.append([owner_codes.setdefault(k, len(owner_codes)) for k in owner_keys])
    return _SampleGroups(
        goodware=np.array(goodware, dtype=bool),
        family=_csr(families),
        actor=_csr(actors),
        owner=_csr(owners),
        family_names=tuple(family_codes),
        actor_names=tuple(actor_codes),
        total_owners=len(owner_codes),
    )


def _distinct_per_cluster(
    pair_cluster: Int64Array,
    pair_sample: Int64Array,
    csr: tuple[Int64Array, Int64Array],
    cluster_count: int,
) -> tuple[UInt32Array, npt.NDArray[np.int32]]:
    """Distinct codes per cluster (count, and the first EXAMPLE_NAMES codes)."""
    offsets, codes = csr
    examples = np.full((cluster_count, EXAMPLE_NAMES), -1, dtype=np.int32)
    which, positions, _ = expand_ranges(offsets[pair_sample], offsets[pair_sample + 1], 1 << 62)
    if len(which) == 0:
        return np.zeros(cluster_count, dtype=np.uint32), examples
    code_space = int(codes.max()) + 1
    combined = np.unique(pair_cluster[which] * code_space + codes[positions])
    clusters = combined // code_space
    counts = np.bincount(clusters, minlength=cluster_count).astype(np.uint32)
    starts = np.cumsum(counts.astype(np.int64)) - counts
    rank = np.arange(len(combined), dtype=np.int64) - starts[clusters]
    shown = rank < EXAMPLE_NAMES
    examples[clusters[shown], rank[shown]] = (combined[shown] % code_space).astype(np.int32)
    return counts, examples


def compute_rarity(
    signatures: npt.NDArray[np.uint8],
    band_orders: PackedColumns,
    exact_hash: npt.NDArray[np.uint64],
    sample_position: Int64Array,
    sample_ids: Int64Array,
    samples: Mapping[int, SampleRecord],
    similarity: float = RARITY_SIMILARITY,
) -> RarityTable:
    """Rarity of every index row; ``sample_position[row]`` indexes ``sample_ids``.

    Samples missing from ``samples`` count as unlabelled.
    """
    cluster = cluster_near_identical(signatures, band_orders, exact_hash, similarity).astype(
        np.int64
    )
    cluster_count = int(cluster.max()) + 1 if len(cluster) else 0
    sample_count = len(sample_ids)
    groups = _sample_groups(sample_ids, samples)
    pairs = np.unique(cluster * max(sample_count, 1) + sample_position)
    pair_cluster = pairs // max(sample_count, 1)
    pair_sample = pairs % max(sample_count, 1)
    # Clusters spanning several samples get groups S, S+1, ...; the others are their sample.
    spanning = np.bincount(pair_cluster, minlength=cluster_count) > 1
    cluster_group = np.full(cluster_count, -1, dtype=np.int64)
    cluster_group[spanning] = sample_count + np.arange(int(spanning.sum()), dtype=np.int64)
    row_group = np.where(spanning[cluster], cluster_group[cluster], sample_position)
    shared_pairs = spanning[pair_cluster]
    member_group = np.concatenate(
        (np.arange(sample_count, dtype=np.int64), cluster_group[pair_cluster[shared_pairs]])
    )
    member_sample = np.concatenate(
        (np.arange(sample_count, dtype=np.int64), pair_sample[shared_pairs])
    )
    group_count = sample_count + int(spanning.sum())
    family_count, family_examples = _distinct_per_cluster(
        member_group, member_sample, groups.family, group_count
    )
    actor_count, actor_examples = _distinct_per_cluster(
        member_group, member_sample, groups.actor, group_count
    )
    owner_count, _ = _distinct_per_cluster(member_group, member_sample, groups.owner, group_count)
    goodware_count = np.bincount(
        member_group[groups.goodware[member_sample]], minlength=group_count
    ).astype(np.uint32)
    # Equal (counts, names) groups become one profile.
    described = np.column_stack(
        (family_count, actor_count, owner_count, goodware_count, family_examples, actor_examples)
    ).astype(np.int64)
    profiles, group_profile = np.unique(described, axis=0, return_inverse=True)
    examples = 4 + EXAMPLE_NAMES
    return RarityTable(
        profile=PackedUInts.pack(group_profile.reshape(-1)[row_group]),
        family_count=narrowest_unsigned(profiles[:, 0]),
        actor_count=narrowest_unsigned(profiles[:, 1]),
        owner_count=narrowest_unsigned(profiles[:, 2]),
        goodware_count=narrowest_unsigned(profiles[:, 3]),
        family_examples=narrowest_signed(profiles[:, 4:examples]),
        actor_examples=narrowest_signed(profiles[:, examples:]),
        family_names=groups.family_names,
        actor_names=groups.actor_names,
        total_owners=groups.total_owners,
    )
