"""Per-function features from recovered bodies: token stream, hashes, CFG counts, references.

``build_features`` turns every ``FunctionBody`` of a sample into a frozen ``FunctionFeatures``.
Each function is first described by one pass over its instructions in address order (in C,
``Body.describe``, for bodies of the compiled table; ``_describe_in_python`` otherwise); the
descriptions are then taken in batches of ``FEATURE_BATCH_TOKENS`` instructions whose MinHash
signatures are computed in one numpy pass (``minhash``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Final, NamedTuple, Protocol

import numpy as np

from earmark.extract.disasm import KIND_CALL, KIND_PLAIN, Instruction, InstructionDecoder
from earmark.extract.minhash import (
    compiled_id_signatures,
    drop_token_ids,
    exact_hash,
    stream_minhash_signatures,
    token_id,
)
from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures

# Longest string read at a referenced address; longer runs are data blobs, not messages.
MAX_REFERENCED_STRING_CHARS: Final = 256
# Shortest referenced string kept: 4 keeps short format strings ("%s\n" is 3) and API
# names ("Sleep" is 5) while dropping most byte tables that happen to be printable.
MIN_REFERENCED_STRING_CHARS: Final = 4
# Instructions whose functions are described together: MinHash runs once per batch (numpy
# calls per function cost more than the arithmetic for a 50-token function) and the batch's
# bodies are freed when it is done. Measured on pillow _imaging (428k instructions; feature
# stage CPU s, memory over its start): 2^14 0.43 s +5 MB, 2^16 0.42-0.43 s +12 MB,
# 2^18 0.44-0.45 s +46 MB, whole sample (as before) 0.45-0.48 s +75 MB.
FEATURE_BATCH_TOKENS: Final = 1 << 16


class CompiledBody(Protocol):
    """A function's instructions as rows of the compiled instruction table (``_native.Body``,
    made by FunctionRecovery.explore): a read-only mapping address -> Instruction whose
    Instructions are built on demand, plus the per-instruction passes done in C."""

    def __len__(self) -> int: ...
    def __contains__(self, address: object) -> bool: ...
    def __getitem__(self, address: int) -> Instruction: ...
    def __iter__(self) -> Iterator[int]: ...
    def values(self) -> list[Instruction]: ...
    def conditional_targets(self) -> list[int]: ...
    def counts(self) -> tuple[int, int]: ...
    def own(self, start: int) -> None: ...
    def disown(self, start: int) -> None: ...
    def cover(self) -> int | None: ...
    def referenced_code(self) -> list[int]: ...
    def describe(
        self,
        start: int,
        token_features: Callable[[str], tuple[int, int | None, tuple[int, ...]]],
        known: dict[str, tuple[int, int | None, tuple[int, ...]]] = ...,
        /,
    ) -> tuple[tuple[str, ...], int, list[int], list[int], bytes, bytes, tuple[int, ...]]: ...


@dataclass(slots=True)
class FunctionBody:
    """The instructions reached from one start, with the control flow needed for features."""

    start: int
    source: str
    # A dict on the pure-Python path; with the compiled table (disasm.ACCELERATOR) the rows
    # FunctionRecovery.explore took from it.
    instructions: dict[int, Instruction] | CompiledBody = field(default_factory=dict)
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
    """Features of ``bodies`` (already sorted by start); ``check_deadline`` may raise.

    Consumes ``bodies``. Bodies of the compiled table are all described first (token stream,
    counts, references, token ids: compact) and dropped, so the table, which the last body
    keeps alive, is freed before the features, most of what the analysis keeps, are built.
    Python bodies are described batch by batch and dropped as they go, so each body's
    instructions are freed once its function is described.
    """
    strings_at: dict[int, str | None] = {}
    functions: list[FunctionFeatures] = []
    compiled = not any(isinstance(body.instructions, dict) for body in bodies)
    # The compiled MinHash when the bodies are the compiled table's (their ids are at hand).
    accelerator = decoder.accelerator if compiled else None
    descriptions: list[_Description] = []
    if compiled:
        # Popped one by one (from the end of the reversed list, so in order): each body, and
        # with the last one the table, is freed as soon as it is described.
        bodies.reverse()
        while bodies:
            check_deadline()
            descriptions.append(_describe_compiled(bodies.pop(), decoder, strings_at))
    while bodies or descriptions:
        tokens = 0
        count = 0
        if compiled:
            while count < len(descriptions) and tokens < FEATURE_BATCH_TOKENS:
                tokens += len(descriptions[count].stream)
                count += 1
            batch = descriptions[:count]
            del descriptions[:count]
        else:
            while count < len(bodies) and tokens < FEATURE_BATCH_TOKENS:
                tokens += len(bodies[count].instructions)
                count += 1
            batch = []
            for body in bodies[:count]:
                check_deadline()
                batch.append(_describe_in_python(body, decoder, strings_at))
            del bodies[:count]
        functions.extend(_features_of_batch(batch, names, check_deadline, accelerator))
    return tuple(functions)


class _Description(NamedTuple):
    """What features are built from, for one function (its body already dropped)."""

    start: int
    source: str
    calls: list[int]
    called_imports: list[str]
    stream: tuple[str, ...]
    end: int
    block_count: int
    edge_count: int
    strings: list[str]
    constants: list[int]
    immediates: tuple[int, ...]
    token_ids: bytes  # uint64 MinHash ids of the stream (compiled path only)
    robust_ids: bytes  # ... and of its robust tokens that are kept


def _describe_compiled(
    body: FunctionBody, decoder: InstructionDecoder, strings_at: dict[int, str | None]
) -> _Description:
    """The description of a body of the compiled table (one pass in C)."""
    instructions = body.instructions
    assert not isinstance(instructions, dict)
    stream, end, references, large, ids, robust, immediates = instructions.describe(
        body.start, token_features, _TOKEN_FEATURES
    )
    block_count, edge_count = instructions.counts()
    return _Description(
        body.start,
        body.source,
        body.calls,
        body.called_imports,
        stream,
        end,
        block_count,
        edge_count,
        _referenced_strings(decoder, references, strings_at),
        [v for v in large if _is_distinctive(v)],
        immediates,
        ids,
        robust,
    )


def _features_of_batch(
    batch: list[_Description],
    names: dict[int, str],
    check_deadline: Callable[[], None],
    accelerator: ModuleType | None,
) -> list[FunctionFeatures]:
    """Features of a batch of described functions; MinHash runs once over the whole batch."""
    signatures: list[tuple[int, ...]]
    robust_signatures: list[tuple[int, ...]]
    if accelerator is not None:
        signatures = _id_signatures(accelerator, [d.token_ids for d in batch])
        robust_signatures = _id_signatures(accelerator, [d.robust_ids for d in batch])
    else:
        streams = [d.stream for d in batch]
        signatures = [tuple(s) for s in stream_minhash_signatures(streams).tolist()]
        robust = stream_minhash_signatures([robust_stream(s) for s in streams])
        robust_signatures = [tuple(s) for s in robust.tolist()]
    functions: list[FunctionFeatures] = []
    for description, signature, robust_signature in zip(
        batch, signatures, robust_signatures, strict=True
    ):
        check_deadline()
        stream = description.stream
        functions.append(
            FunctionFeatures(
                address=description.start,
                size=description.end - description.start,
                block_count=description.block_count,
                edge_count=description.edge_count,
                instruction_count=len(stream),
                exact_hash=exact_hash(stream),
                minhash=signature,
                normalized=stream,
                calls=tuple(sorted(set(description.calls))),
                called_imports=tuple(dict.fromkeys(description.called_imports)),
                strings=tuple(dict.fromkeys(description.strings)),
                constants=tuple(dict.fromkeys(description.constants)),
                name=names.get(description.start),
                source=description.source,
                robust_minhash=robust_signature,
                immediates=description.immediates,
            )
        )
    return functions


def _id_signatures(accelerator: ModuleType, streams: list[bytes]) -> list[tuple[int, ...]]:
    """MinHash signatures of streams given as uint64 token-id bytes (compiled), as the tuples
    FunctionFeatures holds (made in C: numpy's tolist() and a tuple() per row built each
    signature twice)."""
    lengths = np.fromiter((len(s) // 8 for s in streams), dtype=np.int64, count=len(streams))
    signatures = compiled_id_signatures(accelerator.minhash_ids, b"".join(streams), lengths)
    rows: list[tuple[int, ...]] = accelerator.uint32_rows(signatures, MINHASH_PERMUTATIONS)
    return rows


_TOKEN_FEATURES: dict[str, tuple[int, int | None, tuple[int, ...]]] = {}


def token_features(token: str) -> tuple[int, int | None, tuple[int, ...]]:
    """(MinHash id, robust token's id or None when dropped, immediates) of one token: what the
    compiled feature pass asks once per instruction text (same functions as the Python path).
    Memoised: ~85k texts of a large DLL share a few thousand tokens."""
    found = _TOKEN_FEATURES.get(token)
    if found is None:
        robust = robust_token(token)
        robust_id = None if robust is None else token_id(robust)
        found = (token_id(token), robust_id, token_immediates(token))
        _TOKEN_FEATURES[token] = found
    return found


def _referenced_strings(
    decoder: InstructionDecoder, references: list[int], strings_at: dict[int, str | None]
) -> list[str]:
    """The strings at ``references`` (in order, repeats kept); ``strings_at`` caches reads."""
    strings: list[str] = []
    for reference in references:
        if reference not in strings_at:
            strings_at[reference] = _read_string(decoder, reference)
        text = strings_at[reference]
        if text is not None:
            strings.append(text)
    return strings


def _describe_in_python(
    body: FunctionBody, decoder: InstructionDecoder, strings_at: dict[int, str | None]
) -> _Description:
    """The description of a Python body: the reference for the compiled ``Body.describe`` and
    ``Body.counts`` (same pass, strings read the same way)."""
    instructions = body.instructions
    leaders = body.leaders
    successors_of = body.successors
    ordered = [instructions[address] for address in sorted(instructions)]
    stream = tuple([instruction.token for instruction in ordered])
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
        elif kind in (KIND_PLAIN, KIND_CALL) and following in leaders and following in instructions:
            edge_count += 1
        references = instruction.address_immediates
        if instruction.memory_address is not None and kind == KIND_PLAIN:
            references = (*references, instruction.memory_address)
        strings.extend(_referenced_strings(decoder, list(references), strings_at))
        if instruction.large_immediates:
            constants.extend(v for v in instruction.large_immediates if _is_distinctive(v))
    return _Description(
        body.start,
        body.source,
        body.calls,
        body.called_imports,
        stream,
        end,
        sum(1 for a in leaders if a in instructions),
        edge_count,
        strings,
        constants,
        stream_immediates(stream),
        b"",
        b"",
    )


# Instructions an unoptimised build adds and an optimised one drops: frame set-up and
# tear-down, sign extensions of spilled values. Measured on the xcomp corpus (zlib, -O0 vs -O3):
# dropping them and register/stack moves lifts MinHash-only Recall@1 from 0.18 to 0.32
# (docs/function-similarity.md).
_FRAME_MNEMONICS: Final = frozenset(
    ("push", "pop", "lea", "nop", "leave", "endbr64", "endbr32", "cdqe", "cdq", "cqo", "cwde",
     "int3", "hlt", "ud2", "xchg")
)  # fmt: skip
_PLAIN_MOVES: Final = frozenset(("mov", "movsxd", "movzx", "movsx", "movabs"))
_STACK_MOVES: Final = frozenset(
    ("mov", "movzx", "movsx", "movsxd", "movss", "movsd", "movaps", "movups", "movq", "movd",
     "movdqa", "movdqu")
)  # fmt: skip
_ROBUST_TOKENS: dict[str, str | None] = {}


def robust_token(token: str) -> str | None:
    """The optimisation-robust form of one normalised token, or None when it is dropped.

    Register shuffles and stack spills/reloads (what -O0 adds around every statement) go; a
    memory move becomes "load" or "store"; conditional jumps, cmovs and setcc collapse to one
    class each (the compiler picks the condition's polarity); other mnemonics stay, operands go.
    """
    cached = _ROBUST_TOKENS.get(token, "")
    if cached != "":
        return cached
    mnemonic, _, operands = token.partition(" ")
    parts = operands.split(",")
    result: str | None = mnemonic
    touches_stack = "[stack]" in operands or ",sp" in operands or operands.startswith("sp")
    frame_traffic = touches_stack and (
        mnemonic in _STACK_MOVES or (mnemonic in ("add", "sub") and operands.startswith("sp"))
    )
    if mnemonic in _FRAME_MNEMONICS or frame_traffic:
        result = None
    elif mnemonic.startswith("mov"):
        if parts[0].startswith("m"):
            result = "store"
        elif len(parts) > 1 and parts[1].startswith("m"):
            result = "load"
        elif mnemonic in _PLAIN_MOVES:
            result = None
    elif mnemonic.startswith("j") and mnemonic != "jmp":
        result = "jcc"
    elif mnemonic.startswith("cmov"):
        result = "cmov"
    elif mnemonic.startswith("set"):
        result = "set"
    _ROBUST_TOKENS[token] = result
    return result


def robust_stream(tokens: Sequence[str]) -> tuple[str, ...]:
    """``robust_token`` of every token, dropped ones left out."""
    return tuple([t for t in map(robust_token, tokens) if t is not None])


# A hexadecimal or decimal operand that is not part of a register or memory-size name.
_IMMEDIATE_PATTERN: Final = re.compile(r"(?<![\w\[])(-?0x[0-9a-f]+|\b\d+\b)")
# 0, 1 and -1 appear in nearly every function (increments, flags, error returns).
_UBIQUITOUS_IMMEDIATES: Final = frozenset((0, 1, -1))
_TOKEN_IMMEDIATES: dict[str, tuple[int, ...]] = {}


def stream_immediates(tokens: Sequence[str]) -> tuple[int, ...]:
    """Distinct small immediates of a normalised stream, in first-seen order, without stack
    offsets (frame layout changes with -O level) and without 0/1/-1."""
    values: dict[int, None] = {}
    for token in tokens:
        found = _TOKEN_IMMEDIATES.get(token)
        if found is None:
            found = token_immediates(token)
        for value in found:
            values[value] = None
    return tuple(values)


def token_immediates(token: str) -> tuple[int, ...]:
    """The immediates ``stream_immediates`` takes from one token (memoised)."""
    found = _TOKEN_IMMEDIATES.get(token)
    if found is None:
        _, _, operands = token.partition(" ")
        if "[stack]" in operands or "sp" in operands.split(",")[0]:
            found = ()
        else:
            numbers = (int(text, 0) for text in _IMMEDIATE_PATTERN.findall(operands))
            found = tuple(v for v in numbers if v not in _UBIQUITOUS_IMMEDIATES)
        _TOKEN_IMMEDIATES[token] = found
    return found


def drop_token_caches() -> None:
    """Empty the per-token memos of this module and of minhash (refilled as tokens recur)."""
    _ROBUST_TOKENS.clear()
    _TOKEN_IMMEDIATES.clear()
    _TOKEN_FEATURES.clear()
    drop_token_ids()


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
        if not any(units[1::2]) and _printable(units[0::2]):
            return units[0::2].decode("ascii")
    return None


# Printable ASCII, tab and line ends: what a referenced string may hold.
_PRINTABLE_BYTES: Final = bytes(range(32, 127)) + b"\t\n\r"


def _printable(data: bytes) -> bool:
    # Deleting the allowed bytes runs in C; a generator over the bytes cost ~10x as much.
    return not data.translate(None, _PRINTABLE_BYTES)
