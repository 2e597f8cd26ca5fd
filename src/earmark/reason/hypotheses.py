"""Evidence of any kind fused into ranked actor and family hypotheses.

Scoring (docs/attribution.md, "Scoring"):
- every evidence item contributes ``similarity x weight`` to the actor and the family it names;
- items are grouped by what they observe about the query (code: the query function; infrastructure:
  the query's value). A group counts once per hypothesis with its strongest item, so five KB
  samples of one family matching one query function are one piece of evidence, not five;
- a group's contribution is capped at ``MAX_ITEM_CONTRIBUTION`` so no single function or
  indicator can make a hypothesis certain;
- groups that the producer declares neighbours (code: caller/callee in the query's call graph)
  are partly dependent: taken strongest first, a group next to one already counted is multiplied
  by ``DEPENDENT_DISCOUNT``;
- the *link score* is the noisy-OR ``1 - prod(1 - c)`` of the counted contributions: how sure we
  are that the query and the hypothesis share code or infrastructure at all;
- the hypothesis *score* is the link score times ``min(1, coverage / AUTHORSHIP_COVERAGE)``
  (and, for code evidence alone, times ``min(1, rare functions / MIN_RARE_FOR_AUTHORSHIP)``),
  where coverage is the share of the query's distinctive functions the hypothesis explains
  (no code evidence: factor 1). A sample whose distinctive code is mostly explained keeps its
  link score; a library file that shares 4 % of its functions with a project's statically linked
  copy does not get a high score however exact those few matches are. Both depend on the share
  of the query explained, not on its size, so scores compare across queries;
- a hypothesis whose code evidence covers a small part of the query's distinctive functions, or
  rests on fewer than ``MIN_RARE_FOR_AUTHORSHIP`` rare functions, is a *shared-code link*, not
  authorship (the WannaCry/Lazarus pattern): ``relation`` says which.
- when no authored actor hypothesis reaches ``KNOWN_ACTOR_THRESHOLD`` the verdict is "no known
  actor".

Artefact evidence (rare strings, export names, imphash, PDB path, Rich header, signer, version
info; ``correlate.artefacts``) is a second pillar fused after the code/infrastructure score:
- an artefact string that a query function references is dropped for a hypothesis whose counted
  code evidence already includes that function (the code match already says it);
- the Rich header tool set and imphash (``TOOLCHAIN_ARTEFACTS``) corroborate: they add at most
  what the code and author artefacts already say (a shared build environment alone links
  unrelated builds of one CI image);
- artefact groups (one per artefact, whatever the number of KB samples holding it) contribute
  ``min(weight, MAX_ARTEFACT_CONTRIBUTION)`` each, noisy-OR into the *artefact link*, strings
  and identity artefacts (exports, PDB path, imphash, Rich header, signer, version info) apart;
- strings come in bulk with whatever code they travel with (a statically linked runtime brings
  hundreds), so the string link is scaled by ``min(1, share / ARTEFACT_SHARE)``, where share is
  the largest part of one KB sample's rare strings that the query holds (``match_share``);
- the artefact part of the score is ``min(1 - (1 - identity)(1 - scaled strings),
  MAX_ARTEFACT_SCORE)`` and joins the code part by noisy-OR: ``score = 1 - (1 - code part)(1 -
  artefact part)``. A new release whose code drifted but which keeps its project's rare strings
  and exports ranks that project first; artefacts alone never reach the certainty code can;
- artefacts never turn a link into authorship: a hypothesis with artefacts only is
  ``shares-artefacts`` (a lead), and ``relation`` otherwise follows the code rules above;
- a ``shared-library`` item (the query is a library that samples of many groups import) caps
  every hypothesis at ``SHARED_LIBRARY_CAP`` with relation ``shared-library``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from earmark.model.evidence import Evidence

# Largest contribution of one evidence group. Two independent exact matches of unique code give
# 1 - 0.4^2 = 0.84, four give 0.97: certainty takes several independent pieces of evidence.
MAX_ITEM_CONTRIBUTION: Final = 0.6

# Factor for an evidence group adjacent (call graph) to one already counted: a caller of a
# shared routine is often shared because the routine is, so it adds less than independent code.
DEPENDENT_DISCOUNT: Final = 0.5

# Best authored actor score below which the verdict is "no known actor". 0.5 is one strong
# exact match of unique code (0.6 cap) minus noise: a single rare function does not name an
# actor when its similarity or weight is discounted at all.
KNOWN_ACTOR_THRESHOLD: Final = 0.5

# Share of the query's distinctive functions a hypothesis must explain to be read as authorship;
# below it, matching code is a link (reuse, leak, shared developer). New versions of one family
# share most of their code (alpha v3 vs v1/v2: ~90 % of matchable functions); a program that
# borrowed a crypto library shares a small part (charlie: 4 of ~20).
AUTHORSHIP_COVERAGE: Final = 0.5

# An item counts as "rare" shared code for the hypothesis summary from this weight.
RARE_WEIGHT: Final = 0.5

# Rare shared functions needed before code evidence alone is read as authorship: on the PE corpus
# a tiny module (lz4 `_version`) matched another project's start-up code at high coverage with no
# rare function at all (bench/attribution_pe.py, setting b).
MIN_RARE_FOR_AUTHORSHIP: Final = 2

# Strongest evidence items named per hypothesis.
STRONGEST_SHOWN: Final = 3

# Largest contribution of one artefact (a string, an export name, a PDB path): three artefacts
# unique to one group give a link of 1 - 0.7^3 = 0.66. Lower than code's 0.6 because one string
# is cheap to copy and often travels with a shared library.
MAX_ARTEFACT_CONTRIBUTION: Final = 0.3
# Ceiling of the artefact part of a score: without shared code, artefacts (copyable, forgeable:
# a stolen certificate, a borrowed string table) support at most "roughly even chance"; with
# code they add to it. Chosen with the PE benchmark in view (docs/benchmarks.md, "Artefact
# pillar": 0.6 let two MSVC C++ runtime DLLs reach 0.7 through a project that links that
# runtime statically).
MAX_ARTEFACT_SCORE: Final = 0.5
# Share of one KB sample's rare strings the query must hold for its string artefacts to count
# in full. New releases of the PE corpus projects hold 0.29-0.97 of their oldest release's rare
# strings (median ~0.65); files of other projects at most 0.23, an MSVC runtime DLL 0.21-0.39 of
# a project that links that runtime statically. 0.5 mirrors AUTHORSHIP_COVERAGE for code.
ARTEFACT_SHARE: Final = 0.5
# Score ceiling when the query is a library imported by many groups: "unlikely" at most, below
# the verdict threshold, whatever code it shares with a group that links it statically.
SHARED_LIBRARY_CAP: Final = 0.3

# Artefacts of the build environment rather than of the author: the Rich header tool set and
# the imphash. Every project built on one CI image with one SDK shares them (PE corpus: lz4,
# markupsafe and mmh3 releases of 2024 have one Rich set), so they corroborate a link made by
# other evidence (adding at most as much as it says) and never make one alone.
TOOLCHAIN_ARTEFACTS: Final = frozenset({"rich-header", "imphash"})

Relation = Literal["authored", "shares-code", "shares-artefacts", "shared-library"]
EvidenceKey = tuple[str, str]  # (kind, what the item observes about the query)


@dataclass(frozen=True, slots=True)
class Hypothesis:
    actor: str | None
    family: str | None  # None: the actor-level hypothesis
    score: float  # 0..1: link score scaled by coverage (see module docstring)
    link_score: float  # 0..1 noisy-OR of capped, de-duplicated contributions
    evidence_count: int  # distinct evidence groups counted
    rare_function_count: int  # distinct query functions shared with weight >= RARE_WEIGHT
    shared_bytes: int  # bytes of the query functions counted
    coverage: float | None  # counted code groups / distinctive query functions (None: no code)
    relation: Relation
    artefact_count: int  # distinct artefacts counted (after dropping those code already covers)
    artefact_link: float  # 0..1 noisy-OR of the counted artefacts' contributions
    strongest: tuple[int, ...]  # positions in the evidence sequence, strongest first


@dataclass(frozen=True, slots=True)
class Verdict:
    actor: str | None  # None: no known actor
    family: str | None
    score: float
    summary: str  # rendered from the fields above and the hypotheses, for people


def evidence_key(item: Evidence) -> EvidenceKey:
    """What an item observes about the query; items with one key are one observation."""
    if item.kind == "code" and item.query_address is not None:
        return ("code", f"{item.query_address:x}")
    return (item.kind, f"{item.pivot or ''}:{item.value or item.matched_value or item.reason}")


def code_neighbours(
    neighbours: Mapping[int, frozenset[int]],
) -> dict[EvidenceKey, set[EvidenceKey]]:
    """Call-graph neighbours of query functions as evidence-key neighbours."""
    return {
        ("code", f"{address:x}"): {("code", f"{other:x}") for other in others}
        for address, others in neighbours.items()
    }


def _contribution(item: Evidence) -> float:
    cap = MAX_ARTEFACT_CONTRIBUTION if item.kind == "artefact" else MAX_ITEM_CONTRIBUTION
    return min(max(item.similarity, 0.0) * max(item.weight, 0.0), cap)


def is_shared_library(item: Evidence) -> bool:
    return item.kind == "artefact" and item.pivot == "shared-library"


def _independent_artefacts(
    positions: Sequence[int], evidence: Sequence[Evidence], counted_code: set[int]
) -> list[int]:
    """Artefact items not referenced by a query function whose code match is already counted."""
    return [
        position
        for position in positions
        if not counted_code.intersection(evidence[position].related_addresses)
    ]


@dataclass(frozen=True, slots=True)
class _Observations:
    """Each evidence item's key and capped contribution, computed once per ranking: every item
    is scored in its actor's and its family's group (and code evidence runs to thousands)."""

    keys: list[EvidenceKey]
    values: list[float]

    @classmethod
    def of(cls, evidence: Sequence[Evidence]) -> _Observations:
        return cls([evidence_key(item) for item in evidence], list(map(_contribution, evidence)))


_NO_NEIGHBOURS: Final[frozenset[EvidenceKey]] = frozenset()


def _score_group(
    positions: Sequence[int],
    observations: _Observations,
    neighbours: Mapping[EvidenceKey, set[EvidenceKey]],
) -> tuple[float, list[tuple[EvidenceKey, int, float]]]:
    keys, values = observations.keys, observations.values
    best: dict[EvidenceKey, tuple[float, int]] = {}
    for position in positions:
        key = keys[position]
        value = values[position]
        if key not in best or value > best[key][0]:
            best[key] = (value, position)
    ordered = sorted(best.items(), key=lambda entry: (-entry[1][0], entry[0]))
    counted: list[tuple[EvidenceKey, int, float]] = []
    seen: set[EvidenceKey] = set()
    remaining = 1.0
    for key, (value, position) in ordered:
        if not seen.isdisjoint(neighbours.get(key, _NO_NEIGHBOURS)):
            value *= DEPENDENT_DISCOUNT
        seen.add(key)
        remaining *= 1.0 - value
        counted.append((key, position, value))
    return 1.0 - remaining, counted


@dataclass(frozen=True, slots=True)
class _ArtefactScore:
    """The artefact pillar of one hypothesis (module docstring, "Artefact evidence")."""

    strings: float  # string link scaled by the share of a known sample's rare strings
    identity: float  # exports, PDB path, signer, version info
    toolchain: float  # Rich header tool set, imphash: corroboration only
    link: float  # noisy-OR of every counted artefact, unscaled
    counted: list[tuple[EvidenceKey, int, float]]
    makes_link: bool  # strings or identity artefacts counted (toolchain alone does not)

    def part(self, code_part: float) -> float:
        """The artefact part of the score, given the code/infrastructure part."""
        author = 1.0 - (1.0 - self.strings) * (1.0 - self.identity)
        # Corroboration cannot outweigh what it corroborates: the build environment adds at
        # most as much as the code and author artefacts already say.
        toolchain = min(self.toolchain, 1.0 - (1.0 - code_part) * (1.0 - author))
        return min(1.0 - (1.0 - author) * (1.0 - toolchain), MAX_ARTEFACT_SCORE)


def _score_artefacts(
    positions: Sequence[int], evidence: Sequence[Evidence], observations: _Observations
) -> _ArtefactScore:
    strings = [p for p in positions if evidence[p].pivot == "string"]
    toolchain = [p for p in positions if evidence[p].pivot in TOOLCHAIN_ARTEFACTS]
    identity = [p for p in positions if p not in strings and p not in toolchain]
    string_link, strings_counted = _score_group(strings, observations, {})
    identity_link, identity_counted = _score_group(identity, observations, {})
    toolchain_link, toolchain_counted = _score_group(toolchain, observations, {})
    share = max((evidence[p].match_share or 0.0 for p in strings), default=0.0)
    return _ArtefactScore(
        strings=string_link * min(1.0, share / ARTEFACT_SHARE),
        identity=identity_link,
        toolchain=toolchain_link,
        link=1.0 - (1.0 - string_link) * (1.0 - identity_link) * (1.0 - toolchain_link),
        counted=[*strings_counted, *identity_counted, *toolchain_counted],
        makes_link=bool(strings_counted or identity_counted),
    )


def rank_hypotheses(
    evidence: Sequence[Evidence],
    neighbours: Mapping[EvidenceKey, set[EvidenceKey]] | None = None,
    distinctive_code_units: int | None = None,
) -> list[Hypothesis]:
    """Actor and family hypotheses, best first (ties by name, so order never depends on input
    order). ``distinctive_code_units`` is how many code groups the query could have produced."""
    neighbours = neighbours or {}
    by_actor: dict[str, list[int]] = defaultdict(list)
    by_family: dict[str, list[int]] = defaultdict(list)
    family_actors: dict[str, set[str]] = defaultdict(set)
    for position, item in enumerate(evidence):
        if item.actor:
            by_actor[item.actor].append(position)
        if item.family:
            by_family[item.family].append(position)
            if item.actor:
                family_actors[item.family].add(item.actor)
    hypotheses = []
    groups: list[tuple[str | None, str | None, list[int]]] = [
        (actor, None, positions) for actor, positions in by_actor.items()
    ]
    for family, positions in by_family.items():
        # A family claimed by several actors (conflicting labels) keeps no single actor name.
        actors = family_actors[family]
        groups.append((next(iter(actors)) if len(actors) == 1 else None, family, positions))
    shared_library = any(is_shared_library(item) for item in evidence)
    observations = _Observations.of(evidence)
    for group_actor, group_family, positions in groups:
        artefact_positions = [p for p in positions if evidence[p].kind == "artefact"]
        other_positions = [p for p in positions if evidence[p].kind != "artefact"]
        link_score, counted = _score_group(other_positions, observations, neighbours)
        code_counted = [entry for entry in counted if entry[0][0] == "code"]
        counted_code = {
            address
            for _, index, _ in code_counted
            if (address := evidence[index].query_address) is not None
        }
        artefacts = _score_artefacts(
            _independent_artefacts(artefact_positions, evidence, counted_code),
            evidence,
            observations,
        )
        rare_functions = sum(
            1 for _, index, _ in code_counted if evidence[index].weight >= RARE_WEIGHT
        )
        coverage = None
        if code_counted and distinctive_code_units:
            coverage = min(len(code_counted) / distinctive_code_units, 1.0)
        only_code = len(code_counted) == len(counted)
        relation: Relation = "authored"
        if not counted:
            relation = "shares-artefacts"
        elif coverage is not None and (
            coverage < AUTHORSHIP_COVERAGE
            or (only_code and rare_functions < MIN_RARE_FOR_AUTHORSHIP)
        ):
            relation = "shares-code"
        explained = 1.0 if coverage is None else min(1.0, coverage / AUTHORSHIP_COVERAGE)
        if coverage is not None and only_code:
            # Code alone with fewer than MIN_RARE_FOR_AUTHORSHIP rare functions: the link rests
            # on common code (runtime start-up, small helpers), so it cannot score high.
            explained *= min(1.0, rare_functions / MIN_RARE_FOR_AUTHORSHIP)
        code_part = link_score * explained
        score = 1.0 - (1.0 - code_part) * (1.0 - artefacts.part(code_part))
        if shared_library:
            score = min(score, SHARED_LIBRARY_CAP)
            relation = "shared-library"
        if not counted and not artefacts.makes_link:
            continue  # only build-environment artefacts: no hypothesis at all
        strongest = sorted([*counted, *artefacts.counted], key=lambda entry: -entry[2])
        hypotheses.append(
            Hypothesis(
                actor=group_actor,
                family=group_family,
                score=round(score, 4),
                link_score=round(1.0 - (1.0 - link_score) * (1.0 - artefacts.link), 4),
                evidence_count=len(counted) + len(artefacts.counted),
                rare_function_count=rare_functions,
                shared_bytes=sum(evidence[index].query_size or 0 for _, index, _ in code_counted),
                coverage=None if coverage is None else round(coverage, 4),
                relation=relation,
                artefact_count=len(artefacts.counted),
                artefact_link=round(artefacts.link, 4),
                strongest=tuple(position for _, position, _ in strongest[:STRONGEST_SHOWN]),
            )
        )
    hypotheses.sort(
        key=lambda h: (
            -h.score,
            -(h.coverage or 0.0),
            -h.link_score,
            h.family is not None,
            h.actor or "",
            h.family or "",
        )
    )
    return hypotheses


def decide_verdict(
    hypotheses: Sequence[Hypothesis], shared_library: Evidence | None = None
) -> Verdict:
    """The best authored actor (or actor-less family) above the threshold, else no known actor.

    ``shared_library``: the item saying the query is a library many groups import."""
    for hypothesis in hypotheses:
        if hypothesis.relation != "authored" or hypothesis.score < KNOWN_ACTOR_THRESHOLD:
            continue
        if hypothesis.family is not None and hypothesis.actor is not None:
            continue  # the actor-level hypothesis of this actor speaks for it
        family = hypothesis.family or _best_family_of(hypotheses, hypothesis.actor)
        name = hypothesis.actor or f"family {hypothesis.family}"
        return Verdict(
            actor=hypothesis.actor,
            family=family,
            score=hypothesis.score,
            summary=f"{name} ({likelihood_words(hypothesis.score)}, score {hypothesis.score:.2f})",
        )
    summary = "no known actor"
    if shared_library is not None:
        summary += f"; {shared_library.reason}"
    links = sorted(
        (h for h in hypotheses if h.actor and h.family is None and h.link_score > 0),
        # Score first: a strong link resting on common code (scaled to ~0) is not the lead.
        key=lambda h: (-h.score, -h.link_score),
    )
    if links:
        best = links[0]
        summary += f"; linked to {best.actor} by {_link_words(best)}: " + (
            "a lead (a project or developer in common, or a copied string table), not "
            "authorship; weigh tooling and infrastructure evidence"
            if best.relation == "shares-artefacts"
            else "not enough of the sample for authorship, enough for a lead (code reuse or a "
            "shared developer); weigh tooling and infrastructure evidence"
        )
    return Verdict(actor=None, family=None, score=0.0, summary=summary)


def _link_words(hypothesis: Hypothesis) -> str:
    parts = []
    if hypothesis.relation != "shares-artefacts" and (
        hypothesis.rare_function_count or not hypothesis.artefact_count
    ):
        parts.append(f"shared rare code ({hypothesis.rare_function_count} rare functions)")
    if hypothesis.artefact_count:
        parts.append(
            f"rare artefacts ({hypothesis.artefact_count} strings/exports/metadata, "
            f"artefact link {hypothesis.artefact_link:.2f})"
        )
    return " and ".join(parts) + f", link score {hypothesis.link_score:.2f}"


def _best_family_of(hypotheses: Sequence[Hypothesis], actor: str | None) -> str | None:
    for hypothesis in hypotheses:
        if hypothesis.family is not None and hypothesis.actor == actor:
            return hypothesis.family
    return None


# ICD-203 expressions of likelihood with their probability ranges (upper bounds).
_LIKELIHOOD_WORDS: Final = (
    (0.05, "almost no chance"),
    (0.20, "very unlikely"),
    (0.45, "unlikely"),
    (0.55, "roughly even chance"),
    (0.80, "likely"),
    (0.95, "very likely"),
    (1.01, "almost certain"),
)


def likelihood_words(score: float) -> str:
    """The ICD-203 phrase for a score read as a probability (scores are not yet calibrated)."""
    for upper, words in _LIKELIHOOD_WORDS:
        if score < upper:
            return words
    return _LIKELIHOOD_WORDS[-1][1]
