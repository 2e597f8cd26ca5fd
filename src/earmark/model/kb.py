"""Knowledge-base records: labels with provenance and TLP, and the bulk function table.

``FunctionTable`` is the hand-off from the store to the index: plain numpy arrays, one row per
stored function, so the index never runs SQL and the store never knows about LSH.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import numpy as np
import numpy.typing as npt


class Tlp(StrEnum):
    """Traffic Light Protocol 2.0 markings."""

    CLEAR = "clear"
    GREEN = "green"
    AMBER = "amber"
    AMBER_STRICT = "amber+strict"
    RED = "red"


@dataclass(frozen=True, slots=True)
class Provenance:
    source: str  # who/what said it: "case 17-112", a report URL, "analyst:jdoe"
    recorded_at: datetime  # when the KB learnt it (UTC)
    tlp: Tlp = Tlp.AMBER


@dataclass(frozen=True, slots=True)
class SampleLabel:
    """One claim about a sample: it belongs to an actor and/or family, or is goodware."""

    actor: str | None
    family: str | None
    goodware: bool
    provenance: Provenance


@dataclass(frozen=True, slots=True)
class SampleRecord:
    sample_id: int
    sha256: str
    format: str
    arch: str
    size: int
    function_count: int
    labels: tuple[SampleLabel, ...]

    @property
    def families(self) -> frozenset[str]:
        return frozenset(lb.family for lb in self.labels if lb.family)

    @property
    def actors(self) -> frozenset[str]:
        return frozenset(lb.actor for lb in self.labels if lb.actor)

    @property
    def goodware(self) -> bool:
        return any(lb.goodware for lb in self.labels)

    @property
    def claims(self) -> list[tuple[str | None, str | None]]:
        """Distinct (actor, family) claims of the labels, sorted for stable output."""
        claims = {(lb.actor, lb.family) for lb in self.labels if lb.actor or lb.family}
        return sorted(claims, key=lambda claim: (claim[0] or "", claim[1] or ""))

    @property
    def owner_keys(self) -> list[str]:
        """The attribution groups a non-goodware sample counts for in rarity statistics: its
        actors, else its families, else itself (so code or artefacts shared only by unknown
        samples are not "unique to one group"). Goodware is counted apart by its callers."""
        if self.actors:
            return [f"actor:{a}" for a in sorted(self.actors)]
        if self.families:
            return [f"family:{f}" for f in sorted(self.families)]
        return [f"sample:{self.sample_id}"]


@dataclass(frozen=True)
class FunctionTable:
    """All stored functions as parallel arrays (row i describes one function)."""

    function_id: npt.NDArray[np.int64]
    sample_id: npt.NDArray[np.int64]
    address: npt.NDArray[np.uint64]
    size: npt.NDArray[np.uint32]
    instruction_count: npt.NDArray[np.uint32]
    exact_hash: npt.NDArray[np.uint64]
    minhash: npt.NDArray[np.uint32]  # shape (N, MINHASH_PERMUTATIONS)

    def __len__(self) -> int:
        return int(self.function_id.shape[0])
