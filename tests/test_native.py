"""The compiled loops (earmark/extract/_native.c) give exactly what the Python loops give.

Every test analyses the same input twice, once through the extension and once with
``disasm.ACCELERATOR`` set to None (the pure-Python path a machine without a C compiler runs),
and compares the results field by field.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.config import DEFAULT_LIMITS
from earmark.extract import analyze_file, disasm
from earmark.extract.disasm import InstructionDecoder
from earmark.extract.functions import recover_functions
from earmark.extract.image import CodeImage, Segment
from earmark.freeze import features_to_bytes
from earmark.model.sample import SampleFeatures
from fixtures.build import FixtureBuilder

pytestmark = pytest.mark.skipif(
    disasm.ACCELERATOR is None, reason="the _native extension is not built (no C compiler?)"
)

TOOLCHAINS = ("gcc64", "clang64", "gcc32", "mingw64", "mingw32")


def _both_paths(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SampleFeatures, ...]:
    results = []
    for accelerator in (disasm.ACCELERATOR, None):
        monkeypatch.setattr(disasm, "ACCELERATOR", accelerator)
        features = analyze_file(path)
        results.append(dataclasses.replace(features, analysis_seconds=0.0))
    return tuple(results)


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
@pytest.mark.parametrize("opt", ["O0", "O2"])
@pytest.mark.parametrize("source", ["fx_codec.c", "fx_dispatch.c"])
def test_fixture_builds_give_identical_features(
    builder: FixtureBuilder, monkeypatch: pytest.MonkeyPatch, source: str, toolchain: str, opt: str
) -> None:
    build = builder.build(source, toolchain, opt)
    accelerated, python = _both_paths(build.stripped, monkeypatch)
    assert accelerated.functions, "the build should have functions to compare"
    assert accelerated == python
    assert features_to_bytes(accelerated) == features_to_bytes(python)


def _decoded(
    code: bytes, bits: int, accelerated: bool, starts: list[int], base: int = 0x401000
) -> dict[int, disasm.Instruction | None]:
    """The decoder's cache after decoding at ``base + start`` for each start."""
    image = CodeImage(
        arch="x86_64" if bits == 64 else "x86",
        bits=bits,
        image_base=base,
        segments=(Segment(".text", base, code, True), Segment(".data", 0x500000, code, False)),
        entry_points=(base,),
        symbol_functions=(),
        export_addresses=(),
        exception_starts=(),
    )
    return _cache_after(image, accelerated, [base + start for start in starts])


def _cache_after(
    image: CodeImage, accelerated: bool, addresses: list[int]
) -> dict[int, disasm.Instruction | None]:
    """The cache of a decoder of ``image`` (compiled or Python) after decoding ``addresses``."""
    saved = disasm.ACCELERATOR
    disasm.ACCELERATOR = saved if accelerated else None
    try:
        decoder = InstructionDecoder(image)
    finally:
        disasm.ACCELERATOR = saved
    for address in addresses:
        decoder.decode(address)
    return decoder.cached_instructions()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    code=st.binary(min_size=0, max_size=400),
    bits=st.sampled_from([32, 64]),
    starts=st.lists(st.integers(min_value=-4, max_value=420), max_size=12),
)
def test_arbitrary_bytes_decode_identically(code: bytes, bits: int, starts: list[int]) -> None:
    """Overlapping windows, invalid bytes, segment ends and unmapped addresses: same cache."""
    assert _decoded(code, bits, True, starts) == _decoded(code, bits, False, starts)


def test_rip_relative_and_high_addresses() -> None:
    """RIP-relative operands wrap modulo 2**64 the same way on both paths."""
    # lea rax, [rip - 0x10]; mov rax, [rip + 0x7fffffff]; call $+5; ret
    code = bytes.fromhex("488d05f0ffffff488b05ffffff7fe800000000c3")
    for base in (0x401000, 0xFFFFFFFFFFFFF000):
        accelerated = _decoded(code, 64, True, [0], base)
        assert accelerated == _decoded(code, 64, False, [0], base)
        first = accelerated[base]
        assert first is not None
        assert first.memory_address == (base + 7 - 0x10) & (2**64 - 1)


# Texts the compiled analysis leaves to the Python one (prefixed mnemonics, int 0x29) next to
# ones it answers itself (a ret with an immediate, a 64-bit immediate, segment and RIP memory
# operands, a far jump): both paths must decode each of them the same way.
_MIXED_TEXTS = (
    "f2e900000000"  # bnd jmp $+5
    "3effe0"  # notrack jmp rax
    "f3ab"  # rep stosd
    "cd29"  # int 0x29 (__fastfail: never returns)
    "f00103"  # lock add dword ptr [rbx], eax
    "c21000"  # ret 0x10
    "48b88877665544332211"  # movabs rax, 0x1122334455667788
    "64488b042528000000"  # mov rax, qword ptr fs:[0x28]
    "488b0d00100000"  # mov rcx, qword ptr [rip + 0x1000]
    "ff2500f0ffff"  # jmp qword ptr [rip - 0x1000]
    "c3"
)


@pytest.mark.parametrize("bits", [32, 64])
def test_texts_left_to_python_decode_identically(bits: int) -> None:
    code = bytes.fromhex(_MIXED_TEXTS)
    starts = list(range(len(code)))
    accelerated = _decoded(code, bits, True, starts)
    assert accelerated == _decoded(code, bits, False, starts)
    if bits == 64:
        assert accelerated[0x401000 + 6 + 3 + 2] is not None  # int 0x29 decoded, ends the run
        assert accelerated[0x401000 + 6 + 3 + 2].kind == disasm.KIND_END  # type: ignore[union-attr]


def test_dropping_shared_caches_keeps_features(builder: FixtureBuilder) -> None:
    """Analysis refills the process-wide caches after drop_shared_caches, with the same answers."""
    from earmark.extract import function_features, functions, minhash

    build = builder.build("fx_codec.c", "gcc64", "O2")
    before = dataclasses.replace(analyze_file(build.stripped), analysis_seconds=0.0)
    functions.drop_shared_caches()
    assert not minhash._TOKEN_IDS and not function_features._TOKEN_FEATURES
    assert not any(disasm._SHARED_ANALYSES.values())
    after = dataclasses.replace(analyze_file(build.stripped), analysis_seconds=0.0)
    assert features_to_bytes(after) == features_to_bytes(before)


def _recovered(image: CodeImage, accelerated: bool) -> tuple[object, ...]:
    """recover_functions on ``image`` through the extension or the pure-Python path."""
    saved = disasm.ACCELERATOR
    disasm.ACCELERATOR = saved if accelerated else None
    try:
        return recover_functions(image, DEFAULT_LIMITS, time.monotonic() + 60)
    finally:
        disasm.ACCELERATOR = saved


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    code=st.binary(min_size=1, max_size=300),
    bits=st.sampled_from([32, 64]),
    extra_starts=st.lists(st.integers(min_value=0, max_value=299), max_size=6),
    base=st.sampled_from([0x401000, 0xFFFFFFFFFFFFFF00]),
)
def test_arbitrary_code_recovers_identically(
    code: bytes, bits: int, extra_starts: list[int], base: int
) -> None:
    """Descent, bodies, ownership, re-exploration and features over arbitrary bytes (overlapping
    instructions, jumps into instructions, code ending at the top of the address space): the
    compiled core and the Python reference recover the same functions and warnings."""
    if bits == 32:
        base = 0x401000
    image = CodeImage(
        arch="x86_64" if bits == 64 else "x86",
        bits=bits,
        image_base=base,
        segments=(Segment(".text", base, code, True), Segment(".data", 0x500000, code, False)),
        entry_points=(base,),
        symbol_functions=(),
        export_addresses=tuple(base + s for s in extra_starts if s < len(code)),
        exception_starts=(),
    )
    assert _recovered(image, True) == _recovered(image, False)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    first=st.binary(min_size=1, max_size=300),
    second=st.binary(min_size=1, max_size=300),
    offset=st.integers(min_value=0, max_value=320),
    bits=st.sampled_from([32, 64]),
    starts=st.lists(st.integers(min_value=-4, max_value=660), max_size=12),
)
def test_several_code_segments_decode_identically(
    first: bytes, second: bytes, offset: int, bits: int, starts: list[int]
) -> None:
    """Executable segments side by side, apart or overlapping (the compiled table maps code
    addresses per segment, and overlapping ones take the segment lookup every time)."""
    base = 0x401000
    segments = (
        Segment(".text", base, first, True),
        Segment(".text2", base + offset, second, True),
        Segment(".data", 0x500000, first, False),
    )
    image = CodeImage(
        arch="x86_64" if bits == 64 else "x86",
        bits=bits,
        image_base=base,
        segments=segments,
        entry_points=(base,),
        symbol_functions=(),
        export_addresses=(),
        exception_starts=(),
    )
    addresses = [base + start for start in starts]
    assert _cache_after(image, True, addresses) == _cache_after(image, False, addresses)


def test_import_thunks_recover_identically() -> None:
    """Calls through an import stub (endbr64; jmp [slot]), through the slot itself and a tail
    jump to the stub name the same imports on both paths."""
    base, slots = 0x401000, 0x500000
    code = bytearray(0x40)

    def rip(at: int, length: int, target: int) -> bytes:  # rel32 from the next instruction
        return (target - (at + length)).to_bytes(4, "little", signed=True)

    code[0x00:0x05] = b"\xe8" + rip(base + 0x00, 5, base + 0x10)  # call stub
    code[0x05:0x0B] = b"\xff\x15" + rip(base + 0x05, 6, slots + 8)  # call [slot 2]
    code[0x0B:0x10] = b"\xe9" + rip(base + 0x0B, 5, base + 0x20)  # jmp second stub (tail)
    code[0x10:0x14] = b"\xf3\x0f\x1e\xfa"  # endbr64
    code[0x14:0x1A] = b"\xff\x25" + rip(base + 0x14, 6, slots)  # jmp [slot 1]
    code[0x20:0x26] = b"\xff\x25" + rip(base + 0x20, 6, slots + 16)  # jmp [slot 3]
    image = CodeImage(
        arch="x86_64",
        bits=64,
        image_base=base,
        segments=(
            Segment(".text", base, bytes(code), True),
            Segment(".idata", slots, bytes(24), False),
        ),
        entry_points=(base,),
        symbol_functions=(),
        export_addresses=(),
        exception_starts=(),
        import_slots={
            slots: "KERNEL32!GetTickCount",
            slots + 8: "KERNEL32!Sleep",
            slots + 16: "KERNEL32!SetLastError",
        },
    )
    accelerated = _recovered(image, True)
    assert accelerated == _recovered(image, False)
    functions, _ = accelerated
    assert isinstance(functions, tuple)
    (entry,) = [f for f in functions if f.address == base]
    assert entry.called_imports == (
        "KERNEL32!GetTickCount",
        "KERNEL32!Sleep",
        "KERNEL32!SetLastError",
    )
    assert all(f.address not in (base + 0x10, base + 0x20) for f in functions)  # stubs


@pytest.mark.parametrize("base", [0x401000, 2**64 - 8])
def test_coverage_queries_match(base: int) -> None:
    """Covered bytes, gaps and extents after recovery, at the top of the address space too
    (a call wrapping past 2**64; queries below 0 and past 2**64)."""
    from earmark.extract.functions import FunctionRecovery

    code = b"\x90" * 6 + b"\xe8\x00\x00\x00\x00" + b"\xc3" + b"\xcc" * 4 + b"\x55\xc3"
    image = CodeImage(
        arch="x86_64",
        bits=64,
        image_base=base,
        segments=(Segment(".text", base, code, True), Segment(".data", 0x500000, code, False)),
        entry_points=(base,),
        symbol_functions=(),
        export_addresses=(base + 16,),
        exception_starts=(),
    )
    probes = [-1, 0, base - 1, *range(base, base + len(code) + 2), 2**64 + 3]
    answers = []
    saved = disasm.ACCELERATOR
    for accelerator in (saved, None):
        disasm.ACCELERATOR = accelerator
        try:
            recovery = FunctionRecovery(image, DEFAULT_LIMITS, time.monotonic() + 60)
            recovery.run()
        finally:
            disasm.ACCELERATOR = saved
        coverage = recovery.coverage
        answers.append(
            (
                [coverage.covered(address) for address in probes],
                coverage.gaps(),
                [coverage.inside_extent(address) for address in probes],
            )
        )
    assert answers[0] == answers[1]
    assert any(answers[0][0]) and answers[0][1]  # something covered, something not
