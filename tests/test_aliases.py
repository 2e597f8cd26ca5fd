"""Actor names: one canonical name per actor, under a split or umbrella taxonomy."""

from __future__ import annotations

import json
import time

import pytest

from earmark.intel.aliases import AliasResolver, Taxonomy, clean_name, name_key
from earmark.intel.importers.attack import attack_groups
from shared_data import INTEL_DIR

ATTACK_BUNDLE = INTEL_DIR / "mitre_cti" / "enterprise-attack-compact.json"


@pytest.fixture(scope="module")
def split() -> AliasResolver:
    return AliasResolver.default(Taxonomy.SPLIT)


@pytest.fixture(scope="module")
def umbrella() -> AliasResolver:
    return AliasResolver.default(Taxonomy.UMBRELLA)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("Hidden Cobra", "Lazarus Group"), ("HIDDEN COBRA", "Lazarus Group"),
        ("lazarus group", "Lazarus Group"), ("ZINC", "Lazarus Group"),
        ("APT 28", "APT28"), ("apt-28", "APT28"), ("Fancy Bear", "APT28"), ("Sednit", "APT28"),
        ("Sofacy", "APT28"), ("Cozy Bear", "APT29"), ("UNC2452", "APT29"),  # revoked → APT29
        ("OceanLotus", "APT32"), ("ScarCruft", "APT37"), ("Turla Group", "Turla"),
        ("El Machete", "Machete"),
    ],
)
def test_resolves_aliases(split: AliasResolver, name: str, canonical: str) -> None:
    assert split.resolve(name) == canonical


def test_split_keeps_sub_groups_apart(split: AliasResolver) -> None:
    assert split.resolve("Andariel") == "Andariel"
    assert split.resolve("APT38") == "APT38"
    assert split.resolve("Bluenoroff") == "APT38"  # an ATT&CK alias of APT38
    assert split.resolve("TA406") == "TA406"


def test_umbrella_folds_sub_groups(umbrella: AliasResolver) -> None:
    for name in ("Andariel", "APT38", "Bluenoroff", "Stardust Chollima", "Hidden Cobra"):
        assert umbrella.resolve(name) == "Lazarus Group"
    assert umbrella.resolve("TA406") == "Kimsuky"  # galaxy "part-of" relation
    assert umbrella.resolve("APT28") == "APT28"


def test_unknown_names_pass_through_cleaned(split: AliasResolver) -> None:
    assert split.resolve('  "Crimson   Walrus" ') == "Crimson Walrus"
    assert not split.is_known("Crimson Walrus")
    assert clean_name("'x'.") == "x"
    assert name_key("APT 28") == name_key("apt-28") == "apt28"


def test_profiles_and_aliases(split: AliasResolver, umbrella: AliasResolver) -> None:
    lazarus = split.aliases_of("Lazarus Group")
    assert "HIDDEN COBRA" in lazarus and "Andariel" not in lazarus
    assert "Andariel" in umbrella.aliases_of("Lazarus Group")
    profile = next(p for p in split.profiles() if p.name == "Lazarus Group")
    assert "G0032" in profile.external_ids
    assert len(umbrella.profiles()) < len(split.profiles())


def test_mentions_in_text(split: AliasResolver) -> None:
    text = ("The HIDDEN cobra actors, also known as Lazarus group, reused code seen with "
            "APT 28. Zinc oxide is not an actor; ZINC is.")
    assert split.find_mentions(text) == ("Lazarus Group", "APT28")
    assert split.find_mentions("nothing relevant here, just turla in lower case") == ()


def test_attack_bundle_groups_replace_galaxy_copy() -> None:
    groups = attack_groups(json.loads(ATTACK_BUNDLE.read_text()))
    resolver = AliasResolver.build(Taxonomy.SPLIT, attack_groups=groups)
    assert resolver.resolve("Midnight Blizzard") == "APT29"
    assert resolver.resolve("Diamond Sleet") == "Lazarus Group"


def test_construction_is_fast() -> None:
    started = time.perf_counter()
    AliasResolver.build(Taxonomy.UMBRELLA)
    assert time.perf_counter() - started < 1.0
