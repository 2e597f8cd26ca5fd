"""Posting lists built with sweeps for common keys equal those built by one sort at the end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.index import key_postings
from earmark.index.key_postings import PostingsBuilder

# Functions as lists of keys from a small range, so that some keys pass the limit.
_functions = st.lists(
    st.lists(st.integers(0, 40), unique=True, max_size=12).map(sorted), max_size=60
)


def _postings_by_brute_force(functions: list[list[int]], limit: int) -> list[tuple[int, int]]:
    holders: dict[int, list[int]] = {}
    for position, keys in enumerate(functions):
        for key in keys:
            holders.setdefault(key, []).append(position)
    return [
        (key, position)
        for key in sorted(holders)
        if len(holders[key]) <= limit
        for position in holders[key]
    ]


def _build(samples: list[list[list[int]]], limit: int, first_sweep: int) -> list[tuple[int, int]]:
    builder = PostingsBuilder(limit, first_sweep)
    for functions in samples:
        keys = np.array([key for row in functions for key in row], dtype=np.uint64)
        counts = np.array([len(row) for row in functions], dtype=np.int64)
        builder.add(keys, counts)
    kept_keys, owners = builder.finish()
    assert kept_keys.dtype == np.uint64 and owners.dtype == np.int64
    return list(zip(kept_keys.tolist(), owners.tolist(), strict=True))


@settings(max_examples=150, deadline=None)
@given(st.lists(_functions, max_size=8), st.integers(1, 6), st.integers(1, 64))
def test_sweeps_change_no_posting(
    samples: list[list[list[int]]], limit: int, first_sweep: int
) -> None:
    expected = _postings_by_brute_force([row for functions in samples for row in functions], limit)
    assert _build(samples, limit, first_sweep) == expected
    assert _build(samples, limit, 1 << 40) == expected  # never swept


def test_a_common_key_is_turned_away_after_a_sweep() -> None:
    builder = PostingsBuilder(limit=2, first_sweep=4)
    builder.add(np.array([7, 7, 7, 9], np.uint64), np.array([1, 1, 1, 1], np.int64))
    assert len(builder._keys) == 1  # the sweep dropped key 7's entries
    builder.add(np.array([7, 9, 5], np.uint64), np.array([2, 1], np.int64))
    kept_keys, owners = builder.finish()
    assert list(zip(kept_keys.tolist(), owners.tolist(), strict=True)) == [(5, 5), (9, 3), (9, 4)]


@settings(max_examples=60, deadline=None)
@given(st.lists(_functions, max_size=6), st.integers(1, 4), st.integers(1, 5))
def test_finish_in_small_chunks_changes_no_posting(
    samples: list[list[list[int]]], limit: int, chunk: int
) -> None:
    expected = _postings_by_brute_force([row for functions in samples for row in functions], limit)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(key_postings, "FINISH_CHUNK_ENTRIES", chunk)  # many steps, some empty
        assert _build(samples, limit, 1 << 40) == expected
