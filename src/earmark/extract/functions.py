"""Function recovery on (possibly stripped) x86/x86-64 code, and per-function features.

Starts come from, in order of trust: symbols, exports, entry points, unwind tables (.pdata,
.eh_frame), then recursive descent: direct call targets, tail-jump targets (a ``jmp`` that
crosses another function's start), code addresses referenced as data (function pointers in
``lea``/``push``/``mov``), and finally a prologue scan of the gaps left between functions.
Import thunks (``jmp [IAT]``, PLT stubs) are not functions: calls to them become
``called_imports``. See docs/function-recovery.md for the measurements behind each step.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from earmark.config import Limits
from earmark.errors import AnalysisTimeoutError
from earmark.extract.disasm import (
    KIND_CALL,
    KIND_CONDITIONAL,
    KIND_JUMP,
    KIND_PLAIN,
    Instruction,
    InstructionDecoder,
)
from earmark.extract.image import CodeImage
from earmark.extract.jumptables import JUMP_TABLE_LOOKBACK, jump_table_targets
from earmark.extract.minhash import exact_hash, minhash_signatures, shingle_hashes
from earmark.model.sample import FunctionFeatures

# Imports after whose call execution never continues; decoding past them would glue the next
# function onto the caller. Names as they appear after "library!".
NO_RETURN_IMPORTS: Final = frozenset(
    {
        "exit",
        "_exit",
        "_Exit",
        "abort",
        "__assert_fail",
        "__stack_chk_fail",
        "__chk_fail",
        "__fortify_fail",
        "err",
        "errx",
        "verr",
        "verrx",
        "longjmp",
        "_longjmp",
        "siglongjmp",
        "pthread_exit",
        "__cxa_throw",
        "__cxa_rethrow",
        "_Unwind_Resume",
        "__cxa_bad_cast",
        "ExitProcess",
        "ExitThread",
        "FreeLibraryAndExitThread",
        "RtlExitUserThread",
        "RtlExitUserProcess",
        "_invoke_watson",
        "_invalid_parameter_noinfo_noreturn",
        "__report_rangecheckfailure",
        "_assert",
        "_wassert",
        "terminate",
        "_CxxThrowException",
    }
)

# Longest string read at a referenced address; longer runs are data blobs, not messages.
MAX_REFERENCED_STRING_CHARS: Final = 256
# Shortest referenced string kept: 4 keeps short format strings ("%s\n" is 3) and API
# names ("Sleep" is 5) while dropping most byte tables that happen to be printable.
MIN_REFERENCED_STRING_CHARS: Final = 4

# Padding compilers put between functions: int3 (MSVC), nop forms (gcc/clang), zero bytes.
_PADDING_MNEMONICS: Final = frozenset({"int3", "nop"})

# First instructions that mark a function start in a gap reached only through pointers.
# Measured on the fixtures: these cover every function-pointer-only function of the gcc,
# clang and mingw builds, and none of them begins a `.cold` fragment.
_PROLOGUE_TOKENS: Final = frozenset(
    {"endbr64", "endbr32", "push r64", "push r32", "sub sp,0x", "mov r64,sp", "mov r32,sp"}
)

# Rounds of the start heuristics; a gap scan finds at most one more function per gap and
# round. Measured on the mingw32 fixtures and corpus DLLs: rounds after the fourth find nothing.
MAX_HEURISTIC_PASSES: Final = 8

# Function entry alignment gcc, clang, mingw and MSVC use for -O2 code (-falign-functions=16).
FUNCTION_ALIGNMENT: Final = 16

# Source labels, in order of trust; the first one that finds a start names it.
SOURCE_ORDER: Final = (
    "symbol",
    "export",
    "entry",
    "unwind",
    "call",
    "tail",
    "reference",
    "prologue",
)


@dataclass(slots=True)
class FunctionBody:
    """The instructions reached from one start, with the control flow needed for features."""

    start: int
    source: str
    instructions: dict[int, Instruction] = field(default_factory=dict)
    leaders: set[int] = field(default_factory=set)
    successors: dict[int, tuple[int, ...]] = field(default_factory=dict)
    calls: list[int] = field(default_factory=list)
    tail_jumps: list[int] = field(default_factory=list)
    called_imports: list[str] = field(default_factory=list)
    invalid: bool = False  # reached bytes that do not decode
    truncated: bool = False  # hit max_instructions_per_function


class FunctionRecovery:
    """One recovery run over one image; use ``recover_functions`` instead of this directly."""

    def __init__(self, image: CodeImage, limits: Limits, deadline: float) -> None:
        self.image = image
        self.limits = limits
        self.deadline = deadline
        self.decoder = InstructionDecoder(image)
        self.warnings: list[str] = []
        self.sources: dict[int, str] = {}
        self.bodies: dict[int, FunctionBody] = {}
        self.queue: deque[int] = deque()
        self._thunks: dict[int, str | None] = {}
        self._limit_warned = False
        self._extents: list[tuple[int, int]] = []
        self._extent_starts: list[int] = []

    # --- start discovery -----------------------------------------------------------------

    def propose(self, address: int, source: str) -> None:
        if address in self.sources or not self.decoder.is_code(address):
            return
        segment = self.decoder.segment_at(address)
        if segment is not None and segment.name.startswith(".plt"):
            return  # ELF PLT: import stubs only (their unwind entry covers the whole section)
        if self.import_thunk(address) is not None:
            return
        self.sources[address] = source
        self.queue.append(address)

    def import_thunk(self, address: int) -> str | None:
        """ "lib!name" when ``address`` is an import stub (PLT entry, ``jmp [IAT]``)."""
        if address in self._thunks:
            return self._thunks[address]
        name = self.image.import_slots.get(address)
        if name is None:
            instruction = self.decoder.decode(address)
            if instruction is not None and instruction.mnemonic in ("endbr64", "endbr32"):
                instruction = self.decoder.decode(address + instruction.size)
            if (
                instruction is not None
                and instruction.kind == KIND_JUMP
                and instruction.memory_address is not None
            ):
                name = self.image.import_slots.get(instruction.memory_address)
        self._thunks[address] = name
        return name

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise AnalysisTimeoutError(
                f"function recovery exceeded the time budget after {len(self.bodies)} functions"
            )

    def drain(self) -> None:
        while self.queue:
            start = self.queue.popleft()
            if start in self.bodies:
                continue
            if len(self.bodies) >= self.limits.max_functions:
                if not self._limit_warned:
                    self.warnings.append(
                        f"function limit reached: kept {self.limits.max_functions} functions"
                    )
                    self._limit_warned = True
                self.queue.clear()
                return
            self.check_deadline()
            body = self.explore(start, self.sources[start])
            if not body.instructions or (
                body.invalid and self.sources[start] in ("reference", "prologue", "tail")
            ):
                del self.sources[start]  # a guess that decodes into garbage was not code
                continue
            self.bodies[start] = body
            for target in body.calls:
                self.propose(target, "call")

    # --- descent within one function -----------------------------------------------------

    def explore(self, start: int, source: str) -> FunctionBody:
        decoder = self.decoder
        known = self.sources
        body = FunctionBody(start, source)
        instructions = body.instructions
        body.leaders.add(start)
        pending = [start]
        max_instructions = self.limits.max_instructions_per_function
        while pending:
            address = pending.pop()
            trail: list[Instruction] = []
            import_registers: dict[str, str] = {}
            while True:
                if address in instructions:
                    body.leaders.add(address)
                    break
                if address != start and address in known:
                    break  # flowed into another function (call we did not know never returns)
                if len(instructions) >= max_instructions:
                    body.truncated = True
                    pending.clear()
                    break
                instruction = decoder.decode(address)
                if instruction is None:
                    body.invalid = True
                    break
                instructions[address] = instruction
                trail.append(instruction)
                kind = instruction.kind
                following = address + instruction.size
                if kind == KIND_PLAIN:
                    memory = instruction.memory_address
                    if memory is not None and instruction.mnemonic == "mov":
                        name = self.image.import_slots.get(memory)
                        if name is not None:  # mov esi, [IAT]; call esi (MSVC x86)
                            import_registers[instruction.op_str.split(", ", 1)[0]] = name
                    address = following
                    continue
                if kind == KIND_CALL:
                    name = self._called_import(instruction, import_registers)
                    if name is not None:
                        body.called_imports.append(name)
                        if name.rsplit("!", 1)[-1] in NO_RETURN_IMPORTS:
                            break
                    elif instruction.target is not None and decoder.is_code(instruction.target):
                        body.calls.append(instruction.target)
                    address = following
                    continue
                if kind == KIND_CONDITIONAL:
                    target = instruction.target
                    if target is not None and decoder.is_code(target):
                        body.leaders.add(target)
                        pending.append(target)
                        body.successors[address] = (target, following)
                    else:
                        body.successors[address] = (following,)
                    body.leaders.add(following)
                    address = following
                    continue
                if kind == KIND_JUMP:
                    self._follow_jump(body, instruction, trail, import_registers, known, pending)
                break  # KIND_END and every jump end the run
        return body

    def _called_import(self, call: Instruction, import_registers: dict[str, str]) -> str | None:
        if call.target is not None:
            return self.import_thunk(call.target)
        if call.memory_address is not None:
            return self.image.import_slots.get(call.memory_address)
        return import_registers.get(call.op_str)

    def _follow_jump(
        self,
        body: FunctionBody,
        jump: Instruction,
        trail: list[Instruction],
        import_registers: dict[str, str],
        known: dict[int, str],
        pending: list[int],
    ) -> None:
        target = jump.target
        if target is not None:
            if (target in known and target != body.start) or not self.decoder.is_code(target):
                body.tail_jumps.append(target)
                return
            name = self.import_thunk(target)
            if name is not None:
                body.called_imports.append(name)
                return
            body.leaders.add(target)
            body.successors[jump.address] = (target,)
            pending.append(target)
            return
        if jump.memory_address is not None:
            name = self.image.import_slots.get(jump.memory_address)
            if name is not None:
                body.called_imports.append(name)
                return
        elif jump.op_str in import_registers:
            body.called_imports.append(import_registers[jump.op_str])
            return
        cases = jump_table_targets(self.decoder, jump, trail[-JUMP_TABLE_LOOKBACK:])
        if cases:
            unique = tuple(dict.fromkeys(cases))
            body.successors[jump.address] = unique
            for case in unique:
                body.leaders.add(case)
                pending.append(case)

    # --- heuristics for starts descent cannot see ----------------------------------------

    def propose_tail_targets(self) -> None:
        """A jmp that crosses another function's start leaves its own function: a tail call."""
        starts = sorted(self.sources)
        owners: dict[int, int] = {}
        shared: set[int] = set()
        for body in self.bodies.values():
            for address in body.instructions:
                if owners.setdefault(address, body.start) != body.start:
                    shared.add(address)
        for body in list(self.bodies.values()):
            for address, successors in body.successors.items():
                jump = body.instructions[address]
                if jump.kind != KIND_JUMP or jump.target is None or len(successors) != 1:
                    continue
                low, high = sorted((jump.address, jump.target))
                first = bisect.bisect_right(starts, low)
                # A target another function reaches by its own flow is a shared tail or a
                # cold fragment jumping home, not a function entry.
                foreign = jump.target in shared or owners.get(jump.target, body.start) != body.start
                if first < len(starts) and starts[first] <= high and not foreign:
                    self.propose(jump.target, "tail")

    def propose_references(self) -> None:
        """Code addresses taken as data (lea/push/mov imm) outside every known function."""
        covered = self.covered_lookup()
        for body in list(self.bodies.values()):
            for instruction in body.instructions.values():
                candidates = list(instruction.address_immediates)
                if instruction.mnemonic == "lea" and instruction.memory_address is not None:
                    candidates.append(instruction.memory_address)
                for candidate in candidates:
                    if self.decoder.is_code(candidate) and not covered(candidate):
                        self.propose(candidate, "reference")

    def propose_data_pointers(self) -> None:
        """Pointer-aligned values in data segments that point at uncovered code.

        Function-pointer tables, vtables, .init_array and TLS callbacks: in 32-bit PE without
        .pdata this is the only way to see code that is never called directly.
        """
        covered = self.covered_lookup()
        width = self.image.bits // 8
        for segment in self.image.segments:
            if segment.executable:
                continue
            data = segment.data
            for offset in range(0, len(data) - width + 1, width):
                value = int.from_bytes(data[offset : offset + width], "little")
                if value and self.decoder.is_code(value) and not covered(value):
                    self.propose(value, "reference")

    def propose_gap_prologues(self) -> None:
        """First instruction after padding in an uncovered gap, when it looks like a prologue."""
        covered_ends = self._covered_ranges()
        self._extents = sorted(
            (body.start, max(i.address + i.size for i in body.instructions.values()))
            for body in self.bodies.values()
            if body.instructions
        )
        self._extent_starts = [start for start, _end in self._extents]
        for segment in self.image.segments:
            if not segment.executable:
                continue
            segment_end = segment.virtual_address + len(segment.data)
            cursor = segment.virtual_address
            for range_start, range_end in covered_ends:
                if range_end <= segment.virtual_address or range_start >= segment_end:
                    continue
                if range_start > cursor:
                    self._scan_gap(cursor, min(range_start, segment_end))
                cursor = max(cursor, range_end)
            if cursor < segment_end:
                self._scan_gap(cursor, segment_end)

    def _scan_gap(self, start: int, end: int) -> None:
        address = start
        skipped_padding = False
        while address < end:
            instruction = self.decoder.decode(address)
            if instruction is None:
                if self.decoder.read(address, 1) == b"\x00":
                    address += 1
                    skipped_padding = True
                    continue
                return
            if instruction.mnemonic in _PADDING_MNEMONICS or _is_padding(instruction):
                address += instruction.size
                skipped_padding = True
                continue
            # Compilers align function entries to 16 bytes with padding before them; code
            # there that decodes cleanly to its end is an unreferenced (dead or pointer-only)
            # function. The descent rejects it if it runs into bytes that do not decode.
            aligned_after_padding = (
                skipped_padding
                and address % FUNCTION_ALIGNMENT == 0
                and not self._inside_extent(address)  # aligned switch cases, cold blocks
            )
            if (
                aligned_after_padding
                or instruction.token in _PROLOGUE_TOKENS
                or instruction.token.startswith("sub sp,")
            ):
                self.propose(address, "prologue")
            return

    def _inside_extent(self, address: int) -> bool:
        index = bisect.bisect_right(self._extent_starts, address) - 1
        return index >= 0 and address < self._extents[index][1]

    def covered_lookup(self) -> Callable[[int], bool]:
        """A test for "inside some recovered instruction", by bisection over merged ranges."""
        ranges = self._covered_ranges()
        starts = [low for low, _high in ranges]

        def covered(address: int) -> bool:
            index = bisect.bisect_right(starts, address) - 1
            return index >= 0 and address < ranges[index][1]

        return covered

    def _covered_ranges(self) -> list[tuple[int, int]]:
        ranges = sorted(
            (i.address, i.address + i.size)
            for body in self.bodies.values()
            for i in body.instructions.values()
        )
        merged: list[tuple[int, int]] = []
        for low, high in ranges:
            if merged and low <= merged[-1][1]:
                if high > merged[-1][1]:
                    merged[-1] = (merged[-1][0], high)
            else:
                merged.append((low, high))
        return merged

    def drop_unwind_fragments(self) -> None:
        """Unwind entries that other functions only reach by a jcc are split-off cold blocks.

        gcc gives ``foo.cold`` its own FDE (MSVC chained .pdata entries do the same); the
        parent already contains those blocks through its conditional jumps.
        """
        jumped: set[int] = set()
        called: set[int] = set()
        for body in self.bodies.values():
            called.update(body.calls)
            for address, successors in body.successors.items():
                # Only conditional jumps: an unconditional jmp to an unwind start is a tail
                # call (MSVC emits many), while cold blocks are entered by a jcc.
                if body.instructions[address].kind == KIND_CONDITIONAL:
                    jumped.update(s for s in successors if s != body.start)
        for start in list(self.bodies):
            if self.sources[start] == "unwind" and start in jumped and start not in called:
                del self.bodies[start]

    def reexplore_overlapping(self) -> None:
        """Functions explored before a start inside them was known are cut at that start."""
        for start, body in list(self.bodies.items()):
            if any(a in self.sources and a != start for a in body.instructions):
                self.check_deadline()
                self.bodies[start] = self.explore(start, body.source)

    def run(self) -> list[FunctionBody]:
        for symbol in self.image.symbol_functions:
            self.propose(symbol.address, "symbol")
        for address in self.image.export_addresses:
            self.propose(address, "export")
        for address in self.image.entry_points:
            self.propose(address, "entry")
        for address in self.image.exception_starts:
            self.propose(address, "unwind")
        self.drain()
        # Each heuristic can reveal starts another one then builds on (a pointer-only function
        # that tail-jumps; a gap function that ends where the next gap function begins).
        for _ in range(MAX_HEURISTIC_PASSES):
            known = len(self.sources)
            for step in (
                self.propose_tail_targets,
                self.propose_references,
                self.propose_data_pointers,
                self.propose_gap_prologues,
            ):
                self.reexplore_overlapping()
                step()
                self.drain()
            if len(self.sources) == known:
                break
        self.reexplore_overlapping()
        self.drop_unwind_fragments()
        truncated = sum(1 for body in self.bodies.values() if body.truncated)
        if truncated:
            self.warnings.append(
                f"{truncated} functions cut at {self.limits.max_instructions_per_function} "
                "instructions"
            )
        return [self.bodies[start] for start in sorted(self.bodies)]


def recover_functions(
    image: CodeImage, limits: Limits, deadline: float
) -> tuple[tuple[FunctionFeatures, ...], tuple[str, ...]]:
    """Find the functions of ``image`` and compute their features, sorted by address.

    Returns (functions, warnings); raises AnalysisTimeoutError once ``time.monotonic()``
    passes ``deadline`` (checked between functions).
    """
    recovery = FunctionRecovery(image, limits, deadline)
    bodies = recovery.run()
    names = {symbol.address: symbol.name for symbol in image.symbol_functions}
    functions = _build_features(recovery, bodies, names)
    return functions, tuple(recovery.warnings)


def _build_features(
    recovery: FunctionRecovery, bodies: list[FunctionBody], names: dict[int, str]
) -> tuple[FunctionFeatures, ...]:
    decoder = recovery.decoder
    strings_at: dict[int, str | None] = {}
    streams: list[tuple[str, ...]] = []
    for body in bodies:
        recovery.check_deadline()
        streams.append(tuple(body.instructions[a].token for a in sorted(body.instructions)))
    signatures = minhash_signatures([shingle_hashes(stream) for stream in streams])
    functions: list[FunctionFeatures] = []
    for body, stream, signature in zip(bodies, streams, signatures, strict=True):
        recovery.check_deadline()
        ordered = [body.instructions[a] for a in sorted(body.instructions)]
        last = max(ordered, key=lambda i: i.address + i.size)
        edge_count = 0
        for instruction in ordered:
            successors = body.successors.get(instruction.address)
            if successors is not None:
                edge_count += sum(1 for s in successors if s in body.instructions)
            elif instruction.kind in (KIND_PLAIN, KIND_CALL):
                following = instruction.address + instruction.size
                if following in body.leaders and following in body.instructions:
                    edge_count += 1
        strings: list[str] = []
        constants: list[int] = []
        for instruction in ordered:
            references = list(instruction.address_immediates)
            if instruction.memory_address is not None and instruction.kind == KIND_PLAIN:
                references.append(instruction.memory_address)
            for reference in references:
                if reference not in strings_at:
                    strings_at[reference] = _read_string(decoder, reference)
                text = strings_at[reference]
                if text is not None:
                    strings.append(text)
            constants.extend(v for v in instruction.large_immediates if _is_distinctive(v))
        functions.append(
            FunctionFeatures(
                address=body.start,
                size=last.address + last.size - body.start,
                block_count=sum(1 for a in body.leaders if a in body.instructions),
                edge_count=edge_count,
                instruction_count=len(ordered),
                exact_hash=exact_hash(stream),
                minhash=tuple(int(v) for v in signature),
                normalized=stream,
                calls=tuple(sorted(set(body.calls))),
                called_imports=tuple(dict.fromkeys(body.called_imports)),
                strings=tuple(dict.fromkeys(strings)),
                constants=tuple(dict.fromkeys(constants)),
                name=names.get(body.start),
                source=body.source,
            )
        )
    return tuple(functions)


def _is_padding(instruction: Instruction) -> bool:
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


def _is_distinctive(value: int) -> bool:
    """Large immediates other than powers of two and all-ones masks (0xFFFF, 0x7FFFFFFF)."""
    return value & (value - 1) != 0 and value & (value + 1) != 0


def _read_string(decoder: InstructionDecoder, address: int) -> str | None:
    """A NUL-terminated ASCII or UTF-16LE string at ``address``, or None."""
    raw = decoder.read(address, MAX_REFERENCED_STRING_CHARS * 2 + 2)
    if not raw:
        return None
    end = raw.find(b"\x00", 0, MAX_REFERENCED_STRING_CHARS + 1)
    if end >= MIN_REFERENCED_STRING_CHARS and _printable(raw[:end]):
        return raw[:end].decode("ascii")
    end = raw.find(b"\x00\x00")
    while end > 0 and end % 2:  # the terminator is aligned to the 2-byte units
        end = raw.find(b"\x00\x00", end + 1)
    if end >= MIN_REFERENCED_STRING_CHARS * 2:
        units = raw[:end]
        if all(b == 0 for b in units[1::2]) and _printable(units[0::2]):
            return units[0::2].decode("ascii")
    return None


def _printable(data: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in data)
