"""The demo corpus builds, and its binaries carry exactly the code the attribution truth says.

Truth is read from the unstripped builds' symbol tables (LIEF), independently of the builder's
own ``nm`` listing, and checked against the design of docs/demo-corpus.md.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import lief
import pytest

from earmark.demo_build import (
    ALPHA_SHARED_ROUTINES,
    DEMO_PROGRAMS,
    DemoBinary,
    DemoBuildError,
    DemoCorpus,
    build_demo_corpus,
)
from earmark.errors import EarmarkError

OPTS = ("O0", "O2", "Os")
TARGET_COMPILERS = {"elf64": "gcc", "pe64": "x86_64-w64-mingw32-gcc"}
ZLIB_ENTRY_POINTS = {"deflate", "inflate", "compress", "uncompress", "crc32", "adler32"}
# Every program has a main; it is not family code that could link two programs.
ENTRY = {"main"}


@pytest.fixture(scope="session", params=sorted(TARGET_COMPILERS))
def corpus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DemoCorpus:
    target = request.param
    if shutil.which(TARGET_COMPILERS[target]) is None:
        pytest.skip(f"{TARGET_COMPILERS[target]} not installed")
    return build_demo_corpus(tmp_path_factory.mktemp(f"demo-{target}"), "gcc", OPTS, target)


def function_symbols(path: Path) -> set[str]:
    """Names of the functions a linked binary's symbol table defines."""
    binary = lief.parse(str(path))
    if isinstance(binary, lief.ELF.Binary):
        return {
            symbol.name
            for symbol in binary.symbols
            if symbol.type == lief.ELF.Symbol.TYPE.FUNC and symbol.value != 0
        }
    assert isinstance(binary, lief.PE.Binary)
    return {
        symbol.name
        for symbol in binary.symbols
        if symbol.complex_type == lief.COFF.Symbol.COMPLEX_TYPE.FUNCTION
    }


def own_names(binary: DemoBinary) -> set[str]:
    return set(binary.own_functions) - ENTRY


def family_names(corpus: DemoCorpus, family: str, opt: str) -> set[str]:
    return set().union(*(own_names(b) for b in corpus.select(family=family, opt=opt)))


def test_every_program_is_built_at_every_level(corpus: DemoCorpus) -> None:
    assert len(corpus.binaries) == len(DEMO_PROGRAMS) * len(OPTS)
    for binary in corpus.binaries:
        assert binary.path.stat().st_size > 0
        assert binary.unstripped_path.stat().st_size > binary.path.stat().st_size
    assert {b.role for b in corpus.binaries} == {"kb", "query", "goodware", "negative"}
    assert {b.actor for b in corpus.select(family="alpha")} == {"Group A"}
    assert {b.actor for b in corpus.select(family="bravo")} == {"Group B"}
    assert corpus.binary("charlie", "O2").actor is None


def test_builder_truth_agrees_with_the_symbol_table(corpus: DemoCorpus) -> None:
    for binary in corpus.binaries:
        symbols = function_symbols(binary.unstripped_path)
        missing = set(binary.own_functions) - symbols
        assert not missing, f"{binary.name} -{binary.opt}: {sorted(missing)}"


@pytest.mark.parametrize("opt", OPTS)
def test_alpha_versions_share_most_rare_routines(corpus: DemoCorpus, opt: str) -> None:
    versions = [
        function_symbols(corpus.binary(f"alpha-v{v}", opt).unstripped_path) for v in (1, 2, 3)
    ]
    alpha_code = [names & family_names(corpus, "alpha", opt) for names in versions]
    for older, newer in itertools.pairwise(alpha_code):
        jaccard = len(older & newer) / len(older | newer)
        assert jaccard >= 0.8, (opt, sorted(older ^ newer))
    assert set(ALPHA_SHARED_ROUTINES) <= alpha_code[0] & alpha_code[1] & alpha_code[2]
    # The evolution the documentation promises: one routine removed, two added.
    assert "alpha_legacy_xor_encode" in alpha_code[0] - alpha_code[1]
    assert "alpha_base64_decode" in alpha_code[1] - alpha_code[0]
    assert "alpha_jitter_schedule" in alpha_code[2] - alpha_code[1]


@pytest.mark.parametrize("opt", OPTS)
def test_charlie_holds_exactly_the_intended_alpha_routines(corpus: DemoCorpus, opt: str) -> None:
    charlie = corpus.binary("charlie", opt)
    symbols = function_symbols(charlie.unstripped_path)
    assert symbols & family_names(corpus, "alpha", opt) == set(ALPHA_SHARED_ROUTINES)
    assert set(corpus.charlie_shared_functions) == set(ALPHA_SHARED_ROUTINES)
    assert not symbols & family_names(corpus, "bravo", opt)
    charlie_own = own_names(charlie) - set(ALPHA_SHARED_ROUTINES)
    assert len(charlie_own) >= 15
    assert charlie_own <= symbols
    assert set(charlie.library_functions) <= symbols
    assert charlie.shares_code_with == ("alpha",)


@pytest.mark.parametrize("opt", OPTS)
def test_delta_and_zpack_hold_zlib_but_no_family_code(corpus: DemoCorpus, opt: str) -> None:
    family_code = family_names(corpus, "alpha", opt) | family_names(corpus, "bravo", opt)
    for name in ("delta", "zpack"):
        binary = corpus.binary(name, opt)
        symbols = function_symbols(binary.unstripped_path)
        assert not symbols & family_code
        assert set(binary.library_functions) <= symbols


def test_bravo_and_alpha_share_only_library_code(corpus: DemoCorpus) -> None:
    alpha_binary = corpus.binary("alpha-v2", "O2")
    bravo_binary = corpus.binary("bravo-v1", "O2")
    common = function_symbols(alpha_binary.unstripped_path) & function_symbols(
        bravo_binary.unstripped_path
    )
    # Everything they have in common is zlib or the C runtime (neither program's own source),
    # apart from main.
    assert common & (set(alpha_binary.own_functions) | set(bravo_binary.own_functions)) <= ENTRY
    assert common >= set(alpha_binary.library_functions)


def test_every_program_links_zlib_deflate_and_inflate(corpus: DemoCorpus) -> None:
    for binary in corpus.binaries:
        symbols = function_symbols(binary.unstripped_path)
        assert symbols >= ZLIB_ENTRY_POINTS, binary.name
        assert set(binary.library_functions) >= ZLIB_ENTRY_POINTS


def test_stripped_binaries_carry_no_function_names(corpus: DemoCorpus) -> None:
    for binary in corpus.select(opt="O2"):
        assert not function_symbols(binary.path) & set(binary.own_functions)


def test_own_sources_compile_without_warnings(corpus: DemoCorpus) -> None:
    compiled = [c for c in corpus.commands if "-c" in c.argv]
    assert compiled
    for command in compiled:
        if "-Wall" in command.argv:
            assert command.diagnostics == "", command.argv


def test_native_programs_pass_their_self_test_identically_at_every_level(
    corpus: DemoCorpus,
) -> None:
    if corpus.target != "elf64":
        pytest.skip("only the host's own format can run here")
    # These are our own benign demo programs, compiled in this session, not samples.
    for program in DEMO_PROGRAMS:
        outputs = set()
        for opt in OPTS:
            result = subprocess.run(
                [str(corpus.binary(program.name, opt).path)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert result.returncode == 0, result.stdout
            assert "selftest ok" in result.stdout
            outputs.add(result.stdout)
        assert len(outputs) == 1, (program.name, outputs)


def test_second_build_reuses_fresh_outputs_and_redoes_stale_ones(corpus: DemoCorpus) -> None:
    again = build_demo_corpus(corpus.out_dir, "gcc", ("O2",), corpus.target)
    assert again.commands
    assert all(command.cached for command in again.commands)

    stale = again.binary("delta", "O2").unstripped_path
    os.utime(stale, (0, 0))
    rebuilt = build_demo_corpus(corpus.out_dir, "gcc", ("O2",), corpus.target)
    redone = [command.output for command in rebuilt.commands if not command.cached]
    assert redone == [stale]
    assert stale.stat().st_mtime > 0
    for command in rebuilt.commands:
        assert isinstance(command.argv, tuple)
        assert command.argv[-2:] == ("-o", str(command.output))


def test_missing_compiler_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(DemoBuildError, match="no C compiler found") as caught:
        build_demo_corpus(tmp_path, compiler="earmark-no-such-cc")
    assert isinstance(caught.value, EarmarkError)
    assert caught.value.exit_code == 50
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opt_levels": ("O9",)}, "optimisation level"),
        ({"target": "macho64"}, "unknown target"),
        ({"compiler": "clang", "target": "pe64"}, "mingw-w64"),
    ],
)
def test_bad_options_are_typed_errors(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(DemoBuildError, match=message):
        build_demo_corpus(tmp_path, **kwargs)  # type: ignore[arg-type]
