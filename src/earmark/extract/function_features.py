"""Per-function features from recovered bodies: token stream, hashes, CFG counts, references.

``build_features`` turns every ``FunctionBody`` of a sample into a frozen ``FunctionFeatures``.
The MinHash signatures of all functions are computed in one numpy batch
(``minhash.stream_minhash_signatures``); everything else is one pass over each function's
instructions in address order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from earmark.extract.disasm import KIND_CALL, KIND_PLAIN, Instruction, InstructionDecoder
from earmark.extract.minhash import exact_hash, stream_minhash_signatures
from earmark.model.sample import FunctionFeatures

# Longest string read at a referenced address; longer runs are data blobs, not messages.
MAX_REFERENCED_STRING_CHARS: Final = 256
# Shortest referenced string kept: 4 keeps short format strings ("%s\n" is 3) and API
# names ("Sleep" is 5) while dropping most byte tables that happen to be printable.
MIN_REFERENCED_STRING_CHARS: Final = 4


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
    # (address, target) of the direct jmps followed inside the function (tail-call candidates).
    direct_jumps: list[tuple[int, int]] = field(default_factory=list)
    called_imports: list[str] = field(default_factory=list)
    invalid: bool = False  # reached bytes that do not decode
    truncated: bool = False  # hit max_instructions_per_function


def build_features(
    bodies: list[FunctionBody],
    decoder: InstructionDecoder,
    names: dict[int, str],
    check_deadline: Callable[[], None],
) -> tuple[FunctionFeatures, ...]:
    """Features of ``bodies`` (already sorted by start); ``check_deadline`` may raise."""
    strings_at: dict[int, str | None] = {}
    ordered_bodies: list[list[Instruction]] = []
    streams: list[tuple[str, ...]] = []
    for body in bodies:
        check_deadline()
        instructions = body.instructions
        ordered = [instructions[address] for address in sorted(instructions)]
        ordered_bodies.append(ordered)
        streams.append(tuple([instruction.token for instruction in ordered]))
    signatures = stream_minhash_signatures(streams).tolist()
    functions: list[FunctionFeatures] = []
    for body, ordered, stream, signature in zip(
        bodies, ordered_bodies, streams, signatures, strict=True
    ):
        check_deadline()
        instructions = body.instructions
        leaders = body.leaders
        successors_of = body.successors
        end = body.start
        edge_count = 0
        strings: list[str] = []
        constants: list[int] = []
        for instruction in ordered:
            address = instruction.address
            following = address + instruction.size
            if following > end:
                end = following
            kind = instruction.kind
            successors = successors_of.get(address)
            if successors is not None:
                edge_count += sum(1 for s in successors if s in instructions)
            elif (
                kind in (KIND_PLAIN, KIND_CALL)
                and following in leaders
                and following in instructions
            ):
                edge_count += 1
            references = instruction.address_immediates
            if instruction.memory_address is not None and kind == KIND_PLAIN:
                references = (*references, instruction.memory_address)
            for reference in references:
                if reference not in strings_at:
                    strings_at[reference] = _read_string(decoder, reference)
                text = strings_at[reference]
                if text is not None:
                    strings.append(text)
            if instruction.large_immediates:
                constants.extend(v for v in instruction.large_immediates if _is_distinctive(v))
        functions.append(
            FunctionFeatures(
                address=body.start,
                size=end - body.start,
                block_count=sum(1 for a in leaders if a in instructions),
                edge_count=edge_count,
                instruction_count=len(ordered),
                exact_hash=exact_hash(stream),
                minhash=tuple(signature),
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
