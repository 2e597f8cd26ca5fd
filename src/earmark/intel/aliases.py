"""One name per actor: "Hidden Cobra", "ZINC" and "Lazarus group" are all "Lazarus Group".

Names come from two catalogues that ship offline inside ``pymispgalaxies``: the MITRE ATT&CK
intrusion sets (``mitre-intrusion-set`` cluster) and the MISP ``threat-actor`` galaxy (864
clusters with synonyms). An ATT&CK bundle imported later can add or refresh ATT&CK groups.

The canonical name is the ATT&CK group name when one is known, else the MISP cluster value.
Claims on a name are ranked, so the finer-grained ATT&CK catalogue decides group boundaries:

    1. ATT&CK group name        ("Andariel")
    2. ATT&CK group alias       ("Bluenoroff" → APT38)
    3. MISP cluster value
    4. MISP cluster synonym     (MISP lists Andariel among Lazarus synonyms: outranked by 1)

Group boundaries are disputed, so the user picks a taxonomy. ``Taxonomy.SPLIT`` keeps every
ATT&CK group apart. ``Taxonomy.UMBRELLA`` folds sub-groups into their umbrella: the small table
``UMBRELLA_GROUPS`` below plus the galaxy's ``part-of`` relations (TA406 part-of Kimsuky).

The packaged JSON is read directly rather than through ``pymispgalaxies.Clusters()``: that loads
every galaxy (≈3 s measured); the two files we need load in ≈10 ms.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from earmark.errors import IntelError
from earmark.model.intel import ActorProfile

__all__ = ["UMBRELLA_GROUPS", "AliasResolver", "Taxonomy", "clean_name", "name_key"]


class Taxonomy(StrEnum):
    SPLIT = "split"  # every ATT&CK group stands alone (Andariel, APT38, Lazarus Group)
    UMBRELLA = "umbrella"  # sub-groups fold into their umbrella (all three → Lazarus Group)


# Umbrella → members, for groups the galaxy does not relate by "part-of". Kept small on purpose:
# only boundaries that vendors openly split while others report one umbrella (US government and
# many vendors report Andariel and APT38/Bluenoroff as "Lazarus"/"HIDDEN COBRA").
UMBRELLA_GROUPS: Mapping[str, tuple[str, ...]] = {
    "Lazarus Group": ("Andariel", "APT38"),
}

# Longest actor name in words that text matching looks for ("Operation Dust Storm Group" = 4).
_MAX_NAME_WORDS = 6

_RANK_ATTACK_NAME, _RANK_ATTACK_ALIAS, _RANK_MISP_VALUE, _RANK_MISP_SYNONYM = range(4)

_GENERIC_SUFFIX = re.compile(r"(?:group|team|gang|apt|actors?)$")
_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")
_WORD = re.compile(r"[\w][\w&.'-]*[\w]|\w")


def name_key(name: str) -> str:
    """Comparison key: case, spacing and punctuation ignored ("APT 28" and "apt-28" → "apt28")."""
    return _NOT_ALPHANUMERIC.sub("", name.casefold())


def clean_name(name: str) -> str:
    """Whitespace collapsed, enclosing quotes and trailing punctuation removed."""
    name = " ".join(name.split()).rstrip(".,;:")
    while len(name) >= 2 and name[0] == name[-1] and name[0] in "\"'`":
        name = name[1:-1].strip()
    return name.rstrip(".,;:")


def _galaxy_cluster(name: str) -> dict[str, Any]:
    # find_spec locates the package without importing it: importing pymispgalaxies pulls in its
    # schema validation and costs more than reading the file.
    spec = importlib.util.find_spec("pymispgalaxies")
    locations = list(spec.submodule_search_locations or ()) if spec else []
    if not locations:
        raise IntelError("the pymispgalaxies package is not installed (actor names need it)")
    path = Path(locations[0]) / "data" / "misp-galaxy" / "clusters" / name
    try:
        loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise IntelError(f"cannot read the MISP galaxy cluster {name}: {error}") from error
    return loaded


def _attack_groups_from_galaxy() -> list[ActorProfile]:
    """ATT&CK groups from the galaxy's copy; a revoked group's names become aliases of the group
    that replaced it (UNC2452 → APT29)."""
    entries = _galaxy_cluster("mitre-intrusion-set.json")["values"]
    replaced_by = {
        str(entry["uuid"]): str(relation["dest-uuid"])
        for entry in entries
        for relation in entry.get("related", ())
        if relation.get("type") == "revoked-by"
    }
    extra_aliases: dict[str, list[str]] = {}
    for entry in entries:
        if str(entry["uuid"]) in replaced_by:
            names = [str(entry["value"]).rsplit(" - G", 1)[0],
                     *entry.get("meta", {}).get("synonyms", ())]
            extra_aliases.setdefault(replaced_by[str(entry["uuid"])], []).extend(names)
    groups = []
    for entry in entries:
        if str(entry["uuid"]) in replaced_by:
            continue
        meta = entry.get("meta", {})
        external_ids = [str(meta["external_id"])] if meta.get("external_id") else []
        external_ids.append(f"intrusion-set--{entry['uuid']}")
        groups.append(ActorProfile(
            name=str(entry["value"]).rsplit(" - G", 1)[0],  # "Lazarus Group - G0032"
            aliases=tuple(str(s) for s in (*meta.get("synonyms", ()),
                                           *extra_aliases.get(str(entry["uuid"]), ()))),
            external_ids=tuple(external_ids),
            source="mitre-attack (misp-galaxy copy)",
        ))
    return groups


@dataclass
class _Claims:
    """Which canonical name each name key belongs to, with the rank of the claim."""

    canonical: dict[str, str] = field(default_factory=dict)
    rank: dict[str, int] = field(default_factory=dict)
    surface: dict[str, set[str]] = field(default_factory=dict)  # canonical → names seen

    def claim(self, name: str, canonical: str, rank: int) -> None:
        key = name_key(name)
        if not key:
            return
        if key not in self.rank or rank < self.rank[key]:
            self.canonical[key], self.rank[key] = canonical, rank
        if self.canonical[key] == canonical:
            self.surface.setdefault(canonical, set()).add(clean_name(name))


class AliasResolver:
    """Maps any known actor name to one canonical name under a taxonomy."""

    def __init__(self, claims: _Claims, umbrella_of: Mapping[str, str],
                 external_ids: Mapping[str, tuple[str, ...]], taxonomy: Taxonomy) -> None:
        self.taxonomy = taxonomy
        self._claims = claims
        self._umbrella_of = dict(umbrella_of) if taxonomy is Taxonomy.UMBRELLA else {}
        self._external_ids = external_ids
        self._single_word_names, self._multi_word_keys = self._mention_tables()

    @classmethod
    def build(cls, taxonomy: Taxonomy = Taxonomy.SPLIT,
              attack_groups: Sequence[ActorProfile] = ()) -> AliasResolver:
        """A resolver from the packaged catalogues; ``attack_groups`` (from
        ``earmark.intel.importers.attack``) replace the galaxy's copy of ATT&CK."""
        claims = _Claims()
        external_ids: dict[str, list[str]] = {}
        attack_by_stix_id: dict[str, str] = {}
        # A bundle's groups replace the galaxy's copy, which lags ATT&CK releases.
        for group in attack_groups or _attack_groups_from_galaxy():
            key = name_key(group.name)
            # The same group listed twice (bundle and galaxy copy) keeps the first spelling.
            same_group = claims.rank.get(key) == _RANK_ATTACK_NAME
            canonical = claims.canonical[key] if same_group else group.name
            claims.claim(group.name, canonical, _RANK_ATTACK_NAME)
            for alias in group.aliases:
                claims.claim(alias, canonical, _RANK_ATTACK_ALIAS)
            external_ids.setdefault(canonical, []).extend(group.external_ids)
            for external_id in group.external_ids:
                attack_by_stix_id[external_id] = canonical

        clusters = _galaxy_cluster("threat-actor.json")["values"]
        canonical_by_uuid: dict[str, str] = {}
        for cluster in clusters:
            canonical = _cluster_canonical(cluster, claims)
            canonical_by_uuid[str(cluster["uuid"])] = canonical
            claims.claim(str(cluster["value"]), canonical, _RANK_MISP_VALUE)
            for synonym in cluster.get("meta", {}).get("synonyms", ()):
                claims.claim(str(synonym), canonical, _RANK_MISP_SYNONYM)
            external_ids.setdefault(canonical, []).append(str(cluster["uuid"]))

        umbrella_of = _umbrella_table(clusters, canonical_by_uuid, claims)
        return cls(claims, umbrella_of,
                   {name: tuple(dict.fromkeys(ids)) for name, ids in external_ids.items()},
                   taxonomy)

    @staticmethod
    @lru_cache(maxsize=4)
    def default(taxonomy: Taxonomy = Taxonomy.SPLIT) -> AliasResolver:
        """The resolver over the packaged catalogues, built once per taxonomy."""
        return AliasResolver.build(taxonomy)

    def resolve(self, name: str) -> str:
        """Canonical name; an unknown name comes back cleaned (whitespace, quotes)."""
        key = name_key(name)
        canonical = self._claims.canonical.get(key)
        if canonical is None:
            # "Turla Group", "Lazarus Gang": catalogues differ on a generic trailing word.
            stem = _GENERIC_SUFFIX.sub("", key)
            canonical = self._claims.canonical.get(stem) if stem else None
        if canonical is None:
            return clean_name(name)
        for _ in range(len(self._umbrella_of) + 1):  # bounded walk up nested umbrellas
            parent = self._umbrella_of.get(canonical)
            if parent is None or parent == canonical:
                break
            canonical = parent
        return canonical

    def is_known(self, name: str) -> bool:
        return name_key(name) in self._claims.canonical

    def aliases_of(self, canonical: str) -> tuple[str, ...]:
        """Every known name that resolves to ``canonical`` in this taxonomy, sorted."""
        names = {
            surface
            for split_name, surfaces in self._claims.surface.items()
            if self.resolve(split_name) == canonical
            for surface in (*surfaces, split_name)
        }
        return tuple(sorted(names - {canonical}, key=str.casefold))

    def profiles(self) -> tuple[ActorProfile, ...]:
        """One profile per canonical actor in this taxonomy."""
        members: dict[str, set[str]] = {}
        for split_name in self._claims.surface:
            members.setdefault(self.resolve(split_name), set()).add(split_name)
        profiles = []
        for canonical, split_names in sorted(members.items()):
            names = {s for n in split_names for s in (*self._claims.surface[n], n)}
            ids = [i for n in sorted(split_names) for i in self._external_ids.get(n, ())]
            profiles.append(ActorProfile(
                name=canonical,
                aliases=tuple(sorted(names - {canonical}, key=str.casefold)),
                external_ids=tuple(dict.fromkeys(ids)),
                source="misp-galaxy+mitre-attack",
            ))
        return tuple(profiles)

    def find_mentions(self, text: str) -> tuple[str, ...]:
        """Canonical names of actors named in ``text``, in order of first mention.

        Multi-word names and names with digits ("Hidden Cobra", "APT 28", "APT28") match
        whatever their case or spacing; single plain words must match a known spelling exactly,
        so "zinc" in prose is not ZINC and "turla" in a URL path is not Turla.
        """
        words = [(m.start(), m.end(), m.group(0)) for m in _WORD.finditer(text)]
        found: dict[str, None] = {}
        index = 0
        while index < len(words):
            matched_words = 0
            for count in range(min(_MAX_NAME_WORDS, len(words) - index), 0, -1):
                phrase = text[words[index][0] : words[index + count - 1][1]]
                loose = count > 1 or any(c.isdigit() for c in phrase)
                if (loose and name_key(phrase) in self._multi_word_keys) or (
                        count == 1 and phrase in self._single_word_names):
                    found.setdefault(self.resolve(phrase))
                else:
                    continue
                matched_words = count
                break
            index += max(matched_words, 1)
        return tuple(found)

    def _mention_tables(self) -> tuple[frozenset[str], frozenset[str]]:
        single: set[str] = set()
        multi: set[str] = set()
        for canonical, surfaces in self._claims.surface.items():
            for surface in (*surfaces, canonical):
                if self._claims.canonical.get(name_key(surface)) != canonical:
                    continue
                if len(surface.split()) > 1 or any(c.isdigit() for c in surface):
                    if len(name_key(surface)) >= 4:  # "G 1" style keys match noise
                        multi.add(name_key(surface))
                elif len(surface) >= 4:  # short plain words ("Pat", "Ke3") are prose
                    single.add(surface)
        return frozenset(single), frozenset(multi)


def _cluster_canonical(cluster: Mapping[str, Any], claims: _Claims) -> str:
    """ATT&CK name for a MISP cluster when its value, or exactly one ATT&CK group among its
    synonyms, identifies one; else the cluster's own value."""
    value = str(cluster["value"])
    key = name_key(value)
    if claims.rank.get(key, 99) <= _RANK_ATTACK_ALIAS:
        return claims.canonical[key]
    attack_matches = {
        claims.canonical[k]
        for k in (name_key(str(s)) for s in cluster.get("meta", {}).get("synonyms", ()))
        if claims.rank.get(k, 99) <= _RANK_ATTACK_ALIAS
    }
    return attack_matches.pop() if len(attack_matches) == 1 else value


def _umbrella_table(clusters: Iterable[Mapping[str, Any]], canonical_by_uuid: Mapping[str, str],
                    claims: _Claims) -> dict[str, str]:
    umbrella_of: dict[str, str] = {}
    for umbrella, members in UMBRELLA_GROUPS.items():
        umbrella_canonical = claims.canonical.get(name_key(umbrella), umbrella)
        for member in members:
            member_canonical = claims.canonical.get(name_key(member))
            if member_canonical and member_canonical != umbrella_canonical:
                umbrella_of[member_canonical] = umbrella_canonical
    for cluster in clusters:
        child = canonical_by_uuid[str(cluster["uuid"])]
        for relation in cluster.get("related", ()):
            parent = canonical_by_uuid.get(str(relation.get("dest-uuid")))
            if relation.get("type") == "part-of" and parent and parent != child:
                umbrella_of.setdefault(child, parent)
    return umbrella_of
