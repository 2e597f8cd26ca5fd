"""Compile the demo corpus: small benign C programs whose attribution truth is known.

The sources ship as package data in ``earmark/demo_sources`` (see docs/demo-corpus.md):

    alpha v1..v3  family "alpha", actor "Group A"   rare code evolving across versions
    bravo v1..v2  family "bravo", actor "Group B"   different rare code
    charlie       unknown actor                      own code + exactly four alpha routines
    delta         unknown actor                      negative control: own code + zlib only
    zpack         goodware                           a gzip-like tool: zlib + C runtime only

Every program statically links the same vendored zlib 1.2.11, so an engine that does not
discount library code would wrongly tie them all together.

The build runs the C compiler through argument lists (never a shell), with timeouts, two jobs
at a time, and skips any output that is newer than everything it is made from. Functions each
compilation unit defines are read from its object file with ``nm``; they are the truth the tests
and the ``earmark demo`` command check against.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from earmark.errors import DemoBuildError

__all__ = [
    "ALPHA_SHARED_ROUTINES",
    "DEMO_PROGRAMS",
    "DEMO_SOURCES_DIR",
    "BuildCommand",
    "DemoBinary",
    "DemoBuildError",
    "DemoCorpus",
    "DemoProgram",
    "SourceUnit",
    "UnitFunctions",
    "build_demo_corpus",
]

Target = Literal["elf64", "elf32", "pe64", "pe32"]
Role = Literal["kb", "query", "goodware", "negative"]

# Package data next to this module; a plain path works for wheel and editable installs, which
# is all we support (a zipped install could not hand the files to a C compiler anyway).
DEMO_SOURCES_DIR = Path(__file__).parent / "demo_sources"
ZLIB_DIR_NAME = "zlib"

# Two jobs: the brief's laptop target has two cores, and compiling zlib's deflate.c and
# inflate.c dominates (about 1 s each at -O2), so more jobs would not shorten the build much.
BUILD_JOBS = 2
# One compilation takes at most ~2 s here; 120 s leaves room for a loaded CI machine while a
# hung compiler still ends the build with a clear error.
COMPILE_TIMEOUT_SECONDS = 120.0
# Linking ~20 small objects takes well under a second.
LINK_TIMEOUT_SECONDS = 60.0
# nm over one object file is instantaneous; the limit only guards against a hung tool.
NM_TIMEOUT_SECONDS = 30.0

OPT_LEVELS = ("O0", "O1", "O2", "O3", "Os")

# The zlib "core": everything compress/uncompress/crc32 and deflate/inflate need. The gz*
# file functions are left out on purpose (they are file I/O the demo programs never do).
ZLIB_SOURCES = (
    "adler32.c",
    "compress.c",
    "crc32.c",
    "deflate.c",
    "inffast.c",
    "inflate.c",
    "inftrees.c",
    "trees.c",
    "uncompr.c",
    "zutil.c",
)

# The four alpha routines that charlie reuses (all of alpha_core.c): the truth of the
# "WannaCry-like" case. Tests check that the built binaries agree with this list.
ALPHA_SHARED_ROUTINES = (
    "alpha_cipher_key_schedule",
    "alpha_cipher_encrypt_block",
    "alpha_hash_name",
    "alpha_deobfuscate_string",
)


@dataclass(frozen=True, slots=True)
class SourceUnit:
    """One C file compiled with some ``NAME=VALUE`` preprocessor definitions."""

    source: str  # path relative to DEMO_SOURCES_DIR
    defines: tuple[str, ...] = ()

    @property
    def is_library(self) -> bool:
        return self.source.startswith(ZLIB_DIR_NAME + "/")

    @property
    def object_stem(self) -> str:
        stem = Path(self.source).stem
        tags = [definition.replace("=", "_") for definition in self.defines]
        return "-".join([stem, *tags])


@dataclass(frozen=True, slots=True)
class DemoProgram:
    """Recipe of one demo program: what it is, and the units beyond zlib it is made of."""

    name: str  # file name stem, e.g. "alpha-v2"
    family: str
    actor: str | None  # None: no known actor (charlie, delta) or not attack code (zpack)
    version: str | None
    role: Role
    units: tuple[SourceUnit, ...]
    shares_code_with: tuple[str, ...] = ()  # families whose rare code this program reuses


def _versioned(family: str, actor: str, version: int, role: Role, *units: str) -> DemoProgram:
    """A family version: its first unit is compiled with ``-D<FAMILY>_VERSION=<version>``."""
    macro = f"{family.upper()}_VERSION={version}"
    sources = (SourceUnit(units[0], (macro,)), *(SourceUnit(unit) for unit in units[1:]))
    return DemoProgram(f"{family}-v{version}", family, actor, str(version), role, sources)


# The knowledge base learns from the older versions; the newest version of each family is the
# query whose answer is known. charlie is a query too; delta must come out as "no known actor".
DEMO_PROGRAMS: tuple[DemoProgram, ...] = (
    _versioned("alpha", "Group A", 1, "kb", "alpha.c", "alpha_core.c"),
    _versioned("alpha", "Group A", 2, "kb", "alpha.c", "alpha_core.c"),
    _versioned("alpha", "Group A", 3, "query", "alpha.c", "alpha_core.c"),
    _versioned("bravo", "Group B", 1, "kb", "bravo.c"),
    _versioned("bravo", "Group B", 2, "query", "bravo.c"),
    DemoProgram(
        "charlie",
        "charlie",
        None,
        None,
        "query",
        (SourceUnit("charlie.c"), SourceUnit("alpha_core.c")),
        shares_code_with=("alpha",),
    ),
    DemoProgram("delta", "delta", None, None, "negative", (SourceUnit("delta.c"),)),
    DemoProgram("zpack", "zlib", None, None, "goodware", (SourceUnit("zpack.c"),)),
)


@dataclass(frozen=True, slots=True)
class BuildCommand:
    """One compiler run (or one skipped because its output was fresh).

    ``argv`` names the final output; the build itself writes to a temporary name in the same
    folder and renames it, so an interrupted run never leaves a file that looks finished.
    """

    argv: tuple[str, ...]
    output: Path
    cached: bool
    diagnostics: str  # the compiler's stderr (warnings); empty when cached or clean


@dataclass(frozen=True, slots=True)
class UnitFunctions:
    """Functions one compilation unit defines, as C names (pe32's leading underscore removed)."""

    source: str
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DemoBinary:
    """One built program at one optimisation level, with its truth."""

    name: str
    family: str
    actor: str | None
    version: str | None
    opt: str
    role: Role
    target: Target
    path: Path  # the stripped file when the corpus was built with strip=True
    unstripped_path: Path
    unit_functions: tuple[UnitFunctions, ...]  # zlib units included
    shares_code_with: tuple[str, ...]

    @property
    def own_functions(self) -> tuple[str, ...]:
        """Functions from the program's own sources (rare code); not zlib, not the C runtime."""
        return self._functions(library=False)

    @property
    def library_functions(self) -> tuple[str, ...]:
        """Functions of the statically linked zlib."""
        return self._functions(library=True)

    def _functions(self, *, library: bool) -> tuple[str, ...]:
        return tuple(
            name
            for unit in self.unit_functions
            if SourceUnit(unit.source).is_library == library
            for name in unit.names
        )


@dataclass(frozen=True, slots=True)
class DemoCorpus:
    out_dir: Path
    compiler: str
    target: Target
    binaries: tuple[DemoBinary, ...]
    # Names of alpha's rare routines that charlie contains (truth for the shared-code case).
    charlie_shared_functions: tuple[str, ...]
    commands: tuple[BuildCommand, ...]

    def select(
        self, *, role: Role | None = None, family: str | None = None, opt: str | None = None
    ) -> tuple[DemoBinary, ...]:
        return tuple(
            binary
            for binary in self.binaries
            if (role is None or binary.role == role)
            and (family is None or binary.family == family)
            and (opt is None or binary.opt == opt)
        )

    def binary(self, name: str, opt: str) -> DemoBinary:
        for candidate in self.binaries:
            if candidate.name == name and candidate.opt == opt:
                return candidate
        raise KeyError(f"no demo binary {name!r} built at -{opt}")


@dataclass(frozen=True, slots=True)
class _Toolchain:
    compiler: tuple[str, ...]  # argv prefix
    nm: str
    exe_suffix: str
    symbol_prefix: str  # what the target's C ABI prepends to every symbol


def _resolve_toolchain(compiler: str, target: str) -> _Toolchain:
    if target not in get_args(Target):
        raise DemoBuildError(
            f"unknown target {target!r}; choose one of {', '.join(get_args(Target))}"
        )
    if target.startswith("elf"):
        prefix: tuple[str, ...] = (compiler,) if target == "elf64" else (compiler, "-m32")
        nm_candidates = ("nm", "llvm-nm")
        suffix, symbol_prefix = "", ""
    else:
        triplet = "x86_64-w64-mingw32" if target == "pe64" else "i686-w64-mingw32"
        if compiler == "gcc":
            compiler = f"{triplet}-gcc"
        elif "mingw32" not in compiler:
            raise DemoBuildError(
                f"target {target} is built with mingw-w64 gcc; pass compiler='gcc' "
                f"(not {compiler!r})"
            )
        prefix = (compiler,)
        nm_candidates = (f"{triplet}-nm", "llvm-nm")
        suffix, symbol_prefix = ".exe", "_" if target == "pe32" else ""
    if shutil.which(prefix[0]) is None:
        hint = "apt-get install gcc" if target.startswith("elf") else "apt-get install mingw-w64"
        raise DemoBuildError(
            f"no C compiler found: {prefix[0]!r} is not on PATH (for target {target}); "
            f"install one (Debian/Ubuntu: {hint}) to build the demo corpus"
        )
    nm = next((tool for tool in nm_candidates if shutil.which(tool) is not None), None)
    if nm is None:
        raise DemoBuildError(
            f"no symbol lister found ({' or '.join(nm_candidates)}); install binutils"
        )
    return _Toolchain(prefix, nm, suffix, symbol_prefix)


def _is_fresh(output: Path, inputs: Iterable[Path]) -> bool:
    """True when ``output`` exists and is newer than every input (make's rule)."""
    newest_input = max(path.stat().st_mtime for path in inputs)
    return output.exists() and output.stat().st_mtime >= newest_input


def _run_to(argv: list[str], output: Path, timeout: float) -> str:
    """Run a compiler writing to a temporary name, then move it into place.

    The rename makes a killed build leave no half-written file that would look fresh next time.
    Returns the tool's stderr (its warnings).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    full_argv = [*argv, "-o", str(partial)]
    try:
        completed = subprocess.run(
            full_argv, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as error:
        partial.unlink(missing_ok=True)
        raise DemoBuildError(
            f"{argv[0]} took over {timeout:.0f} s building {output.name}"
        ) from error
    except OSError as error:
        raise DemoBuildError(f"cannot run {argv[0]}: {error}") from error
    if completed.returncode != 0:
        partial.unlink(missing_ok=True)
        detail = completed.stderr.strip()[-2000:]
        raise DemoBuildError(f"building {output.name} failed ({argv[0]}):\n{detail}")
    partial.replace(output)
    return completed.stderr


@dataclass(frozen=True, slots=True)
class _Step:
    """A compile or link to run: argv without ``-o``, the output and what it depends on."""

    argv: tuple[str, ...]
    output: Path
    inputs: tuple[Path, ...]
    timeout: float


def _run_steps(steps: Sequence[_Step]) -> list[BuildCommand]:
    def run_one(step: _Step) -> BuildCommand:
        recorded = (*step.argv, "-o", str(step.output))
        if _is_fresh(step.output, step.inputs):
            return BuildCommand(recorded, step.output, cached=True, diagnostics="")
        diagnostics = _run_to(list(step.argv), step.output, step.timeout)
        return BuildCommand(recorded, step.output, cached=False, diagnostics=diagnostics)

    with ThreadPoolExecutor(max_workers=BUILD_JOBS) as pool:
        # list() re-raises the first DemoBuildError of any job here, in the caller's thread.
        return list(pool.map(run_one, steps))


def _defined_functions(toolchain: _Toolchain, object_file: Path) -> tuple[str, ...]:
    """Function symbols an object file defines, global and static, via ``nm -P``."""
    try:
        listing = subprocess.run(
            [toolchain.nm, "--defined-only", "-P", str(object_file)],
            capture_output=True,
            text=True,
            timeout=NM_TIMEOUT_SECONDS,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError) as error:
        raise DemoBuildError(f"cannot list the symbols of {object_file.name}: {error}") from error
    names: list[str] = []
    for line in listing.splitlines():
        fields = line.split()
        # POSIX format: name type [value size]; section symbols (".text") are not functions.
        if len(fields) < 2 or fields[1] not in ("T", "t") or fields[0].startswith("."):
            continue
        name = fields[0]
        if toolchain.symbol_prefix and name.startswith(toolchain.symbol_prefix):
            name = name[len(toolchain.symbol_prefix) :]
        names.append(name)
    return tuple(sorted(set(names)))


def _defined_in_source(names: Iterable[str], source: Path) -> tuple[str, ...]:
    """Keep the functions whose definition is written in ``source`` itself.

    An object also defines functions that headers inline into it (mingw-w64's stdio.h defines
    printf and snprintf as static inline functions, kept out of line at -O0); they are C
    runtime code, not the program's. Object files carry no source file per symbol without
    debug information, so this looks for a definition line starting in column 0, which is how
    both our sources and zlib's write them. Compiler clones (``name.constprop.0``) count as
    their base function.
    """
    text = source.read_text(encoding="utf-8", errors="replace")
    kept = []
    for name in names:
        base = name.split(".", 1)[0]
        pattern = rf"^[A-Za-z_][\w \t*]*\b{re.escape(base)}\s*\("
        if re.search(pattern, text, flags=re.MULTILINE):
            kept.append(name)
    return tuple(kept)


def _compile_argv(toolchain: _Toolchain, unit: SourceUnit, opt: str) -> tuple[str, ...]:
    source = DEMO_SOURCES_DIR / unit.source
    # Our own sources must stay warning-free (tests check the diagnostics); the vendored zlib
    # is compiled the way its own Makefile does, without extra warnings.
    warnings = () if unit.is_library else ("-Wall", "-Wextra")
    return (
        *toolchain.compiler,
        f"-{opt}",
        "-g0",
        *warnings,
        *(f"-D{definition}" for definition in unit.defines),
        "-I",
        str(DEMO_SOURCES_DIR / ZLIB_DIR_NAME),
        "-c",
        str(source),
    )


def _unit_inputs(unit: SourceUnit) -> tuple[Path, ...]:
    """The source plus every header it could include (zlib units see only zlib headers)."""
    zlib_headers = tuple(sorted((DEMO_SOURCES_DIR / ZLIB_DIR_NAME).glob("*.h")))
    own_headers = () if unit.is_library else tuple(sorted(DEMO_SOURCES_DIR.glob("*.h")))
    return (DEMO_SOURCES_DIR / unit.source, *zlib_headers, *own_headers)


def build_demo_corpus(
    out_dir: Path,
    compiler: str = "gcc",
    opt_levels: Sequence[str] = ("O2",),
    target: Target = "elf64",
    strip: bool = True,
) -> DemoCorpus:
    """Compile every demo program at each optimisation level into ``out_dir``.

    Layout: ``out_dir/obj/<config>/`` objects, ``out_dir/unstripped/<config>/<name>`` with symbols
    (the truth), ``out_dir/stripped/<config>/<name>`` without (the realistic query), where
    ``<config>`` is ``<compiler>-<target>-<opt>``. Outputs newer than their inputs are reused.
    Raises DemoBuildError when no compiler is found or a build step fails.
    """
    for opt in opt_levels:
        if opt not in OPT_LEVELS:
            raise DemoBuildError(f"unknown optimisation level {opt!r}; choose from {OPT_LEVELS}")
    toolchain = _resolve_toolchain(compiler, target)
    out_dir = Path(out_dir)
    zlib_units = tuple(SourceUnit(f"{ZLIB_DIR_NAME}/{name}") for name in ZLIB_SOURCES)

    compile_steps: dict[Path, _Step] = {}
    object_of: dict[tuple[str, SourceUnit], Path] = {}
    link_steps: list[_Step] = []
    planned: list[tuple[DemoProgram, str, Path, Path]] = []
    for opt in opt_levels:
        config = f"{Path(compiler).name}-{target}-{opt}"
        for program in DEMO_PROGRAMS:
            objects: list[Path] = []
            for unit in (*program.units, *zlib_units):
                subdir = ZLIB_DIR_NAME if unit.is_library else ""
                object_file = out_dir / "obj" / config / subdir / f"{unit.object_stem}.o"
                object_of[(opt, unit)] = object_file
                objects.append(object_file)
                compile_steps.setdefault(
                    object_file,
                    _Step(
                        _compile_argv(toolchain, unit, opt),
                        object_file,
                        _unit_inputs(unit),
                        COMPILE_TIMEOUT_SECONDS,
                    ),
                )
            file_name = program.name + toolchain.exe_suffix
            unstripped = out_dir / "unstripped" / config / file_name
            stripped = out_dir / "stripped" / config / file_name if strip else unstripped
            link = (*toolchain.compiler, *(str(path) for path in objects))
            link_steps.append(_Step(link, unstripped, tuple(objects), LINK_TIMEOUT_SECONDS))
            if strip:
                # Linking again with -s gives the same code without a symbol table, and needs
                # no separate strip tool for each target.
                link_steps.append(
                    _Step((*link, "-s"), stripped, tuple(objects), LINK_TIMEOUT_SECONDS)
                )
            planned.append((program, opt, stripped, unstripped))

    commands = _run_steps(list(compile_steps.values()))
    commands += _run_steps(link_steps)

    functions_of_object = {
        object_file: _defined_in_source(
            _defined_functions(toolchain, object_file), DEMO_SOURCES_DIR / unit.source
        )
        for (_, unit), object_file in object_of.items()
    }
    binaries = []
    for program, opt, stripped, unstripped in planned:
        unit_functions = tuple(
            UnitFunctions(unit.source, functions_of_object[object_of[(opt, unit)]])
            for unit in (*program.units, *zlib_units)
        )
        binaries.append(
            DemoBinary(
                name=program.name,
                family=program.family,
                actor=program.actor,
                version=program.version,
                opt=opt,
                role=program.role,
                target=target,
                path=stripped,
                unstripped_path=unstripped,
                unit_functions=unit_functions,
                shares_code_with=program.shares_code_with,
            )
        )
    return DemoCorpus(
        out_dir=out_dir,
        compiler=compiler,
        target=target,
        binaries=tuple(binaries),
        charlie_shared_functions=_functions_shared_by_source(binaries, "charlie", "alpha"),
        commands=tuple(commands),
    )


def _functions_shared_by_source(
    binaries: Sequence[DemoBinary], program: str, family: str
) -> tuple[str, ...]:
    """Functions ``program`` gets from source files it shares with ``family`` (any -O level)."""
    family_sources = {unit.source for p in DEMO_PROGRAMS if p.family == family for unit in p.units}
    shared = {
        name
        for binary in binaries
        if binary.name == program
        for unit in binary.unit_functions
        if unit.source in family_sources
        for name in unit.names
    }
    return tuple(sorted(shared))
