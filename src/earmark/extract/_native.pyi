# Types of the compiled inner loops (_native.c); see earmark.extract.disasm.
from collections.abc import Callable
from typing import Any

def configure(
    cs_disasm: int | None,
    cs_free: int | None,
    cs_errno: int | None,
    insn_size: int,
    address_offset: int,
    size_offset: int,
    mnemonic_offset: int,
    mnemonic_size: int,
    op_str_offset: int,
    op_str_size: int,
    /,
) -> None: ...
def decode_window(
    handle: int,
    data: bytes,
    offset: int,
    length: int,
    address: int,
    decoded: dict[int, Any],
    shared: dict[tuple[str, str], Any],
    local: dict[tuple[str, str], Any],
    analyse: Callable[[str, str], Any],
    branches: dict[str, tuple[str, str, int]],
    address_mask: int,
    kind: type[tuple[Any, ...]],
    memo: object,
    /,
) -> None: ...
def new_memo() -> object: ...
def walk_plain(
    address: int,
    start: int,
    instructions: dict[int, Any],
    known: dict[int, str],
    decoded: dict[int, Any],
    max_instructions: int,
    trail: list[Any],
    import_slots: dict[int, str],
    import_registers: dict[str, str],
    /,
) -> int: ...
def describe_body(
    ordered: list[Any],
    instructions: dict[int, Any],
    leaders: set[int],
    successors: dict[int, tuple[int, ...]],
    start: int,
    /,
) -> tuple[int, int, list[int], list[int]]: ...
