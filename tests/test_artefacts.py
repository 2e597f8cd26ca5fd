"""The artefact pillar on PE files compiled in the test session (mingw-w64).

Families (tests/fixtures/src/artefacts/): kestrel v1 and a v2 whose every routine is rewritten
but which keeps kestrel's strings, mutex name and export name; osprey and merlin with code and
strings of their own; harrier, which links the small libcrc library statically. kestrel, osprey
and merlin import libcrc.dll; only kestrel loads kestrel_plugin.dll. Every family prints the same
usage string.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from earmark.attribution import KnowledgeBase, attribute_sample, open_knowledge_base
from earmark.correlate.artefacts import escape_value, find_artefact_evidence
from earmark.errors import IndexCacheError
from earmark.extract import analyze_file
from earmark.index.artefact_cache import load_artefact_stats
from earmark.index.artefacts import (
    _NOT_WORD_CHARACTER,
    _WORD_CHARACTERS,
    is_distinctive_string,
    sample_artefacts,
)
from earmark.ingest import LabelTemplate, ingest_paths
from earmark.model.sample import Export, StringRef
from earmark.reason.hypotheses import MAX_ARTEFACT_SCORE, SHARED_LIBRARY_CAP
from earmark.report.document import CaseReport
from earmark.report.text import render_case_text
from kb_factories import make_features

SOURCES = Path(__file__).parent / "fixtures" / "src" / "artefacts"
COMPILER = "x86_64-w64-mingw32-gcc"
STRIP = "x86_64-w64-mingw32-strip"
FAMILIES = {"kestrel_v1": "kestrel", "osprey": "osprey", "merlin": "merlin", "harrier": "harrier"}


@dataclass(frozen=True)
class Builds:
    directory: Path

    def path(self, name: str) -> Path:
        return self.directory / name


def _compile(out: Path, *arguments: str) -> None:
    command = [COMPILER, "-O2", "-g0", f"-I{SOURCES}", "-o", str(out), *arguments]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    subprocess.run([STRIP, "--strip-all", str(out)], check=True, timeout=60)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    if shutil.which(COMPILER) is None:
        pytest.skip(f"toolchain {COMPILER} not installed")
    directory = tmp_path_factory.mktemp("artefact-builds")
    dll = ("-shared", "-DBUILD_DLL")
    _compile(directory / "libcrc.dll", *dll, str(SOURCES / "libcrc.c"))
    _compile(directory / "kestrel_plugin.dll", *dll, str(SOURCES / "kestrel_plugin.c"))
    # The plugin once more at -O1 (appended last, it wins): a new build of a private component.
    _compile(
        directory / "kestrel_plugin_o1.dll", *dll, str(SOURCES / "kestrel_plugin.c"), "-O1"
    )
    libraries = [str(directory / "libcrc.dll")]
    _compile(
        directory / "kestrel_v1.exe",
        str(SOURCES / "kestrel_v1.c"),
        *libraries,
        str(directory / "kestrel_plugin.dll"),
    )
    for name in ("kestrel_v2", "osprey", "merlin"):
        _compile(directory / f"{name}.exe", str(SOURCES / f"{name}.c"), *libraries)
    _compile(directory / "harrier.exe", str(SOURCES / "harrier.c"), str(SOURCES / "libcrc.c"))
    return Builds(directory)


@pytest.fixture(scope="module")
def kb(builds: Builds, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnowledgeBase]:
    database = tmp_path_factory.mktemp("artefact-kb") / "kb.db"
    with open_knowledge_base(str(database)) as opened:
        for name, family in FAMILIES.items():
            template = LabelTemplate(actor=f"{family} group", family=family, source="test")
            ingest_paths(opened.store, [builds.path(f"{name}.exe")], template)
        template = LabelTemplate(actor="kestrel group", family="kestrel", source="test")
        ingest_paths(opened.store, [builds.path("kestrel_plugin.dll")], template)
        opened.prepare()
        yield opened


def _family_scores(case: CaseReport) -> dict[str, float]:
    return {h.family: h.score for h in case.hypotheses if h.family is not None}


def test_string_filter_keeps_words_and_drops_byte_runs() -> None:
    assert is_distinctive_string("Global\\kestrel-relay-7f3a91")
    assert is_distinctive_string("cannot switch to a garbage collected greenlet")
    assert not is_distinctive_string("n:2C[")  # too short
    assert not is_distinctive_string("A4x{%`;]")  # printable bytes, not text
    assert not is_distinctive_string("12345678")  # no word


def test_word_character_pattern_is_isalnum_or_the_listed_characters() -> None:
    """The one-regex count of ``is_distinctive_string`` agrees with the per-character rule
    on every code point, lone surrogates included."""
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    regex_word = [m.start() for m in re.finditer(r"[\w .\-:%/\\,]", every)]
    rule_word = [i for i, ch in enumerate(every) if ch.isalnum() or ch in _WORD_CHARACTERS]
    assert regex_word == rule_word
    not_word = _NOT_WORD_CHARACTER.findall(every)
    assert len(not_word) == len(every) - len(rule_word)
    assert "\ud800" in not_word and "," not in not_word


@given(st.text(st.characters(blacklist_categories=()), max_size=40))
def test_string_filter_matches_the_per_character_rule(text: str) -> None:
    good = sum(1 for ch in text if ch.isalnum() or ch in _WORD_CHARACTERS)
    expected = (
        len(text) >= 6 and good >= 0.8 * len(text) and re.search("[A-Za-z]{3}", text) is not None
    )
    assert is_distinctive_string(text) == expected


def test_rewritten_version_keeping_strings_and_exports_ranks_its_family_first(
    kb: KnowledgeBase, builds: Builds
) -> None:
    query = analyze_file(builds.path("kestrel_v2.exe"))
    case = attribute_sample(kb, query, top=10)
    best = next(h for h in case.hypotheses if h.family is not None)
    assert best.family == "kestrel"
    assert best.artefact_count >= 3
    assert 0.3 <= best.score <= MAX_ARTEFACT_SCORE + 1e-9
    # No code in common: the link is a lead, stated as such, never authorship.
    assert best.relation == "shares-artefacts"
    assert case.verdict.actor is None
    assert "kestrel group by rare artefacts" in case.verdict.summary
    kestrel_items = [e for e in case.evidence if e.kind == "artefact" and e.family == "kestrel"]
    values = {(e.pivot, e.value) for e in kestrel_items}
    assert ("export", "KestrelRelayInterval") in values
    assert ("string", "Global\\kestrel-relay-7f3a91") in values
    for item in kestrel_items:
        assert item.match_sha256 is not None and item.weight > 0 and item.reason
        if item.pivot == "string":
            assert item.query_offset is not None
    # Code evidence alone does not find kestrel: the rewrite shares no routine with v1.
    code_only = attribute_sample(kb, query, top=10, artefacts=False)
    assert _family_scores(code_only).get("kestrel", 0.0) < best.score


def test_string_every_family_prints_weighs_nothing(kb: KnowledgeBase, builds: Builds) -> None:
    query = analyze_file(builds.path("kestrel_v2.exe"))
    usage = next(a for a in sample_artefacts(query) if a.value.startswith("usage: %s"))
    match = kb.artefact_stats().lookup([usage.key])[usage.key]
    assert match.owner_count == len(FAMILIES)
    assert match.weight == pytest.approx(0.0)
    found = find_artefact_evidence(kb.artefact_stats(), kb.samples(), query)
    assert not any((e.value or "").startswith("usage: %s") for e in found.evidence)


def test_shared_library_many_families_import_is_not_attributed(
    kb: KnowledgeBase, builds: Builds
) -> None:
    query = analyze_file(builds.path("libcrc.dll"))
    # Without the rule, harrier's static copy of libcrc makes it look like harrier's code.
    unguarded = attribute_sample(kb, query, top=10, artefacts=False)
    assert _family_scores(unguarded).get("harrier", 0.0) > SHARED_LIBRARY_CAP
    case = attribute_sample(kb, query, top=10)
    shared = [e for e in case.evidence if e.pivot == "shared-library"]
    assert len(shared) == 1 and shared[0].value == "libcrc.dll"
    assert "3 groups" in shared[0].reason
    assert case.evidence[0] == shared[0]  # leads the case: it explains every capped score
    assert case.hypotheses and all(h.score <= SHARED_LIBRARY_CAP for h in case.hypotheses)
    assert all(h.relation == "shared-library" for h in case.hypotheses)
    assert case.verdict.actor is None
    assert "shared library used by 3 groups" in case.verdict.summary
    assert "shared-library" in render_case_text(case)


def test_private_dll_loaded_by_one_family_is_unaffected(
    kb: KnowledgeBase, builds: Builds
) -> None:
    case = attribute_sample(kb, analyze_file(builds.path("kestrel_plugin_o1.dll")), top=10)
    assert not any(e.pivot == "shared-library" for e in case.evidence)
    assert case.hypotheses[0].actor == "kestrel group"
    assert case.hypotheses[0].relation != "shared-library"


def test_statistics_cached_beside_the_kb_by_revision(kb: KnowledgeBase) -> None:
    assert kb.index_path is not None
    cache = kb.index_path.with_suffix(".artefacts")
    revision = kb.store.revision()
    loaded = load_artefact_stats(cache, revision)
    built = kb.artefact_stats()
    assert loaded.keys.tolist() == built.keys.tolist()
    assert loaded.weight.tolist() == built.weight.tolist()
    assert loaded.libraries == built.libraries
    with pytest.raises(IndexCacheError):
        load_artefact_stats(cache, revision + 1)


def test_damaged_cache_is_refused(kb: KnowledgeBase, tmp_path: Path) -> None:
    assert kb.index_path is not None
    copy = tmp_path / "copy.artefacts"
    shutil.copytree(kb.index_path.with_suffix(".artefacts"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["owner_names"] = []
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexCacheError):
        load_artefact_stats(copy, kb.store.revision())
    (copy / "weight.npy").write_bytes(b"not numpy")
    with pytest.raises(IndexCacheError):
        load_artefact_stats(copy, kb.store.revision())


def test_sample_text_is_escaped() -> None:
    assert escape_value("evil\x1b[2Jname\x00") == "evil\\x1b[2Jname\\x00"
    assert escape_value("x" * 500).endswith("…")


def test_artefact_evidence_exports_to_valid_stix_and_misp() -> None:
    stix2validator = pytest.importorskip("stix2validator")
    from pymisp import MISPEvent

    from earmark.correlate.infrastructure import ActorScore
    from earmark.model.evidence import Evidence
    from earmark.report.misp_export import misp_event_for_case, render_misp
    from earmark.report.stix_export import render_stix

    def item(pivot: str, value: str) -> Evidence:
        return Evidence(kind="artefact", actor="kestrel group", family="kestrel", similarity=1.0,
                        weight=1.0, reason="unique to one group", match_sha256="c" * 64,
                        pivot=pivot, value=value, matched_value=value)

    evidence = [item("pdb", "C:/work/kestrel/Release/relay.pdb"),
                item("imphash", "a" * 32), item("string", "Global\\kestrel-relay-7f3a91"),
                item("string", "kestrel: relay %s refused handshake (stage %d)")]
    hypotheses = [ActorScore(actor="kestrel group", score=0.5, evidence_count=4)]
    text = render_stix(evidence=evidence, hypotheses=hypotheses)
    result = stix2validator.validate_string(text)
    assert result.is_valid, [str(e) for e in result.errors]
    notes = [o for o in json.loads(text)["objects"] if o["type"] == "note"]
    assert len(notes) == 4  # one per artefact, though their reasons are equal
    assert any("Global\\\\kestrel-relay-7f3a91" in n["content"] for n in notes)
    event = misp_event_for_case("case", evidence, hypotheses)
    assert event is not None
    loaded = MISPEvent()
    loaded.load(render_misp(event))
    assert {(a.type, a.value) for a in loaded.attributes} == {
        ("pdb", "C:/work/kestrel/Release/relay.pdb"), ("imphash", "a" * 32)
    }


@given(
    st.lists(st.text(max_size=80), max_size=30),
    st.lists(st.text(max_size=40), max_size=10),
    st.lists(st.tuples(st.text(max_size=20), st.text(max_size=60)), max_size=8),
)
def test_any_sample_text_gives_artefacts_and_printable_evidence(
    strings: list[str], exports: list[str], version_info: list[tuple[str, str]]
) -> None:
    base = make_features("artefact-property")
    assert base.pe is not None
    features = replace(
        base,
        strings=tuple(StringRef(i * 16, "ascii", s) for i, s in enumerate(strings)),
        exports=tuple(Export(name, 0x1000 + i, i) for i, name in enumerate(exports)),
        pe=replace(base.pe, version_info=tuple(version_info)),
    )
    artefacts = sample_artefacts(features)
    assert len({a.key for a in artefacts}) == len(artefacts)
    assert all(0 <= a.key < 2**64 for a in artefacts)
    # A build's memo of string keys, filled by another sample first, changes nothing.
    known: dict[str, int] = {}
    sample_artefacts(replace(features, strings=features.strings[::-1], sections=()), known)
    assert sample_artefacts(features, known) == artefacts
    for artefact in artefacts:
        shown = escape_value(artefact.value)
        assert all(ch.isprintable() for ch in shown)
