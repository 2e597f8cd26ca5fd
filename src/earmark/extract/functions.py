"""Function recovery on (possibly stripped) x86/x86-64 code: where functions start and what
they contain. The start heuristics live in ``function_starts``, per-function features in
``function_features``; this module orders them and runs the descent.

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
from typing import Any, Final

from earmark.config import Limits
from earmark.errors import AnalysisTimeoutError
from earmark.extract.disasm import (
    KIND_CALL,
    KIND_CONDITIONAL,
    KIND_JUMP,
    KIND_PLAIN,
    Instruction,
    InstructionDecoder,
    drop_shared_analyses,
)
from earmark.extract.function_features import FunctionBody, build_features, drop_token_caches
from earmark.extract.function_starts import (
    SHARED_OWNER,
    CodeCoverage,
    data_code_pointers,
    gap_prologue,
    is_lazy_binding_stub,
    referenced_code,
    tail_call_targets,
)
from earmark.extract.image import CodeImage
from earmark.extract.jumptables import JUMP_TABLE_LOOKBACK, jump_table_targets
from earmark.memory import cyclic_collector_paused
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

# Rounds of the start heuristics; a gap scan finds at most one more function per gap and
# round. Measured on the mingw32 fixtures and corpus DLLs: rounds after the fourth find nothing.
MAX_HEURISTIC_PASSES: Final = 8

# Sources that name a function outright; every other source is checked against stub shapes.
_TRUSTED_SOURCES: Final = frozenset({"symbol", "export", "entry"})

# Starts guessed by the heuristic rounds, not read from the image or a direct call.
_GUESS_SOURCES: Final = frozenset({"tail", "reference", "prologue"})

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
        self._thunks: dict[int, str | None] = {}  # import_thunk without the compiled table
        # The compiled table reads import slots from a dict (explore, import_thunk).
        slots = image.import_slots
        self._import_slots = slots if isinstance(slots, dict) else dict(slots)
        self._limit_warned = False
        self.coverage = CodeCoverage(self.decoder)
        # Starts proposed since the last re-exploration check (see reexplore_overlapping).
        self._new_starts: list[int] = []
        self._reference_scanned: set[int] = set()
        self._gaps_scanned: set[tuple[int, int]] = set()
        self._data_pointers: list[int] | None = None
        # PE chained .pdata entries: parts of the function at their root entry, explored as
        # part of it rather than as functions of their own (see docs, "Where starts come from").
        self._fragment_function = {r.begin: r.function for r in image.exception_ranges if r.chained}
        self._fragments_of: dict[int, list[int]] = {}
        for begin, function in sorted(self._fragment_function.items(), reverse=True):
            self._fragments_of.setdefault(function, []).append(begin)  # popped lowest first
        # .pdata ranges for refusing guesses inside a function; an entry overlapping the one
        # before it is ignored, so hostile unwind data cannot blanket the image.
        self._unwind_begins: list[int] = []
        self._unwind_ends: list[int] = []
        for unwind in image.exception_ranges:
            if self._unwind_ends and unwind.begin < self._unwind_ends[-1]:
                continue
            self._unwind_begins.append(unwind.begin)
            self._unwind_ends.append(unwind.end)

    # --- start discovery -----------------------------------------------------------------

    def propose(self, address: int, source: str) -> None:
        if address in self.sources or not self.decoder.is_code(address):
            return
        if any(low <= address < high for low, high in self.image.plt_ranges):
            return  # ELF PLT: import stubs only (their unwind entry covers the whole section)
        if self.import_thunk(address) is not None:
            return
        if source not in _TRUSTED_SOURCES and (
            address in self._fragment_function or is_lazy_binding_stub(self.decoder, address)
        ):
            # A chained .pdata part belongs to its function; ELF PLT0 / lazy-binding entries
            # are named by their FDE and GOT pointers but are not functions.
            return
        if source in _GUESS_SOURCES and self._inside_unwind_range(address):
            return  # no function starts inside another's .pdata range
        self.sources[address] = source
        table = self.decoder.table
        if table is not None:  # explore in C reads the known starts from the table
            table.mark_start(address, True)
        self.queue.append(address)
        self._new_starts.append(address)

    def _inside_unwind_range(self, address: int) -> bool:
        """True strictly inside a .pdata entry: [begin, end) is one function's code."""
        index = bisect.bisect_right(self._unwind_begins, address) - 1
        return index >= 0 and self._unwind_begins[index] < address < self._unwind_ends[index]

    def import_thunk(self, address: int) -> str | None:
        """ "lib!name" when ``address`` is an import stub (PLT entry, ``jmp [IAT]``)."""
        table = self.decoder.table
        if table is not None:  # the same reading in C, cached there for explore's calls too
            thunk: str | None = table.import_thunk(address, self._import_slots)
            return thunk
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
                table = self.decoder.table
                if table is not None:
                    table.mark_start(start, False)
                continue
            self.bodies[start] = body
            self.coverage.add(body)
            for target in body.calls:
                self.propose(target, "call")

    # --- descent within one function -----------------------------------------------------

    def explore(self, start: int, source: str) -> FunctionBody:
        table = self.decoder.table
        if table is not None:
            return self._explore_compiled(table, start, source)
        decoder = self.decoder
        decoded = decoder.decoded.get  # inline cache hit: skips a method call per instruction
        known = self.sources
        instructions: dict[int, Instruction] = {}
        body = FunctionBody(start, source, instructions)
        body.leaders.add(start)
        pending = [start]
        # Parts the unwind table assigns to this function, explored once its own flow is done
        # (only those the flow did not reach, so reached parts do not become extra leaders).
        fragments = list(self._fragments_of.get(start, ()))
        max_instructions = self.limits.max_instructions_per_function
        import_slots = self.image.import_slots
        while pending or fragments:
            if not pending:
                fragment = fragments.pop()
                if fragment not in instructions and fragment not in known and not body.truncated:
                    body.leaders.add(fragment)
                    pending.append(fragment)
                continue
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
                instruction = decoded(address) or decoder.decode(address)
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
                        name = import_slots.get(memory)
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

    def _explore_compiled(self, table: Any, start: int, source: str) -> FunctionBody:
        """``explore`` over the compiled instruction table (same rules, step by step; the
        loop above is the reference): the body's instructions stay rows of the table, and its
        leaders and successors stay in C (``leaders``/``successors`` are left empty; what is
        read from them later, the block and edge counts and the conditional branches'
        targets, comes from the Body). The starts it must not flow into are the table's
        (``mark_start``, kept in step with ``sources`` by propose and drain)."""
        body = FunctionBody(start, source)
        instructions, body.invalid, body.truncated = table.explore(
            start,
            self.limits.max_instructions_per_function,
            list(self._fragments_of.get(start, ())),
            self._import_slots,
            NO_RETURN_IMPORTS,
            self._follow_indirect_jump,
            body,
            JUMP_TABLE_LOOKBACK,
        )
        body.instructions = instructions
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
            body.direct_jumps.append((jump.address, target))
            pending.append(target)
            return
        recent = trail[-JUMP_TABLE_LOOKBACK:]
        self._follow_indirect_jump(body, jump, recent, import_registers, pending)

    def _follow_indirect_jump(
        self,
        body: FunctionBody,
        jump: Instruction,
        recent: list[Instruction],
        import_registers: dict[str, str],
        pending: list[int],
    ) -> None:
        """A jmp through a register or memory: an import, or a jump table's cases, or nothing
        (``recent``: the run's last JUMP_TABLE_LOOKBACK instructions, the jump last)."""
        if jump.memory_address is not None:
            name = self.image.import_slots.get(jump.memory_address)
            if name is not None:
                body.called_imports.append(name)
                return
        elif jump.op_str in import_registers:
            body.called_imports.append(import_registers[jump.op_str])
            return
        cases = jump_table_targets(self.decoder, jump, recent)
        if cases:
            unique = tuple(dict.fromkeys(cases))
            body.successors[jump.address] = unique
            for case in unique:
                body.leaders.add(case)
                pending.append(case)

    # --- heuristics for starts descent cannot see (function_starts.py) --------------------

    def propose_tail_targets(self) -> None:
        starts = sorted(self.sources)
        for target in tail_call_targets(list(self.bodies.values()), starts, self.coverage):
            self.propose(target, "tail")

    def propose_references(self) -> None:
        """Code addresses taken as data outside every known function (each body scanned once:
        coverage only grows, so a reference covered now stays covered)."""
        covered = self.coverage.covered
        for start, body in list(self.bodies.items()):
            if start in self._reference_scanned:
                continue
            self._reference_scanned.add(start)
            for candidate in referenced_code(body, self.decoder):
                if not covered(candidate):
                    self.propose(candidate, "reference")

    def propose_data_pointers(self) -> None:
        if self._data_pointers is None:
            self._data_pointers = data_code_pointers(self.image)
        covered = self.coverage.covered
        for value in self._data_pointers:
            if value not in self.sources and not covered(value):
                self.propose(value, "reference")

    def propose_gap_prologues(self) -> None:
        """A prologue (or aligned code after padding) first in a gap; each gap looked at once."""
        for low, high in list(self.coverage.gaps()):
            if (low, high) in self._gaps_scanned:
                continue
            self._gaps_scanned.add((low, high))
            start = gap_prologue(self.decoder, low, high, self.coverage)
            if start is not None:
                self.propose(start, "prologue")

    def drop_unwind_fragments(self) -> None:
        """Unwind entries that other functions only reach by a jcc are split-off cold blocks.

        gcc gives ``foo.cold`` its own FDE (MSVC chained .pdata entries do the same); the
        parent already contains those blocks through its conditional jumps.
        """
        jumped: set[int] = set()
        called: set[int] = set()
        for body in self.bodies.values():
            called.update(body.calls)
            instructions = body.instructions
            if not isinstance(instructions, dict):  # the compiled explore kept them in C
                jumped.update(instructions.conditional_targets())
                continue
            for address, successors in body.successors.items():
                # Only conditional jumps: an unconditional jmp to an unwind start is a tail
                # call (MSVC emits many), while cold blocks are entered by a jcc.
                if instructions[address].kind == KIND_CONDITIONAL:
                    jumped.update(s for s in successors if s != body.start)
        for start in list(self.bodies):
            if self.sources[start] == "unwind" and start in jumped and start not in called:
                del self.bodies[start]

    def reexplore_overlapping(self) -> None:
        """Functions explored before a start inside them was known are cut at that start.

        Only starts proposed since the last call are looked up, in the ownership map.
        """
        new_starts, self._new_starts = self._new_starts, []
        for start in new_starts:
            if start not in self.sources:
                continue  # a rejected guess
            owner = self.coverage.owner_of(start)
            if owner is None or owner == start:
                continue
            if owner == SHARED_OWNER:
                containing = [b for b in self._starts_containing(start) if b != start]
            else:
                containing = [owner]
            for body_start in containing:
                body = self.bodies.get(body_start)
                if body is None or start not in body.instructions:
                    continue
                self.check_deadline()
                self.coverage.remove(body)
                replacement = self.explore(body_start, body.source)
                self.bodies[body_start] = replacement
                self.coverage.add(replacement)

    def _starts_containing(self, address: int) -> list[int]:
        """Starts of the functions whose instructions hold ``address``, in ``bodies`` order."""
        accelerator = self.decoder.accelerator
        if accelerator is not None:
            found: list[int] = accelerator.starts_containing(self.bodies, address)
            return found
        return [b for b, body in self.bodies.items() if address in body.instructions]

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
    with cyclic_collector_paused():
        return _recover_and_describe(image, limits, deadline)


def _recover_and_describe(
    image: CodeImage, limits: Limits, deadline: float
) -> tuple[tuple[FunctionFeatures, ...], tuple[str, ...]]:
    # A function of its own so that the decoder cache and the bodies are freed (by reference
    # counting) when it returns, before the cyclic collector is switched back on: otherwise
    # its first run would walk all of them once more.
    recovery = FunctionRecovery(image, limits, deadline)
    bodies = recovery.run()
    warnings = tuple(recovery.warnings)
    decoder = recovery.decoder
    # Features need only the bodies and the image bytes: the decode cache (every instruction
    # decoded, ~100 MB on a 3,000-function DLL), the ownership map and the rest of the
    # recovery state go before features are built, so their memory is not held at the peak.
    decoder.release_caches()
    del recovery
    names = {symbol.address: symbol.name for symbol in image.symbol_functions}
    found = len(bodies)

    def check_deadline() -> None:
        if time.monotonic() > deadline:
            raise AnalysisTimeoutError(
                f"function recovery exceeded the time budget after {found} functions"
            )

    functions = build_features(bodies, decoder, names, check_deadline)
    return functions, warnings


def drop_shared_caches() -> None:
    """Empty every cache function recovery and feature building keep between samples.

    For a process that is done analysing (a query about to be matched, a worker going idle):
    the instruction-text analyses of the Python path (disasm.SHARED_ANALYSES_LIMIT) and the
    per-token answers of the feature pass (MinHash ids, robust tokens, immediates). Analysis
    works the same afterwards, refilling them as it goes.
    """
    drop_shared_analyses()
    drop_token_caches()
