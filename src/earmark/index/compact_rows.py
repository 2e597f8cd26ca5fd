"""Which functions ``CompactFunctions``' columns can hold, and a whole sample's functions as
column blocks.

A function whose numbers, MinHash slots or reference integers fit their columns is stored in
them; any other (never an extracted one, only a hand-made features file) is kept as the object
itself, so results never change. ``regular_columns`` applies the same checks to a sample's
functions at once, converting each column with one numpy call: ``CompactBuilder`` spent ~40
Python-level steps per function on them (~30 % of ``KnowledgeBase.prepare`` on the PE bench
KB, docs/benchmarks.md, "Ingest pipeline cost").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from earmark.model.sample import MINHASH_PERMUTATIONS, FunctionFeatures

__all__ = [
    "INT_REFERENCES",
    "TEXT_REFERENCES",
    "ColumnBlock",
    "fits_columns",
    "regular_columns",
]

INT_REFERENCES: Final = ("calls", "constants", "immediates")
TEXT_REFERENCES: Final = ("called_imports", "strings")

_Value = TypeVar("_Value")

_UINT64_END: Final = 1 << 64
_UINT32_END: Final = 1 << 32
_INT64_END: Final = 1 << 63
# Reference integers are stored as value mod 2**64 plus a sign flag: calls are addresses,
# constants and immediates may be negative; both ends fit (as the features file allows).
_INT_LOW: Final = -(1 << 64) + 1


def fits_columns(function: FunctionFeatures) -> bool:
    """Whether every numeric field fits its column (always true for extracted features; a
    hand-made file with odd values is kept as the object itself, so results never change)."""
    return (
        0 <= function.address < _UINT64_END
        and 0 <= function.exact_hash < _UINT64_END
        and all(
            0 <= value < _INT64_END
            for value in (
                function.size,
                function.block_count,
                function.edge_count,
                function.instruction_count,
            )
        )
        and len(function.minhash) in (0, MINHASH_PERMUTATIONS)
        and len(function.robust_minhash) in (0, MINHASH_PERMUTATIONS)
        and _within(function.minhash, 0, _UINT32_END)
        and _within(function.robust_minhash, 0, _UINT32_END)
        and _within(function.calls, _INT_LOW, _UINT64_END)
        and _within(function.constants, _INT_LOW, _UINT64_END)
        and _within(function.immediates, _INT_LOW, _UINT64_END)
    )


def _within(values: Sequence[int], low: int, end: int) -> bool:
    """Every value in ``low <= value < end``. ``min``/``max`` run in C: a generator over
    each value took ~0.8 s of the 4 s feature stage build on the PE bench KB."""
    return not values or (low <= min(values) and max(values) < end)


@dataclass(frozen=True)
class ColumnBlock:
    """A sample's functions as column blocks, every value in range for its column."""

    numbers: npt.NDArray[np.uint64]  # (N, 6): address, size, blocks, edges, instructions, hash
    minhash: npt.NDArray[np.uint32]  # (N, 64); zeros for an empty MinHash
    robust_minhash: npt.NDArray[np.uint32]
    signature_lengths: npt.NDArray[np.int64]  # (N, 2): minhash, robust minhash length
    # Each of INT_REFERENCES and TEXT_REFERENCES: the rows' values end to end, row lengths.
    int_references: dict[str, tuple[list[int], list[int]]]
    text_references: dict[str, tuple[list[str], list[int]]]


def regular_columns(functions: Sequence[FunctionFeatures]) -> ColumnBlock | None:
    """``functions`` as column blocks, or None when any of them fails ``fits_columns`` (the
    caller then adds them one by one): the same checks, over whole columns."""
    try:
        # OverflowError for a value below 0 or from 2**64.
        numbers = np.array(
            [
                (f.address, f.size, f.block_count, f.edge_count, f.instruction_count, f.exact_hash)
                for f in functions
            ],
            dtype=np.uint64,
        ).reshape(-1, 6)
        minhash = _signature_rows([f.minhash for f in functions])
        robust = _signature_rows([f.robust_minhash for f in functions])
    except OverflowError:
        return None
    if minhash is None or robust is None or (numbers[:, 1:5] >= np.uint64(_INT64_END)).any():
        return None
    ints = {name: _flat([getattr(f, name) for f in functions]) for name in INT_REFERENCES}
    for values, _ in ints.values():
        if not _within(values, _INT_LOW, _UINT64_END):
            return None
    lengths = np.array(
        [(len(f.minhash), len(f.robust_minhash)) for f in functions], dtype=np.int64
    ).reshape(-1, 2)
    return ColumnBlock(
        numbers=numbers,
        minhash=minhash,
        robust_minhash=robust,
        signature_lengths=lengths,
        int_references=ints,
        text_references={
            name: _flat([getattr(f, name) for f in functions]) for name in TEXT_REFERENCES
        },
    )


def _flat(rows: list[tuple[_Value, ...]]) -> tuple[list[_Value], list[int]]:
    return list(chain.from_iterable(rows)), [len(row) for row in rows]


def _signature_rows(signatures: list[tuple[int, ...]]) -> npt.NDArray[np.uint32] | None:
    """Rows of MINHASH_PERMUTATIONS slots (zeros for an empty signature), or None when a
    signature has another length or a slot outside ``0 <= slot < 2**32``."""
    rows = np.zeros((len(signatures), MINHASH_PERMUTATIONS), dtype=np.uint32)
    present = [position for position, signature in enumerate(signatures) if signature]
    if not present:
        return rows
    if any(len(signatures[position]) != MINHASH_PERMUTATIONS for position in present):
        return None
    # OverflowError (caught by the caller) from 2**63. ``fromiter`` over the chained rows
    # rather than ``np.array`` of the row tuples: the same values, half the time (1.4 against
    # 2.8 ms for 1,600 rows), ~0.1 CPU s of ``KnowledgeBase.prepare`` on the PE bench (a+c) KB.
    chosen = [signatures[position] for position in present]
    slots = np.fromiter(
        chain.from_iterable(chosen), dtype=np.int64, count=len(chosen) * MINHASH_PERMUTATIONS
    ).reshape(-1, MINHASH_PERMUTATIONS)
    if slots.min() < 0 or slots.max() >= _UINT32_END:
        return None
    rows[present] = slots
    return rows
