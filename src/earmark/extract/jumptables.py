"""Cheap recovery of switch jump tables, so switch cases (and the calls inside them) are found.

Three patterns cover what gcc, clang, mingw and MSVC emit for x86 and x86-64:

* absolute table, non-PIC code:   ``jmp [index*4 + table]`` / ``jmp [index*8 + table]``
* table relative to itself (gcc/clang x86-64):
  ``lea base, [rip + table]; movsxd r, dword [base + index*4]; add r, base; jmp r``
* image-relative entries (MSVC x64): ``lea base, [rip + __ImageBase]``;
  ``mov r32, dword [base + index*4 + table_rva]; add r, base; jmp r``

The entry count comes from the bounds check (``cmp index, N; ja default``) when it is in the
same run of instructions, else entries are read while they point into the jump's own segment.
i386 PIC tables (``mov r, [ebx + index*4 + disp]; add r, ebx; jmp r``) are read relative to
the image's GOT address (``CodeImage.got_address``): the GOT register is not tracked, but the
ABI fixes its value.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Final

from earmark.extract.disasm import Instruction, InstructionDecoder, parse_scaled_memory

# Entries read per table at most. The largest switches in the corpus DLLs have ~300 cases
# (interpreter dispatch loops); 1024 bounds the cost when the count check is not found.
MAX_JUMP_TABLE_ENTRIES: Final = 1024

# Instructions looked at backwards from the jump for the table set-up and bounds check.
# Compilers keep these within the jump's block and the one before it (≤ 8 in practice).
JUMP_TABLE_LOOKBACK: Final = 10


def _bounds_check_count(recent: Sequence[Instruction]) -> int | None:
    """N from ``cmp r, N-1; ja`` (or ``cmp r, N; jae``) closest before the jump."""
    for position in range(len(recent) - 1, 0, -1):
        branch = recent[position]
        if branch.mnemonic not in ("ja", "jae", "jbe", "jb"):
            continue
        compare = recent[position - 1]
        if compare.mnemonic != "cmp":
            return None
        operands = compare.op_str.split(", ")
        if len(operands) != 2:
            return None
        try:
            bound = int(operands[1], 0)
        except ValueError:
            return None
        count = bound + 1 if branch.mnemonic in ("ja", "jbe") else bound
        return count if 0 < count <= MAX_JUMP_TABLE_ENTRIES else None
    return None


def _read_entries(
    decoder: InstructionDecoder,
    table: int,
    entry_size: int,
    signed: bool,
    count: int | None,
) -> Iterator[int]:
    limit = count if count is not None else MAX_JUMP_TABLE_ENTRIES
    raw = decoder.read(table, limit * entry_size)
    usable = len(raw) - len(raw) % entry_size
    code = {4: "i", 8: "q"}[entry_size]
    unpacked = struct.iter_unpack("<" + (code if signed else code.upper()), raw[:usable])
    return (value for (value,) in unpacked)  # lazy: callers stop at the first bad entry


def _got_base(decoder: InstructionDecoder) -> int | None:
    image = decoder.image
    if image.got_address is not None:
        return image.got_address
    for segment in image.segments:  # images built by section rather than by the loader
        if segment.name == ".got.plt":
            return segment.virtual_address
    return None


def jump_table_targets(
    decoder: InstructionDecoder, jump: Instruction, recent: Sequence[Instruction]
) -> list[int]:
    """Case addresses of the switch ending in the indirect ``jump``; empty when not a table."""
    segment = decoder.segment_at(jump.address)
    if segment is None:
        return []
    segment_end = segment.virtual_address + len(segment.data)

    def in_segment(address: int) -> bool:
        return segment.virtual_address <= address < segment_end

    window = list(recent[-JUMP_TABLE_LOOKBACK:])
    count = _bounds_check_count(window)
    targets: list[int] = []
    operand = jump.op_str

    if "[" in operand:  # jmp [index*scale + table]
        parts = parse_scaled_memory(operand)
        if parts is None:
            return []
        base, index, scale, displacement = parts
        pointer_size = decoder.bits // 8
        if base is not None or index is None or scale != pointer_size or displacement <= 0:
            return []
        for entry in _read_entries(decoder, displacement, pointer_size, False, count):
            if not in_segment(entry):
                break
            targets.append(entry)
        return targets

    register = operand
    lea_values: dict[str, int] = {}
    load: Instruction | None = None
    for instruction in window:
        if instruction.mnemonic == "lea" and instruction.memory_address is not None:
            lea_values[instruction.op_str.split(", ", 1)[0]] = instruction.memory_address
        elif instruction.mnemonic in ("movsxd", "mov", "movsx") and "*4" in instruction.op_str:
            load = instruction
    if load is None:
        return []
    parts = parse_scaled_memory(load.op_str)
    if parts is None or parts[0] is None:
        return []
    base, _index, scale, displacement = parts
    base_value = lea_values.get(base) if base is not None else None
    got_base = _got_base(decoder) if decoder.bits == 32 and base_value is None else None
    if scale == 4 and got_base is not None and displacement != 0:
        # i386 PIC: the table sits at GOT + disp and holds offsets from the GOT address
        # (the GOT register is set by __x86.get_pc_thunk; ELF ABI puts it at .got.plt).
        for entry in _read_entries(decoder, got_base + displacement, 4, True, count):
            target = (got_base + entry) & 0xFFFFFFFF
            if not in_segment(target):
                break
            targets.append(target)
        return targets
    if scale != 4 or base_value is None or not register:
        return []
    image_base = decoder.image.image_base
    if displacement == 0:  # entries are offsets from the table itself
        for entry in _read_entries(decoder, base_value, 4, True, count):
            target = base_value + entry
            if not in_segment(target):
                break
            targets.append(target)
    elif base_value == image_base:  # entries are RVAs
        for entry in _read_entries(decoder, image_base + displacement, 4, False, count):
            target = image_base + entry
            if not in_segment(target):
                break
            targets.append(target)
    return targets
