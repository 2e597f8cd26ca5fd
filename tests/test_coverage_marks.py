"""Byte coverage marking of function recovery: merged intervals against a plain reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from earmark.extract.function_starts import _mark_intervals

_INTERVALS = st.lists(st.tuples(st.integers(0, 300), st.integers(1, 15)), min_size=0, max_size=60)


@given(_INTERVALS, st.lists(st.integers(0, 319), max_size=10))
def test_marks_exactly_the_bytes_some_interval_covers(
    intervals: list[tuple[int, int]], already: list[int]
) -> None:
    length = 320
    lows = np.array([low for low, _ in intervals], dtype=np.int64)
    highs = np.array([min(low + size, length) for low, size in intervals], dtype=np.int64)
    coverage = np.zeros(length, dtype=bool)
    coverage[already] = True
    expected = coverage.copy()
    for low, high in zip(lows.tolist(), highs.tolist(), strict=True):
        expected[low:high] = True
    _mark_intervals(coverage, lows, highs)
    assert coverage.tolist() == expected.tolist()


def test_an_empty_interval_marks_nothing() -> None:
    coverage = np.zeros(16, dtype=bool)
    _mark_intervals(coverage, np.array([9], dtype=np.int64), np.array([4], dtype=np.int64))
    assert not coverage.any()
