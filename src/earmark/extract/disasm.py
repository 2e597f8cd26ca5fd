"""Decode x86/x86-64 instructions once per address and turn each into a normalised token.

Capstone runs in "lite" mode (no detail objects): we parse its Intel-syntax operand text
ourselves, which is several times faster than detail mode and enough to classify operands.
Every decoded instruction is cached by address, so overlapping descents never decode twice.

A token is the mnemonic plus one class per operand, with everything that depends on where the
code was loaded masked: branch targets, RIP-relative and absolute memory addresses and
immediates that point into the image become ``addr``; memory displacements are dropped; small
immediates (|v| < SMALL_IMMEDIATE_LIMIT) are kept because they carry meaning (shift counts,
struct sizes, characters) and never depend on the load address.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Final

import capstone

from earmark.extract.image import CodeImage, Segment

# Immediates below this magnitude are kept literally in tokens. Measured on the fixtures and
# corpus DLLs: 0x1000 keeps stack-frame sizes, shift counts, ASCII and struct offsets while no
# image we load maps code or data below 0x1000 (the first page is never mapped), so nothing
# kept can be an address.
SMALL_IMMEDIATE_LIMIT: Final = 0x1000

# Bytes handed to capstone per decode call. Capstone decodes the whole buffer eagerly, so a
# window a few basic blocks long amortises the call overhead without decoding much past a
# terminator (median x86 block is ~16 bytes).
DECODE_WINDOW_BYTES: Final = 256

# Instruction kinds, kept as small ints because they are compared in the hot loop.
KIND_PLAIN: Final = 0
KIND_CONDITIONAL: Final = 1  # jcc, loop, jrcxz: two successors
KIND_JUMP: Final = 2  # unconditional jmp (direct or indirect)
KIND_CALL: Final = 3
KIND_END: Final = 4  # ret, hlt, ud2, int3, fastfail: no successor

_END_MNEMONICS: Final = frozenset(
    {"ret", "retf", "retn", "iret", "iretd", "iretq", "hlt", "ud2", "int3", "ud1", "ud0"}
)
_CONDITIONAL_EXTRA: Final = frozenset({"loop", "loope", "loopne", "jrcxz", "jecxz", "jcxz"})
_PREFIX_WORDS: Final = frozenset(
    {"bnd", "notrack", "lock", "rep", "repe", "repne", "repz", "repnz"}
)

_MEMORY_SIZES: Final = {
    "byte": "m8",
    "word": "m16",
    "dword": "m32",
    "qword": "m64",
    "tbyte": "m80",
    "xmmword": "m128",
    "ymmword": "m256",
    "zmmword": "m512",
    "xword": "m80",
}


def _register_classes() -> dict[str, str]:
    classes: dict[str, str] = {}
    legacy = ("ax", "bx", "cx", "dx", "si", "di", "bp")
    for name in legacy:
        classes["r" + name] = "r64"
        classes["e" + name] = "r32"
        classes[name] = "r16"
    for name in ("al", "bl", "cl", "dl", "ah", "bh", "ch", "dh", "sil", "dil", "bpl", "spl"):
        classes[name] = "r8"
    # The stack pointer keeps its own class: push/sub rsp/[rsp+..] patterns are frame set-up,
    # and mixing them with general registers blurs every prologue into every computation.
    for name in ("rsp", "esp", "sp"):
        classes[name] = "sp"
    for number in range(8, 16):
        classes[f"r{number}"] = "r64"
        classes[f"r{number}d"] = "r32"
        classes[f"r{number}w"] = "r16"
        classes[f"r{number}b"] = "r8"
    for number in range(32):
        classes[f"xmm{number}"] = "xmm"
        classes[f"ymm{number}"] = "ymm"
        classes[f"zmm{number}"] = "zmm"
    for number in range(8):
        classes[f"st({number})"] = "st"
        classes[f"mm{number}"] = "mm"
        classes[f"k{number}"] = "k"
        classes[f"cr{number}"] = "cr"
        classes[f"dr{number}"] = "dr"
    classes["st"] = "st"
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        classes[name] = "seg"
    classes["rip"] = "ip"
    classes["eip"] = "ip"
    return classes


REGISTER_CLASSES: Final = _register_classes()


@dataclass(frozen=True, slots=True)
class Instruction:
    """One decoded instruction with everything function recovery needs, nothing more."""

    address: int
    size: int
    mnemonic: str  # without bnd/notrack prefixes
    op_str: str
    token: str  # normalised form (see module docstring)
    kind: int  # KIND_*
    target: int | None  # direct branch/call target
    # Address of a memory operand that does not depend on registers (RIP-relative or absolute).
    memory_address: int | None
    # Immediates that point into a mapped segment (offsets of strings, functions, tables).
    address_immediates: tuple[int, ...]
    # Immediates that do not point into the image and are not small: masks, magic numbers.
    large_immediates: tuple[int, ...]


def _parse_int(text: str) -> int | None:
    text = text.strip()
    negative = text.startswith("-")
    if negative:
        text = text[1:].strip()
    try:
        value = int(text, 16) if text.startswith("0x") else int(text, 10)
    except ValueError:
        return None
    return -value if negative else value


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


class InstructionDecoder:
    """Decodes instructions in the executable segments of one image, cached by address."""

    def __init__(self, image: CodeImage) -> None:
        self.image = image
        self.bits = image.bits
        mode = capstone.CS_MODE_64 if image.bits == 64 else capstone.CS_MODE_32
        self._capstone = capstone.Cs(capstone.CS_ARCH_X86, mode)
        self._segments = sorted(image.segments, key=lambda s: s.virtual_address)
        self._segment_starts = [s.virtual_address for s in self._segments]
        self._cache: dict[int, Instruction | None] = {}
        self._token_cache: dict[tuple[str, str], str] = {}

    # --- address space -------------------------------------------------------------------

    def segment_at(self, address: int) -> Segment | None:
        index = bisect.bisect_right(self._segment_starts, address) - 1
        if index < 0:
            return None
        segment = self._segments[index]
        if address < segment.virtual_address + len(segment.data):
            return segment
        return None

    def is_code(self, address: int) -> bool:
        segment = self.segment_at(address)
        return segment is not None and segment.executable

    def is_mapped(self, address: int) -> bool:
        return self.segment_at(address) is not None

    def read(self, address: int, length: int) -> bytes:
        """Bytes at ``address`` (fewer at the end of a segment; empty when unmapped)."""
        segment = self.segment_at(address)
        if segment is None:
            return b""
        offset = address - segment.virtual_address
        return segment.data[offset : offset + length]

    # --- decoding ------------------------------------------------------------------------

    def decode(self, address: int) -> Instruction | None:
        """The instruction at ``address``, or None for invalid bytes / outside code."""
        cached = self._cache.get(address, False)
        if cached is not False:
            return cached  # type: ignore[return-value]
        segment = self.segment_at(address)
        if segment is None or not segment.executable:
            self._cache[address] = None
            return None
        offset = address - segment.virtual_address
        window = segment.data[offset : offset + DECODE_WINDOW_BYTES]
        first: Instruction | None = None
        for insn_address, size, mnemonic, op_str in self._capstone.disasm_lite(window, address):
            if insn_address in self._cache:
                break  # the rest of the window is decoded already
            instruction = self._analyse(insn_address, size, mnemonic, op_str)
            self._cache[insn_address] = instruction
            if first is None:
                first = instruction
        if first is None:
            self._cache[address] = None
        return first

    def _analyse(self, address: int, size: int, mnemonic: str, op_str: str) -> Instruction:
        if " " in mnemonic:
            words = [w for w in mnemonic.split() if w not in ("bnd", "notrack")]
            mnemonic = " ".join(words)
        base = mnemonic.rsplit(" ", 1)[-1]
        kind = KIND_PLAIN
        if base in _END_MNEMONICS:
            kind = KIND_END
        elif base == "jmp":
            kind = KIND_JUMP
        elif base == "call":
            kind = KIND_CALL
        elif (base.startswith("j") or base in _CONDITIONAL_EXTRA) and base != "jmp":
            kind = KIND_CONDITIONAL
        elif base == "int" and op_str == "0x29":  # __fastfail never returns
            kind = KIND_END

        target: int | None = None
        memory_address: int | None = None
        address_immediates: list[int] = []
        large_immediates: list[int] = []
        classes: list[str] = []
        if op_str:
            for operand in op_str.split(", "):
                if "[" in operand:
                    memory_class, memory_address = self._classify_memory(
                        operand, address + size, memory_address
                    )
                    classes.append(memory_class)
                    continue
                register_class = REGISTER_CLASSES.get(operand)
                if register_class is not None:
                    classes.append(register_class)
                    continue
                value = _parse_int(operand)
                if value is None:  # far pointers "0x10:0x2000" and other oddities
                    classes.append("other")
                    continue
                if kind != KIND_PLAIN:
                    target = value & ((1 << self.bits) - 1)
                    classes.append("addr")
                    continue
                unsigned = value & ((1 << self.bits) - 1)
                signed = _signed(value, self.bits)
                if unsigned >> 32 == 0 and abs(_signed(unsigned, 32)) < SMALL_IMMEDIATE_LIMIT:
                    signed = _signed(unsigned, 32)  # "and eax, 0xffffffff" is -1 too
                if abs(signed) < SMALL_IMMEDIATE_LIMIT:
                    classes.append(hex(signed))
                elif self.is_mapped(unsigned):
                    address_immediates.append(unsigned)
                    classes.append("addr")
                else:
                    large_immediates.append(unsigned)
                    classes.append("imm")
        token = mnemonic if not classes else mnemonic + " " + ",".join(classes)
        return Instruction(
            address,
            size,
            mnemonic,
            op_str,
            token,
            kind,
            target,
            memory_address,
            tuple(address_immediates),
            tuple(large_immediates),
        )

    def _classify_memory(
        self, operand: str, next_address: int, previous: int | None
    ) -> tuple[str, int | None]:
        """Class of a memory operand and the address it names when that is fixed."""
        prefix, _, rest = operand.partition("[")
        inner = rest.rstrip("]")
        size_word = prefix.split(" ", 1)[0] if prefix else ""
        memory_class = _MEMORY_SIZES.get(size_word, "m")
        if ":" in prefix:  # fs:/gs: (TEB, TLS, stack cookie) stays visible
            memory_class = prefix.rsplit(":", 1)[0].rsplit(" ", 1)[-1] + ":" + memory_class
        if inner.startswith("rip"):
            displacement = (
                _parse_int(inner[3:].replace(" ", "").lstrip("+")) if len(inner) > 3 else 0
            )
            if displacement is None:
                return memory_class + "[addr]", previous
            return memory_class + "[addr]", (next_address + displacement) & 0xFFFFFFFFFFFFFFFF
        absolute = _parse_int(inner)
        if absolute is not None:
            return memory_class + "[addr]", absolute & ((1 << self.bits) - 1)
        if inner.startswith(("rsp", "esp", "rbp", "ebp")):
            return memory_class + "[stack]", previous
        return memory_class, previous


def parse_scaled_memory(op_str: str) -> tuple[str | None, str | None, int, int] | None:
    """Split ``[base + index*scale + disp]`` of the last memory operand into its parts.

    Returns (base register, index register, scale, displacement) or None when the operand has
    no memory part. Used by jump-table recovery only, so kept separate from the hot path.
    """
    start = op_str.rfind("[")
    if start < 0:
        return None
    inner = op_str[start + 1 : op_str.find("]", start)]
    base: str | None = None
    index: str | None = None
    scale = 1
    displacement = 0
    for sign, term in _split_terms(inner):
        if "*" in term:
            register, _, factor = term.partition("*")
            index = register
            scale = _parse_int(factor) or 1
        elif term in REGISTER_CLASSES:
            if base is None:
                base = term
            else:
                index = term
        else:
            value = _parse_int(term)
            if value is not None:
                displacement += sign * value
    return base, index, scale, displacement


def _split_terms(inner: str) -> list[tuple[int, str]]:
    terms: list[tuple[int, str]] = []
    sign = 1
    for part in inner.split(" "):
        if part == "+":
            sign = 1
        elif part == "-":
            sign = -1
        elif part:
            terms.append((sign, part))
            sign = 1
    return terms
