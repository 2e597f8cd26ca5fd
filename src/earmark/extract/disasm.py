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
import ctypes
import sys
from types import ModuleType
from typing import Any, Final, NamedTuple

import capstone

from earmark.extract.image import CodeImage, Segment

# Immediates below this magnitude are kept literally in tokens. Measured on the fixtures and
# corpus DLLs: 0x1000 keeps stack-frame sizes, shift counts, ASCII and struct offsets while no
# image we load maps code or data below 0x1000 (the first page is never mapped), so nothing
# kept can be an address.
SMALL_IMMEDIATE_LIMIT: Final = 0x1000

# Bytes handed to capstone per decode call. Capstone decodes the whole buffer eagerly, so a
# window a few basic blocks long amortises the call overhead without decoding much past a
# terminator (median x86 block is ~16 bytes). Measured on three corpus DLLs (bcrypt,
# zstandard, pillow _imaging; CPU seconds of recovery): 96 B 3.28, 128 B 3.17, 256 B 3.29,
# 1024 B +4 %, 4096 B +15 % (decoding past function ends into data and padding). The
# compiled table decodes one instruction at a time and stops at the first one already
# decoded, so there the window only bounds decoding past a function's end: 512 B measured
# within noise of 128 B on pillow _imaging and cryptography _rust.
DECODE_WINDOW_BYTES: Final = 128

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


def _load_accelerator() -> ModuleType | None:
    """The compiled core (``_native.c``), configured for the loaded capstone, or None.

    The extension is optional: ``pip install -e .`` builds it where a C compiler exists, and
    without it the Python code (``InstructionDecoder._decode_window`` and ``_analyse``,
    ``FunctionRecovery.explore``, ``CodeCoverage``, ``build_features``) gives the same
    features (tests compare the two), only slower (docs/function-recovery.md).
    """
    try:
        import earmark.extract._native as _native
    except ImportError:
        return None
    library = capstone._cs
    layout = capstone._cs_insn
    if not all(hasattr(library, name) for name in ("cs_malloc", "cs_disasm_iter")):
        return None  # a capstone without the iterator API (before 4.0): the Python loops
    _native.configure(
        ctypes.cast(library.cs_disasm, ctypes.c_void_p).value,
        ctypes.cast(library.cs_free, ctypes.c_void_p).value,
        ctypes.cast(library.cs_errno, ctypes.c_void_p).value,
        ctypes.cast(library.cs_malloc, ctypes.c_void_p).value,
        ctypes.cast(library.cs_disasm_iter, ctypes.c_void_p).value,
        ctypes.sizeof(layout),
        layout.address.offset,
        layout.size.offset,
        layout.mnemonic.offset,
        layout.mnemonic.size,
        layout.op_str.offset,
        layout.op_str.size,
    )
    return _native


# Set to None to decode with the pure-Python loop (the tests compare both paths).
ACCELERATOR: ModuleType | None = _load_accelerator()


class Instruction(NamedTuple):
    """One decoded instruction with everything function recovery needs, nothing more.

    A NamedTuple rather than a frozen dataclass: recovery builds one per decoded instruction
    (10^5..10^6 per sample) and tuple construction measured ~3x cheaper than a frozen
    dataclass's ``__init__``; it is just as immutable.
    """

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


class _OperandAnalysis(NamedTuple):
    """What an instruction's text says, independent of where it sits (cached by text)."""

    mnemonic: str
    token: str
    kind: int
    target: int | None
    absolute_memory: int | None  # [0x403000]-style operand
    rip_displacement: int | None  # [rip + d]: the address is next instruction + d
    address_immediates: tuple[int, ...]
    large_immediates: tuple[int, ...]


# Instruction-text analyses kept between samples of one process. Only analyses that do not
# depend on the image are shared (see _analyse). With the compiled table almost every text is
# analysed in C and only prefixed or odd ones come here (188 entries after 40 corpus DLLs). On
# the pure-Python path, measured over 40 corpus DLLs in one process: keeping up to 100,000
# (82k entries, ~25 MB) took 6.83-7.40 CPU s against 7.10-7.33 s emptied per sample, i.e. no
# gain beyond noise, so the cache is held to about one large sample's texts (~3 MB). Emptied
# when a new sample finds it fuller, or by drop_shared_analyses.
SHARED_ANALYSES_LIMIT: Final = 10_000
_SHARED_ANALYSES: dict[int, dict[tuple[str, str], _OperandAnalysis]] = {32: {}, 64: {}}


def _shared_analyses(bits: int) -> dict[tuple[str, str], _OperandAnalysis]:
    shared = _SHARED_ANALYSES.setdefault(bits, {})
    if len(shared) > SHARED_ANALYSES_LIMIT:
        shared.clear()
    return shared


def drop_shared_analyses() -> None:
    """Empty the instruction-text analyses kept between samples (see SHARED_ANALYSES_LIMIT)."""
    for shared in _SHARED_ANALYSES.values():
        shared.clear()


_HEX_DIGITS: Final = frozenset("0123456789abcdefABCDEF")

# What an operand's number is, in _classify_operand's answer.
_ROLE_NONE: Final = 0
_ROLE_TARGET: Final = 1  # direct branch target
_ROLE_FIXED_MEMORY: Final = 2  # [absolute address]
_ROLE_RIP_MEMORY: Final = 3  # [rip + displacement]: the value is the displacement
_ROLE_ADDRESS_IMMEDIATE: Final = 4  # immediate inside a mapped segment
_ROLE_LARGE_IMMEDIATE: Final = 5  # other immediate >= SMALL_IMMEDIATE_LIMIT


def _classify_mnemonic(text_mnemonic: str) -> tuple[str, int]:
    """(mnemonic without bnd/notrack, KIND_*) of capstone's mnemonic text."""
    mnemonic = text_mnemonic
    if " " in mnemonic:
        mnemonic = " ".join(w for w in mnemonic.split() if w not in ("bnd", "notrack"))
    base = mnemonic.rsplit(" ", 1)[-1]
    if base in _END_MNEMONICS:
        return mnemonic, KIND_END
    if base == "jmp":
        return mnemonic, KIND_JUMP
    if base == "call":
        return mnemonic, KIND_CALL
    if base.startswith("j") or base in _CONDITIONAL_EXTRA:
        return mnemonic, KIND_CONDITIONAL
    return mnemonic, KIND_PLAIN


def _parse_int(text: str) -> int | None:
    text = text.strip()
    negative = text.startswith("-")
    if negative:
        text = text[1:].strip()
    # Checked up front instead of catching int()'s ValueError: most texts that reach here are
    # not numbers ("rbp + 0x10"), and a raised exception measured ~10x the cost of the check.
    if text.startswith("0x"):
        digits = text[2:]
        if not digits or not _HEX_DIGITS.issuperset(digits):
            return None
        value = int(digits, 16)
    elif text.isascii() and text.isdigit():
        value = int(text)
    else:
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
        self._address_mask = (1 << image.bits) - 1
        # Instructions by address, once analysed (None: invalid bytes or not code). Public so
        # the descent loop can look up hits without a method call.
        self.decoded: dict[int, Instruction | None] = {}
        # Analysis by instruction text: most text repeats (register moves, stack accesses,
        # calls to the same callee), so each distinct text is parsed once per sample, or once
        # per process when the answer does not depend on the image (``_shared``).
        self._analysis: dict[tuple[str, str], _OperandAnalysis] = {}
        self._shared = _shared_analyses(image.bits)
        # Operand texts repeat far more than whole instructions ("qword ptr [rsp + 0x40]"),
        # so a new instruction text is mostly assembled from cached operand answers.
        self._operands: dict[tuple[str, bool], tuple[str, int, int]] = {}
        self._mnemonics: dict[str, tuple[str, int]] = {}
        # The compiled instruction table (disasm.ACCELERATOR), fixed per sample: it replaces
        # ``decoded`` and is what explore, coverage and build_features then work on.
        self.accelerator = ACCELERATOR
        self.table = self._new_table()

    def _new_table(self) -> Any:
        if self.accelerator is None:
            return None
        return self.accelerator.Table(
            self._capstone.csh.value,
            [(s.virtual_address, s.data, s.executable) for s in self._segments],
            DECODE_WINDOW_BYTES,
            self._address_mask,
            self._shared,
            self._analysis,
            self._analyse,
            Instruction,
            REGISTER_CLASSES,
            _MEMORY_SIZES,
            _END_MNEMONICS,
            _CONDITIONAL_EXTRA,
            SMALL_IMMEDIATE_LIMIT,
        )

    def release_caches(self) -> None:
        """Forget every decoded instruction and per-sample text analysis.

        For when recovery is over: the caches are the largest part of a sample's analysis
        memory. Bodies explored by the compiled table keep that table (and only it) alive
        until they are dropped. Decoding still works afterwards, starting from empty caches.
        """
        self.decoded = {}
        self._analysis = {}
        self._operands = {}
        # Not a fresh table: this one holds the decoder's ``_analyse`` (a cycle until the
        # collector runs). Decoding after this takes the Python loop: slower, same answers.
        self.table = None

    def cached_instructions(self) -> dict[int, Instruction | None]:
        """Every address decoded so far and its instruction (None: not code); for tests."""
        if self.table is not None:
            cached: dict[int, Instruction | None] = self.table.cached()
            return cached
        return dict(self.decoded)

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
        if self.table is not None:
            found: Instruction | None = self.table.decode(address)
            return found
        instruction = self.decoded.get(address)
        if instruction is not None or address in self.decoded:
            return instruction
        self._decode_window(address)
        if address not in self.decoded:
            self.decoded[address] = None
        return self.decoded[address]

    def _decode_window(self, address: int) -> None:
        """Decode and analyse the instructions of a window starting at ``address``.

        Stops where the window reaches an instruction decoded before: from there on the
        bytes are in sync with what is cached. Nearly every instruction a window holds is
        asked for by the same descent moments later (measured: 96 % on corpus DLLs).
        """
        segment = self.segment_at(address)
        if segment is None or not segment.executable:
            return
        offset = address - segment.virtual_address
        window = segment.data[offset : offset + DECODE_WINDOW_BYTES]
        decoded = self.decoded
        shared = self._shared
        analyses = self._analysis
        new_instruction = tuple.__new__  # Instruction's generated __new__ is a Python call
        for insn_address, size, mnemonic, op_str in self._capstone.disasm_lite(window, address):
            if insn_address in decoded and insn_address != address:
                break
            analysis = shared.get((mnemonic, op_str)) or analyses.get((mnemonic, op_str))
            if analysis is None:
                analysis = self._analyse(mnemonic, op_str)
            # One unpack instead of eight NamedTuple attribute lookups (measured 1-4 % of
            # recovery; this runs once per decoded instruction).
            (
                clean_mnemonic,
                token,
                kind,
                target,
                memory,
                rip_displacement,
                address_immediates,
                large_immediates,
            ) = analysis
            if rip_displacement is not None:
                memory = (insn_address + size + rip_displacement) & 0xFFFFFFFFFFFFFFFF
            decoded[insn_address] = new_instruction(
                Instruction,
                (
                    insn_address,
                    size,
                    clean_mnemonic,
                    op_str,
                    token,
                    kind,
                    target,
                    memory,
                    address_immediates,
                    large_immediates,
                ),
            )

    def _analyse(self, text_mnemonic: str, op_str: str) -> _OperandAnalysis:
        """The analysis of one instruction text, stored in the cache it belongs to."""
        key = (sys.intern(text_mnemonic), op_str)  # kept by the caches: one copy per mnemonic
        analysis = self._analysis.get(key)
        if analysis is None:
            analysis, image_dependent = self._analyse_text(text_mnemonic, op_str)
            (self._analysis if image_dependent else self._shared)[key] = analysis
        return analysis

    def _analyse_text(self, text_mnemonic: str, op_str: str) -> tuple[_OperandAnalysis, bool]:
        """(analysis, whether it depends on the image: immediates classified by is_mapped)."""
        mnemonic_info = self._mnemonics.get(text_mnemonic)
        if mnemonic_info is None:
            mnemonic_info = _classify_mnemonic(text_mnemonic)
            self._mnemonics[text_mnemonic] = mnemonic_info
        mnemonic, kind = mnemonic_info
        if kind == KIND_PLAIN and op_str == "0x29" and mnemonic == "int":
            kind = KIND_END  # __fastfail never returns
        if kind != KIND_PLAIN and op_str.startswith("0x") and "," not in op_str:
            # Direct branch or call: the common case of a cache miss, parsed without the loop.
            direct = int(op_str, 16) & self._address_mask
            token = mnemonic + " addr"
            return _OperandAnalysis(mnemonic, token, kind, direct, None, None, (), ()), False
        if not op_str:
            return _OperandAnalysis(mnemonic, mnemonic, kind, None, None, None, (), ()), False
        target: int | None = None
        absolute_memory: int | None = None
        rip_displacement: int | None = None
        address_immediates: list[int] = []
        large_immediates: list[int] = []
        classes: list[str] = []
        branch = kind != KIND_PLAIN
        operands = self._operands
        for operand in op_str.split(", "):
            info = operands.get((operand, branch))
            if info is None:
                info = self._classify_operand(operand, branch)
                operands[(operand, branch)] = info
            operand_class, role, value = info
            classes.append(operand_class)
            if role == _ROLE_NONE:
                continue
            if role == _ROLE_TARGET:
                target = value
            elif role == _ROLE_FIXED_MEMORY:
                absolute_memory, rip_displacement = value, None
            elif role == _ROLE_RIP_MEMORY:
                absolute_memory, rip_displacement = None, value
            elif role == _ROLE_ADDRESS_IMMEDIATE:
                address_immediates.append(value)
            else:
                large_immediates.append(value)
        analysis = _OperandAnalysis(
            mnemonic,
            # Interned: ~70k instruction texts share ~3k tokens, and the analyses outlive the
            # sample in the shared cache (one copy each measured ~4 MB on pillow _imaging).
            sys.intern(mnemonic + " " + ",".join(classes)),
            kind,
            target,
            absolute_memory,
            rip_displacement,
            tuple(address_immediates),
            tuple(large_immediates),
        )
        return analysis, bool(address_immediates or large_immediates)

    def _classify_operand(self, operand: str, branch: bool) -> tuple[str, int, int]:
        """(token class, _ROLE_*, value) of one operand; cached by its text."""
        if "[" in operand:
            memory_class, fixed, relative = self._classify_memory(operand)
            if fixed is not None:
                return memory_class, _ROLE_FIXED_MEMORY, fixed
            if relative is not None:
                return memory_class, _ROLE_RIP_MEMORY, relative
            return memory_class, _ROLE_NONE, 0
        register_class = REGISTER_CLASSES.get(operand)
        if register_class is not None:
            return register_class, _ROLE_NONE, 0
        value = _parse_int(operand)
        if value is None:  # far pointers "0x10:0x2000" and other oddities
            return "other", _ROLE_NONE, 0
        if branch:
            return "addr", _ROLE_TARGET, value & self._address_mask
        unsigned = value & self._address_mask
        signed = _signed(value, self.bits)
        if unsigned >> 32 == 0 and abs(_signed(unsigned, 32)) < SMALL_IMMEDIATE_LIMIT:
            signed = _signed(unsigned, 32)  # "and eax, 0xffffffff" is -1 too
        if abs(signed) < SMALL_IMMEDIATE_LIMIT:
            return hex(signed), _ROLE_NONE, 0
        if self.is_mapped(unsigned):
            return "addr", _ROLE_ADDRESS_IMMEDIATE, unsigned
        return "imm", _ROLE_LARGE_IMMEDIATE, unsigned

    def _classify_memory(self, operand: str) -> tuple[str, int | None, int | None]:
        """Class of a memory operand, its fixed address, or its RIP displacement."""
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
            return memory_class + "[addr]", None, displacement
        absolute = _parse_int(inner)
        if absolute is not None:
            return memory_class + "[addr]", absolute & self._address_mask, None
        if inner.startswith(("rsp", "esp", "rbp", "ebp")):
            return memory_class + "[stack]", None, None
        return memory_class, None, None


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
