"""MinHash signatures: stable, and their estimate is close to the exact Jaccard index."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earmark.extract import disasm
from earmark.extract.minhash import (
    compiled_id_signatures,
    estimate_jaccard,
    exact_hash,
    id_minhash_signatures,
    minhash_signature,
    minhash_signatures,
    shingle_hashes,
    stream_minhash_signatures,
    token_id,
)
from earmark.model.sample import MINHASH_PERMUTATIONS

# 64 permutations: the estimate's standard deviation is sqrt(J(1-J)/64) <= 1/16; five sigma
# keeps a correct implementation from failing by chance over hypothesis' runs.
TOLERANCE = 5 * math.sqrt(0.25 / MINHASH_PERMUTATIONS)


@settings(max_examples=200, deadline=None)
@given(
    st.sets(st.integers(0, 2**32 - 1), min_size=1, max_size=300),
    st.sets(st.integers(0, 2**32 - 1), min_size=1, max_size=300),
    st.sets(st.integers(0, 2**32 - 1), max_size=300),
)
def test_estimate_is_close_to_exact_jaccard(
    only_first: set[int], only_second: set[int], shared: set[int]
) -> None:
    first = only_first | shared
    second = only_second | shared
    exact = len(first & second) / len(first | second)
    signatures = minhash_signatures(
        [np.array(sorted(first), dtype=np.uint32), np.array(sorted(second), dtype=np.uint32)]
    )
    assert abs(estimate_jaccard(signatures[0], signatures[1]) - exact) <= TOLERANCE


@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=200))
def test_signature_ignores_order_and_duplicates(values: list[int]) -> None:
    forward = minhash_signature(np.array(values, dtype=np.uint32))
    shuffled = minhash_signature(np.array(sorted(values * 2, reverse=True), dtype=np.uint32))
    assert forward.tolist() == shuffled.tolist()
    assert forward.shape == (MINHASH_PERMUTATIONS,)


def test_batch_equals_one_by_one() -> None:
    streams = [
        ("push r64", "mov r64,sp"),
        ("ret",),
        (),
        tuple(f"add r32,{i:#x}" for i in range(99)),
    ]
    sets = [shingle_hashes(s) for s in streams]
    batch = minhash_signatures(sets)
    for row, shingles in zip(batch, sets, strict=True):
        assert row.tolist() == minhash_signature(shingles).tolist()
    assert batch[2].tolist() == [0xFFFFFFFF] * MINHASH_PERMUTATIONS  # empty stream


def test_hashes_are_stable_across_runs() -> None:
    # Stored in the knowledge base: these values must never change silently.
    assert exact_hash(("push r64", "ret")) == 0x306ABD49C39D3B21
    assert token_id("push r64") == int.from_bytes(
        hashlib.blake2b(b"push r64", digest_size=4).digest(), "little"
    )
    assert exact_hash(("push r64", "ret")) != exact_hash(("ret", "push r64"))


def test_shingles_cover_one_to_three_grams() -> None:
    stream = ("a", "b", "c", "d")
    assert len(shingle_hashes(stream)) == 4 + 3 + 2
    assert len(set(shingle_hashes(("x", "x", "x")).tolist())) == 3  # 1-, 2- and 3-gram of x


_TOKENS = ("push r64", "mov r64,r64", "call addr", "ret", "xor r32,r32", "lea r64,m[addr]")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.sampled_from(_TOKENS), max_size=12), max_size=20))
def test_batched_stream_signatures_equal_one_stream_at_a_time(streams: list[list[str]]) -> None:
    # The batch folds n-grams over all streams laid end to end; none may cross a boundary,
    # and dropping repeated shingles must not change any minimum.
    batched = stream_minhash_signatures(streams)
    one_by_one = minhash_signatures([shingle_hashes(stream) for stream in streams])
    assert batched.shape == (len(streams), MINHASH_PERMUTATIONS)
    assert np.array_equal(batched, one_by_one)


def test_empty_stream_gets_the_empty_signature() -> None:
    signatures = stream_minhash_signatures([[], ["ret"]])
    assert signatures[0].tolist() == [0xFFFFFFFF] * MINHASH_PERMUTATIONS
    assert signatures[1].tolist() == minhash_signature(shingle_hashes(["ret"])).tolist()


def _assert_compiled_equals_numpy(streams: list[list[int]]) -> None:
    assert disasm.ACCELERATOR is not None
    lengths = np.array([len(s) for s in streams], dtype=np.int64)
    ids = np.array([i for s in streams for i in s], dtype=np.uint64)
    compiled = compiled_id_signatures(disasm.ACCELERATOR.minhash_ids, ids.tobytes(), lengths)
    assert np.array_equal(compiled, id_minhash_signatures(ids, lengths))


@pytest.mark.skipif(disasm.ACCELERATOR is None, reason="the _native extension is not built")
@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    streams=st.lists(
        st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=40), max_size=12
    )
)
def test_compiled_signatures_equal_numpy(streams: list[list[int]]) -> None:
    """The compiled MinHash (one pass per function) gives the numpy reference's signatures."""
    _assert_compiled_equals_numpy(streams)


@pytest.mark.skipif(disasm.ACCELERATOR is None, reason="the _native extension is not built")
@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    streams=st.lists(st.lists(st.sampled_from([0, 1, 7, 2**32 - 1]), max_size=300), max_size=6)
)
def test_compiled_signatures_equal_numpy_with_repeats(streams: list[list[int]]) -> None:
    """Streams from a few token ids repeat most shingles, which the compiled pass drops before
    the permutations: the signatures stay the numpy reference's."""
    _assert_compiled_equals_numpy(streams)


@pytest.mark.skipif(disasm.ACCELERATOR is None, reason="the _native extension is not built")
@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    rows=st.lists(
        st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=3, max_size=3),
        max_size=6,
    )
)
def test_compiled_rows_equal_numpy_rows(rows: list[list[int]]) -> None:
    """uint32_rows (how compiled signatures become FunctionFeatures tuples) gives numpy's rows."""
    assert disasm.ACCELERATOR is not None
    array = np.array(rows, dtype=np.uint32).reshape(len(rows), 3)
    assert disasm.ACCELERATOR.uint32_rows(array, 3) == [tuple(row) for row in array.tolist()]


@pytest.mark.skipif(disasm.ACCELERATOR is None, reason="the _native extension is not built")
def test_compiled_rows_reject_partial_rows() -> None:
    assert disasm.ACCELERATOR is not None
    with pytest.raises(ValueError, match="whole rows"):
        disasm.ACCELERATOR.uint32_rows(b"\x00" * 8, 3)
    with pytest.raises(ValueError, match="whole rows"):
        disasm.ACCELERATOR.uint32_rows(b"", 0)
