"""Start heuristics for code that recursive descent from known starts does not reach.

Each heuristic returns candidate addresses; ``FunctionRecovery`` proposes them and its descent
rejects the ones that decode into garbage. All of them read one incrementally maintained
``CodeCoverage`` (which bytes recovered instructions cover, which function owns each
instruction, how far each function extends), so a heuristic round costs in proportion to
what changed, not to the size of the image. See docs/function-recovery.md.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Callable, Iterable
from typing import Final

import numpy as np
import numpy.typing as npt

from earmark.extract.disasm import KIND_JUMP, Instruction, InstructionDecoder, parse_scaled_memory
from earmark.extract.function_features import FunctionBody
from earmark.extract.image import CodeImage

# Padding compilers put between functions: int3 (MSVC), nop forms (gcc/clang), zero bytes.
_PADDING_MNEMONICS: Final = frozenset({"int3", "nop"})
# Their encodings when one byte long, and the bytes gap_prologue looks at per step for them:
# alignment padding is at most 15 bytes (a 16-byte alignment), 64 covers a few such runs.
_ONE_BYTE_PADDING: Final = b"\xcc\x90"
_PADDING_RUN_BYTES: Final = 64

# First instructions that mark a function start in a gap reached only through pointers.
# Measured on the fixtures: these cover every function-pointer-only function of the gcc,
# clang and mingw builds, and none of them begins a `.cold` fragment.
_PROLOGUE_TOKENS: Final = frozenset(
    {"endbr64", "endbr32", "push r64", "push r32", "sub sp,0x", "mov r64,sp", "mov r32,sp"}
)

# Function entry alignment gcc, clang, mingw and MSVC use for -O2 code (-falign-functions=16).
FUNCTION_ALIGNMENT: Final = 16

_SIZE_OF: Final = operator.attrgetter("size")
# Instructions marked per numpy pass. Each takes ~80 bytes of temporary arrays, so the first
# mark after the trusted starts (every function at once: 356k instructions on pillow _imaging)
# took ~30 MB in one go; a pass has a fixed cost of ~20 numpy calls, so 2^16 keeps it small.
COVERAGE_BATCH_INSTRUCTIONS: Final = 1 << 16

# Owner value of an instruction that more than one function reaches by its own flow.
SHARED_OWNER: Final = -1

# Largest address a uint64 holds; segment ends are clipped to it.
_MAX_ADDRESS: Final = 2**64 - 1


class CodeCoverage:
    """Which code bytes recovered functions cover, and who owns each instruction.

    Coverage only grows: when a function is re-explored and cut at a start found inside it,
    the bytes it loses belong to the function at that start, so they stay covered. Bytes are
    marked lazily, in one numpy pass over all functions added since the last query, because
    marking instruction by instruction in Python cost as much as decoding them; with the
    compiled table, in C as each function is added (``Body.cover``).
    """

    def __init__(self, decoder: InstructionDecoder) -> None:
        code = sorted(
            (s for s in decoder.image.segments if s.executable), key=lambda s: s.virtual_address
        )
        self._table = decoder.table
        self._bases = [segment.virtual_address for segment in code]
        # With the compiled table the byte maps are its own (Body.cover, Table.covered/gaps):
        # marked body by body as they are added, with no numpy pass over copied spans.
        self._maps = (
            [np.zeros(len(segment.data), dtype=bool) for segment in code]
            if self._table is None
            else []
        )
        # Address of an instruction -> start of the function that reaches it (SHARED_OWNER
        # when several do). With the compiled instruction table (disasm.ACCELERATOR) the
        # owners are kept in its rows instead and this dict stays empty.
        self.owners: dict[int, int] = {}
        # owner_of(address): start of the function owning the instruction at ``address``
        # (SHARED_OWNER when several do), or None. One lookup, bound once: heuristics ask it
        # ~10^5 times per sample. A coverage's bodies are all of its decoder's kind.
        self.owner_of: Callable[[int], int | None] = (
            self.owners.get if self._table is None else self._table.owner
        )
        self._pending: list[FunctionBody] = []
        self._extent_ends: dict[int, int] = {}  # function start -> end of its last byte
        self._sorted_extents: list[tuple[int, int]] | None = None
        self._extent_starts: list[int] = []

    def add(self, body: FunctionBody) -> None:
        start = body.start
        owners = self.owners
        instructions = body.instructions
        if not isinstance(instructions, dict):  # rows of the compiled table
            instructions.own(start)
            end = instructions.cover()
            if end is not None:
                self._extent_ends[start] = end  # a re-explored body replaces its old end
                self._sorted_extents = None
            return
        # Set operations and dict.update run in C; only addresses two functions share (a few
        # per cent) are looked at one by one.
        common = owners.keys() & instructions.keys()
        previous = [(address, owners[address]) for address in common]
        owners.update(dict.fromkeys(instructions, start))
        for address, owner in previous:
            if owner != start:
                owners[address] = SHARED_OWNER
        if self._table is not None:  # Instruction tuples over a compiled decoder (tests)
            for address, instruction in instructions.items():
                self._table.cover_span(address, instruction.size)
            if instructions:
                self._extent_ends[start] = max(
                    (address + instruction.size) & _MAX_ADDRESS
                    for address, instruction in instructions.items()
                )
                self._sorted_extents = None
            return
        self._pending.append(body)

    def remove(self, body: FunctionBody) -> None:
        """Forget ``body``'s ownership (before replacing it with a re-explored version)."""
        owners = self.owners
        start = body.start
        if not isinstance(body.instructions, dict):
            body.instructions.disown(start)
            return
        for address in body.instructions:
            if owners.get(address) == start:
                del owners[address]

    def _flush(self) -> None:
        """Mark the bytes of the functions added since the last query."""
        pending, self._pending = self._pending, []
        batch: list[FunctionBody] = []
        instructions = 0
        for body in pending:
            batch.append(body)
            instructions += len(body.instructions)
            if instructions >= COVERAGE_BATCH_INSTRUCTIONS:
                self._mark(batch)
                batch, instructions = [], 0
        if batch:
            self._mark(batch)

    def _mark(self, pending: list[FunctionBody]) -> None:
        counts = [len(body.instructions) for body in pending]
        total = sum(counts)
        addresses, sizes = _spans_in_python(pending, total)
        with np.errstate(over="ignore"):  # an instruction ending past 2**64 wraps; harmless
            ends = addresses + sizes
        if total:
            offsets = np.concatenate(([0], np.cumsum(counts[:-1]))).astype(np.int64)
            furthest = np.maximum.reduceat(ends, offsets).tolist()
            for body, end in zip(pending, furthest, strict=True):
                self._extent_ends[body.start] = end  # a re-explored body replaces its old end
            self._sorted_extents = None
        for base, coverage in zip(self._bases, self._maps, strict=True):
            low_bound = np.uint64(base)
            high_bound = np.uint64(min(base + len(coverage), _MAX_ADDRESS))
            inside = (addresses >= low_bound) & (addresses < high_bound)
            if not inside.any():
                continue
            lows = (addresses[inside] - low_bound).astype(np.int64)
            highs = np.minimum(ends[inside] - low_bound, np.uint64(len(coverage))).astype(np.int64)
            _mark_intervals(coverage, lows, highs)

    def covered(self, address: int) -> bool:
        if self._table is not None:
            is_covered: bool = self._table.covered(address)
            return is_covered
        if self._pending:
            self._flush()
        index = bisect.bisect_right(self._bases, address) - 1
        if index < 0:
            return False
        offset = address - self._bases[index]
        coverage = self._maps[index]
        return offset < len(coverage) and bool(coverage[offset])

    def inside_extent(self, address: int) -> bool:
        """True when ``address`` lies between some function's start and its furthest byte."""
        if self._pending:
            self._flush()
        if self._sorted_extents is None:
            self._sorted_extents = sorted(self._extent_ends.items())
            self._extent_starts = [start for start, _end in self._sorted_extents]
        index = bisect.bisect_right(self._extent_starts, address) - 1
        return index >= 0 and address < self._sorted_extents[index][1]

    def gaps(self) -> list[tuple[int, int]]:
        """Maximal uncovered ranges of the executable segments, in address order."""
        if self._table is not None:
            compiled: list[tuple[int, int]] = self._table.gaps()
            return compiled
        if self._pending:
            self._flush()
        found: list[tuple[int, int]] = []
        for base, coverage in zip(self._bases, self._maps, strict=True):
            # int8 ends: a plain [0] would make the whole array int64 (8 bytes a byte of code,
            # twice over with the diff: ~36 MB at once on a 2 MB code section).
            border = np.zeros(1, dtype=np.int8)
            uncovered = np.concatenate((border, (~coverage).view(np.int8), border))
            edges = np.diff(uncovered)
            # Added in Python: base may be past int64 in a hostile 64-bit image.
            lows = [base + offset for offset in np.flatnonzero(edges == 1).tolist()]
            highs = [base + offset for offset in np.flatnonzero(edges == -1).tolist()]
            found.extend(zip(lows, highs, strict=True))
        return found


def _spans_in_python(
    pending: list[FunctionBody], total: int
) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """(addresses, sizes) of every instruction of ``pending``, body after body."""
    # uint64: a hostile 64-bit image may map code at or above 2**63 (int64 overflows).
    addresses = np.fromiter(
        itertools.chain.from_iterable(body.instructions for body in pending),
        dtype=np.uint64,
        count=total,
    )
    sizes = np.fromiter(
        itertools.chain.from_iterable(
            map(_SIZE_OF, body.instructions.values()) for body in pending
        ),
        dtype=np.uint64,
        count=total,
    )
    return addresses, sizes


def _mark_intervals(
    coverage: npt.NDArray[np.bool_], lows: npt.NDArray[np.int64], highs: npt.NDArray[np.int64]
) -> None:
    """Set ``coverage[low:high]`` for every (low, high) pair, in a few numpy passes.

    The intervals are merged first (sorted by low; a running maximum of high closes a run), so
    the +1/-1 marks go into an int8 array: a running sum over the segment's bytes in int64,
    as before, took 24 bytes a byte of code, ~50 MB at once on a 2 MB code section.
    """
    keep = highs > lows  # an instruction wrapping past 2**64 covers nothing here
    lows, highs = lows[keep], highs[keep]
    if not len(lows):
        return
    order = np.argsort(lows, kind="stable")
    lows, highs = lows[order], highs[order]
    reach = np.maximum.accumulate(highs)
    # A run starts where an interval begins past everything before it (touching ones merge).
    starts = np.flatnonzero(np.concatenate(([True], lows[1:] > reach[:-1])))
    run_lows = lows[starts]
    run_highs = reach[np.concatenate((starts[1:] - 1, [len(lows) - 1]))]
    first, last = int(run_lows[0]), int(run_highs[-1])
    # Runs are disjoint and not touching, so no two marks share a byte.
    marks = np.zeros(last - first + 1, dtype=np.int8)
    marks[run_lows - first] = 1
    marks[run_highs - first] = -1
    coverage[first:last] |= np.cumsum(marks[:-1], dtype=np.int8) > 0


def tail_call_targets(
    bodies: Iterable[FunctionBody], starts: list[int], coverage: CodeCoverage
) -> list[int]:
    """Targets of jmps that cross another function's start: they leave their function."""
    if coverage._table is not None:  # the same loop over the table's ownership, in C
        compiled: list[int] = coverage._table.tail_targets(list(bodies), starts)
        return compiled
    found: list[int] = []
    owner_of = coverage.owner_of
    for body in bodies:
        for address, target in body.direct_jumps:
            # A target another function reaches by its own flow is a shared tail or a cold
            # fragment jumping home, not a function entry.
            owner = owner_of(target)
            if owner is not None and owner != body.start:
                continue
            low, high = (address, target) if address < target else (target, address)
            first = bisect.bisect_right(starts, low)
            if first < len(starts) and starts[first] <= high:
                found.append(target)
    return found


def referenced_code(body: FunctionBody, decoder: InstructionDecoder) -> list[int]:
    """Code addresses ``body`` takes as data: ``lea r, [rip+X]``, ``push imm``, ``mov r, imm``."""
    if not isinstance(body.instructions, dict):  # rows of the compiled table: same pass in C
        return body.instructions.referenced_code()
    found: list[int] = []
    for instruction in body.instructions.values():
        if instruction.address_immediates:
            found.extend(a for a in instruction.address_immediates if decoder.is_code(a))
        memory = instruction.memory_address
        if memory is not None and instruction.mnemonic == "lea" and decoder.is_code(memory):
            found.append(memory)
    return found


def data_code_pointers(image: CodeImage) -> list[int]:
    """Pointer-aligned values in data segments that point into executable segments.

    Function-pointer tables, vtables, .init_array and TLS callbacks: in 32-bit PE without
    .pdata this is the only way to see code that is never called directly. Read with numpy
    because data segments are megabytes and only a few values are code addresses.
    """
    width = image.bits // 8
    dtype = np.dtype("<u8") if width == 8 else np.dtype("<u4")
    code = [
        (s.virtual_address, s.virtual_address + len(s.data)) for s in image.segments if s.executable
    ]
    found: list[int] = []
    for segment in image.segments:
        if segment.executable or len(segment.data) < width:
            continue
        usable = len(segment.data) - len(segment.data) % width
        values: npt.NDArray[np.uint64] = np.frombuffer(segment.data[:usable], dtype=dtype).astype(
            np.uint64
        )
        inside = np.zeros(len(values), dtype=bool)
        for low, high in code:
            inside |= (values >= low) & (values < high)
        found.extend(int(v) for v in values[inside].tolist() if v)
    return list(dict.fromkeys(found))


def gap_prologue(
    decoder: InstructionDecoder, start: int, end: int, coverage: CodeCoverage
) -> int | None:
    """The first instruction after padding in an uncovered gap, when it looks like a function."""
    address = start
    skipped_padding = False
    while address < end:
        segment = decoder.segment_at(address)
        if segment is not None and segment.executable:
            # int3 (0xCC) and nop (0x90) are one-byte padding wherever they start: skipped as
            # bytes rather than decoded one by one (MSVC pads with up to 15 int3s; PE bench (a)
            # KB: 465k decodes for 42k gaps, ~0.3 CPU s).
            offset = address - segment.virtual_address
            run = segment.data[offset : offset + min(end - address, _PADDING_RUN_BYTES)]
            padding = len(run) - len(run.lstrip(_ONE_BYTE_PADDING))
            if padding:
                address += padding
                skipped_padding = True
                continue
        instruction = decoder.decode(address)
        if instruction is None:
            if decoder.read(address, 1) == b"\x00":
                address += 1
                skipped_padding = True
                continue
            return None
        if instruction.mnemonic in _PADDING_MNEMONICS or is_padding(instruction):
            address += instruction.size
            skipped_padding = True
            continue
        # Compilers align function entries to 16 bytes with padding before them; code there
        # that decodes cleanly to its end is an unreferenced (dead or pointer-only) function.
        # The descent rejects it if it runs into bytes that do not decode.
        aligned_after_padding = (
            skipped_padding
            and address % FUNCTION_ALIGNMENT == 0
            and not coverage.inside_extent(address)  # aligned switch cases, cold blocks
        )
        if (
            aligned_after_padding
            or instruction.token in _PROLOGUE_TOKENS
            or instruction.token.startswith("sub sp,")
        ):
            return address
        return None
    return None


def is_padding(instruction: Instruction) -> bool:
    """Multi-byte no-ops: ``lea esi, [esi + eiz]``, ``xchg ax, ax``, ``mov edi, edi``."""
    operands = instruction.op_str.split(", ")
    if instruction.mnemonic == "lea" and len(operands) == 2:
        inner = operands[1][operands[1].find("[") + 1 : -1].split(" ")
        return inner[0] == operands[0] and all(
            part in ("+", "eiz", "riz", "*1", "0") or part.startswith("eiz*") for part in inner[1:]
        )
    if instruction.mnemonic in ("xchg", "mov") and len(operands) == 2:
        return operands[0] == operands[1]
    return False


def is_lazy_binding_stub(decoder: InstructionDecoder, address: int) -> bool:
    """ELF PLT0 (``push [GOT+w]; jmp [GOT+2w]``) or a lazy-binding PLT entry (``push n; jmp
    PLT0``), recognised by shape because the loader maps segments, not named sections.

    Neither is a function: PLT0 calls the dynamic linker's resolver, an entry pushes a
    relocation index for it. The operand pair of PLT0 (two memory slots one pointer apart,
    same base) is not something a compiler emits at a function entry.
    """
    return _plt0_at(decoder, address) or _lazy_entry_at(decoder, address)


def _after_endbr(decoder: InstructionDecoder, address: int) -> Instruction | None:
    instruction = decoder.decode(address)
    if instruction is not None and instruction.mnemonic in ("endbr64", "endbr32"):
        return decoder.decode(address + instruction.size)
    return instruction


def _plt0_at(decoder: InstructionDecoder, address: int) -> bool:
    push = _after_endbr(decoder, address)
    if push is None or push.mnemonic != "push" or "[" not in push.op_str:
        return False
    jump = decoder.decode(push.address + push.size)
    if jump is None or jump.kind != KIND_JUMP or "[" not in jump.op_str:
        return False
    width = decoder.bits // 8
    if push.memory_address is not None and jump.memory_address is not None:
        return jump.memory_address - push.memory_address == width
    pushed, jumped = parse_scaled_memory(push.op_str), parse_scaled_memory(jump.op_str)
    return (
        pushed is not None
        and jumped is not None
        and pushed[0] is not None
        and pushed[:3] == jumped[:3]
        and jumped[3] - pushed[3] == width
    )


def _lazy_entry_at(decoder: InstructionDecoder, address: int) -> bool:
    push = _after_endbr(decoder, address)
    if push is None or push.mnemonic != "push" or not push.token.startswith("push 0x"):
        return False  # pushes a small relocation index
    jump = decoder.decode(push.address + push.size)
    return (
        jump is not None
        and jump.kind == KIND_JUMP
        and jump.target is not None
        and _plt0_at(decoder, jump.target)
    )
