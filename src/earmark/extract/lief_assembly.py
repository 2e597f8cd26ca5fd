"""Hand back the memory of LIEF's disassembler enums in a process that never disassembles
with LIEF.

Importing LIEF (>= 0.16; 1.0 here) registers the enums of its ``lief.assembly`` module, every
opcode, register and system register of seven architectures: ~62,000 members of Python
``enum`` classes, most of the 52 MB that ``import lief`` costs. earmark decodes instructions
with capstone and reads only headers with LIEF, so none of them is ever used. Emptying the
enums frees their objects; RSS hardly drops (the freed blocks share arenas with live objects)
but everything allocated afterwards reuses the space: the PE benchmark's process peak fell by
~20 MiB (docs/benchmarks.md, "Process memory after the query-side cuts").

Why this is not done at import: nanobind, LIEF's binding layer, keeps *borrowed* pointers to
the enum members it created, to return them from C++. Once they are freed, any LIEF call that
returns one (an ``Instruction.opcode`` from ``Binary.disassemble`` and its relatives) would
read freed memory. ``release_lief_assembly`` therefore also replaces every LIEF method that
assembles or disassembles with one that raises ``LiefAssemblyReleased``, and only entry points
that own their whole process call it: the ``earmark`` command, the benchmark harnesses. A
program that imports earmark as a library keeps LIEF intact unless it calls this itself.
"""

from __future__ import annotations

import enum
import gc
import types
from typing import Any, Final, NoReturn

import lief

from earmark.memory import return_free_memory

# Binary classes whose (dis)assembler methods are replaced; absent ones are skipped.
_BINARY_CLASSES: Final = ("Binary", "PE.Binary", "ELF.Binary", "MachO.Binary", "COFF.Binary")
_ASSEMBLER_METHODS: Final = ("assemble", "disassemble", "disassemble_from_bytes")


class LiefAssemblyReleased(RuntimeError):
    """LIEF's assembler/disassembler was disabled in this process by
    ``release_lief_assembly``."""


def _released(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise LiefAssemblyReleased(
        "LIEF's assembly support is released in this process "
        "(earmark.extract.lief_assembly.release_lief_assembly)"
    )


def _assembly_enums(module: types.ModuleType) -> list[enum.EnumMeta]:
    """Enum classes of ``lief.assembly`` and its per-architecture submodules."""
    found: list[enum.EnumMeta] = []
    modules = [module]
    modules += [value for value in vars(module).values() if isinstance(value, types.ModuleType)]
    for holder in modules:
        found += [value for value in vars(holder).values() if isinstance(value, enum.EnumMeta)]
    return found


def _resolve(path: str) -> Any:
    value: Any = lief
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def release_lief_assembly() -> int:
    """Empty ``lief.assembly``'s enums and disable LIEF's (dis)assembler methods; returns the
    number of enum members released (0 when this LIEF has no assembly module or it was
    released already). Idempotent."""
    assembly = getattr(lief, "assembly", None)
    if not isinstance(assembly, types.ModuleType):
        return 0
    for path in _BINARY_CLASSES:
        binary = _resolve(path)
        for method in _ASSEMBLER_METHODS:
            if binary is not None and hasattr(binary, method):
                setattr(binary, method, _released)
    released = 0
    for enumeration in _assembly_enums(assembly):
        members: dict[str, Any] = enumeration._member_map_
        for name in list(members):
            # EnumType.__delattr__ refuses to delete members; type's own does not.
            if name in vars(enumeration):
                type.__delattr__(enumeration, name)
            released += 1
        members.clear()
        enumeration._value2member_map_.clear()
        enumeration._member_names_.clear()
    if released:
        gc.collect()  # in case a member sits in a reference cycle; ~0.1 s, once per process
        return_free_memory()
    return released
