"""Normalisation masks load addresses; the exact hash survives relocation."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.config import DEFAULT_LIMITS
from earmark.extract.disasm import InstructionDecoder
from earmark.extract.functions import recover_functions
from earmark.extract.image import CodeImage, Segment
from fixtures.build import FixtureBuilder
from fixtures.truth import code_image


def _image(code: bytes, base: int, bits: int, data: bytes = b"") -> CodeImage:
    segments = [Segment(".text", base + 0x1000, code, True)]
    if data:
        segments.append(Segment(".rdata", base + 0x2000, data, False))
    return CodeImage(
        arch="x86_64" if bits == 64 else "x86",
        bits=bits,
        image_base=base,
        segments=tuple(segments),
        entry_points=(base + 0x1000,),
        symbol_functions=(),
        export_addresses=(),
        exception_starts=(),
    )


def _tokens(code: bytes, base: int, bits: int) -> tuple[str, ...]:
    data = b"hello world\x00"
    functions, _ = recover_functions(
        _image(code, base, bits, data), DEFAULT_LIMITS, time.monotonic() + 10
    )
    return functions[0].normalized


def _x86_function(base: int, small: int, large: int) -> bytes:
    """push string address; mov eax, small; and eax, large; call +0; ret."""
    string = (base + 0x2000).to_bytes(4, "little")
    return (
        b"\x68" + string
        + b"\xb8" + small.to_bytes(4, "little")
        + b"\x25" + large.to_bytes(4, "little")
        + b"\xe8\x01\x00\x00\x00\xc3\xc3"
    )  # fmt: skip


@settings(max_examples=50, deadline=None)
@given(
    st.integers(0x10, 0x7FFF).map(lambda page: page << 16),
    st.integers(0x10, 0x7FFF).map(lambda page: page << 16),
    st.integers(0, 0xFFF),
)
def test_same_code_at_two_bases_normalises_identically(first: int, second: int, small: int) -> None:
    large = 0xEDB88320
    a = _tokens(_x86_function(first, small, large), first, 32)
    b = _tokens(_x86_function(second, small, large), second, 32)
    assert a == b
    assert a[0] == "push addr"  # the string address is masked
    assert a[1] == f"mov r32,{small:#x}"  # small constants are kept
    assert a[2] == "and r32,imm"
    assert not any(hex(first)[2:6] in token for token in a)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 8), st.integers(0, 0x7FFF))
def test_rip_relative_displacements_are_masked(displacement: int, base_page: int) -> None:
    code = b"\x48\x8d\x05" + displacement.to_bytes(4, "little") + b"\xc3"  # lea rax,[rip+d]
    image = _image(code, base_page << 16, 64)
    instruction = InstructionDecoder(image).decode(image.entry_points[0])
    assert instruction is not None
    assert instruction.token == "lea r64,m[addr]"
    assert instruction.memory_address == image.entry_points[0] + 7 + displacement


def test_stack_and_segment_operands() -> None:
    code = (
        b"\x64\x48\x8b\x04\x25\x28\x00\x00\x00"  # mov rax, qword ptr fs:[0x28]
        b"\x48\x89\x44\x24\x08"  # mov [rsp+8], rax
        b"\xc3"
    )
    image = _image(code, 0x400000, 64)
    decoder = InstructionDecoder(image)
    first = decoder.decode(0x401000)
    second = decoder.decode(0x401009)
    assert first is not None and first.token == "mov r64,fs:m64[addr]"
    assert second is not None and second.token == "mov m64[stack],r64"


def test_relocated_pe_functions_hash_equal(builder: FixtureBuilder) -> None:
    # The same build loaded at another base: every exact hash must match.
    build = builder.build("fx_codec.c", "mingw64", "O2")
    image = code_image(build.stripped)
    shift = 0x10000000
    moved = CodeImage(
        image.arch,
        image.bits,
        image.image_base + shift,
        tuple(
            Segment(s.name, s.virtual_address + shift, s.data, s.executable) for s in image.segments
        ),
        tuple(a + shift for a in image.entry_points),
        (),
        tuple(a + shift for a in image.export_addresses),
        tuple(a + shift for a in image.exception_starts),
        {a + shift: n for a, n in image.import_slots.items()},
    )
    original, _ = recover_functions(image, DEFAULT_LIMITS, time.monotonic() + 60)
    relocated, _ = recover_functions(moved, DEFAULT_LIMITS, time.monotonic() + 60)
    assert [f.address + shift for f in original] == [f.address for f in relocated]
    assert [f.exact_hash for f in original] == [f.exact_hash for f in relocated]
    assert [f.minhash for f in original] == [f.minhash for f in relocated]


def test_decoding_from_inside_a_window_agrees_with_decoding_from_its_start() -> None:
    # A window decoded from an earlier address caches the later instructions; asking for
    # them first must give the same answer, and the cache must not change any field.
    code = (
        b"\x55"  # push rbp
        b"\x48\x89\xe5"  # mov rbp, rsp
        b"\x48\x8d\x05\x10\x00\x00\x00"  # lea rax, [rip + 0x10]
        b"\xb8\x20\x83\xb8\xed"  # mov eax, 0xedb88320
        b"\xe8\x00\x00\x00\x00"  # call next
        b"\xc3"
    )
    image = _image(code, 0x400000, 64)
    addresses = (0x401000, 0x401001, 0x401004, 0x40100B, 0x401010, 0x401015)
    forward = InstructionDecoder(image)
    backward = InstructionDecoder(image)
    from_start = [forward.decode(address) for address in addresses]
    from_end = [backward.decode(address) for address in reversed(addresses)][::-1]
    assert from_start == from_end
    lea, mov, call = from_start[2], from_start[3], from_start[4]
    assert lea is not None and lea.memory_address == 0x40100B + 0x10
    assert mov is not None and mov.large_immediates == (0xEDB88320,) and mov.token == "mov r32,imm"
    assert call is not None and call.target == 0x401015 and call.token == "call addr"


def test_undecodable_bytes_give_none() -> None:
    image = _image(b"\x0f\x0b\x06", 0x400000, 64)  # ud2, then 06 (push es: invalid in 64-bit)
    decoder = InstructionDecoder(image)
    assert decoder.decode(0x401002) is None
    assert decoder.decode(0x402000) is None  # not code


def test_image_dependent_analyses_are_not_shared_between_samples() -> None:
    """Instruction texts are analysed once per process, except where the answer depends on the
    image: the same ``mov eax, 0x402004`` is an address in one image and a constant in another."""
    code = bytes.fromhex("b804204000c3")  # mov eax, 0x402004; ret
    first = InstructionDecoder(_image(code, 0x400000, 32, b"data" * 4)).decode(0x401000)
    second = InstructionDecoder(_image(code, 0x400000, 32)).decode(0x401000)
    third = InstructionDecoder(_image(code, 0x400000, 32, b"data" * 4)).decode(0x401000)
    assert first is not None and second is not None and third is not None
    assert (first.token, first.address_immediates, first.large_immediates) == (
        "mov r32,addr",
        (0x402004,),
        (),
    )
    assert (second.token, second.address_immediates, second.large_immediates) == (
        "mov r32,imm",
        (),
        (0x402004,),
    )
    assert third == first
