"""Evidence items: data, not prose. Renderers build text from these fields."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

# "artefact": rare strings, export names, imphash, PDB path, Rich header, signer and version info
# shared with the KB (earmark.correlate.artefacts); "toolchain" is reserved for consistency checks.
EvidenceKind = Literal["code", "infrastructure", "toolchain", "artefact"]


@dataclass(frozen=True, slots=True)
class Evidence:
    kind: EvidenceKind
    actor: str | None  # the actor this item points to (None: family only / unattributed)
    family: str | None
    similarity: float  # 0..1: code similarity, or match strength of the pivot (1 = exact)
    weight: float  # 0..1 after rarity / warninglist / over-correlation / time-decay discounts
    reason: str  # why the weight is what it is, e.g. "in 1 family, 0 goodware"
    # code evidence
    query_address: int | None = None
    query_size: int | None = None
    match_sha256: str | None = None
    match_address: int | None = None
    match_size: int | None = None
    # infrastructure evidence
    pivot: str | None = None  # "ipv4", "domain", "registered-domain", "ipv4-/24", "url-path", …
    value: str | None = None  # the query's value
    matched_value: str | None = None  # the known value it links to
    report_id: str | None = None
    observed_at: date | None = None
    # artefact evidence (pivot = artefact kind: "string", "export", "imphash", "pdb", ...; value =
    # the artefact as found in the query, control characters escaped)
    query_offset: int | None = None  # file offset of a string in the query
    # Query functions that reference the artefact (strings): an artefact a counted shared
    # function already references adds nothing to that function's code evidence.
    related_addresses: tuple[int, ...] = ()
    # Largest share of one KB sample's rare strings (of this item's actor/family) found in the
    # query: near 1 for a new release of that sample, small for a file sharing one library.
    match_share: float | None = None
