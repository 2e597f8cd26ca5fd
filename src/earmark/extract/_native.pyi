# Types of the compiled core of function recovery (_native.c); see earmark.extract.disasm.
from collections.abc import Callable, Iterator
from typing import Any

def configure(
    cs_disasm: int | None,
    cs_free: int | None,
    cs_errno: int | None,
    cs_malloc: int | None,
    cs_disasm_iter: int | None,
    insn_size: int,
    address_offset: int,
    size_offset: int,
    mnemonic_offset: int,
    mnemonic_size: int,
    op_str_offset: int,
    op_str_size: int,
    /,
) -> None: ...
def starts_containing(bodies: dict[int, Any], address: int, /) -> list[int]: ...
def minhash_ids(
    ids: bytes,
    lengths: bytes,
    sizes: tuple[int, ...],
    multiplier: int,
    mix: int,
    a: bytes,
    b: bytes,
    /,
) -> bytes: ...
def uint32_rows(data: bytes, width: int, /) -> list[tuple[int, ...]]: ...
def string_runs(
    data: bytes, min_length: int, max_length: int, limit: int, /
) -> list[tuple[int, bool, str]]: ...

class Table:
    def __init__(
        self,
        handle: int,
        segments: list[tuple[int, bytes, bool]],
        window: int,
        address_mask: int,
        shared: dict[tuple[str, str], Any],
        local: dict[tuple[str, str], Any],
        analyse: Callable[[str, str], Any],
        kind: type[tuple[Any, ...]],
        register_classes: dict[str, str],
        memory_sizes: dict[str, str],
        end_mnemonics: frozenset[str],
        conditional_extra: frozenset[str],
        small_limit: int,
        /,
    ) -> None: ...
    def decode(self, address: int, /) -> Any: ...
    def import_thunk(self, address: int, import_slots: dict[int, str], /) -> str | None: ...
    def mark_start(self, address: int, known: bool, /) -> None: ...
    def cover_span(self, address: int, size: int, /) -> None: ...
    def covered(self, address: int, /) -> bool: ...
    def gaps(self) -> list[tuple[int, int]]: ...
    def cached(self) -> dict[int, Any]: ...
    def owner(self, address: int, /) -> int | None: ...
    def tail_targets(self, bodies: list[Any], starts: list[int], /) -> list[int]: ...
    def explore(
        self,
        start: int,
        max_instructions: int,
        fragments: list[int],
        import_slots: dict[int, str],
        no_return: frozenset[str],
        follow_indirect: Callable[..., None],
        body: Any,
        lookback: int,
        /,
    ) -> tuple[Body, bool, bool]: ...

class Body:
    def __len__(self) -> int: ...
    def __contains__(self, address: object, /) -> bool: ...
    def __getitem__(self, address: int, /) -> Any: ...
    def __iter__(self) -> Iterator[int]: ...
    def values(self) -> list[Any]: ...
    def conditional_targets(self) -> list[int]: ...
    def counts(self) -> tuple[int, int]: ...
    def own(self, start: int, /) -> None: ...
    def disown(self, start: int, /) -> None: ...
    def cover(self) -> int | None: ...
    def referenced_code(self) -> list[int]: ...
    def describe(
        self,
        start: int,
        token_features: Callable[[str], tuple[int, int | None, tuple[int, ...]]],
        known: dict[str, tuple[int, int | None, tuple[int, ...]]] = ...,
        /,
    ) -> tuple[tuple[str, ...], int, list[int], list[int], bytes, bytes, tuple[int, ...]]: ...
