"""Batch re-ranking: ``locate_positions`` and ``stored_pair_similarity`` give exactly what
``CompactFunctions.locate`` and ``function_similarity`` give one pair at a time."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from earmark.extract import analyze_file
from earmark.index import compact_functions
from earmark.index.compact_functions import CompactBuilder, CompactFunctions
from earmark.index.lsh import reduce_signatures
from earmark.index.pair_similarity import stored_pair_similarity
from earmark.index.similarity import function_similarity
from earmark.model.sample import FunctionFeatures
from fixtures.build import FixtureBuilder

MIN_INSTRUCTIONS = 10


def _functions(builder: FixtureBuilder, source: str, opt: str) -> list[FunctionFeatures]:
    build = builder.build(source, "gcc64", opt)
    functions = analyze_file(build.stripped).functions
    return [f for f in functions if f.instruction_count >= MIN_INSTRUCTIONS]


def _odd_references(function: FunctionFeatures, salt: int) -> FunctionFeatures:
    """The same function with references the extractor rarely yields: negative and repeated
    integers, module-qualified imports, a string shared with other rows."""
    return replace(
        function,
        constants=(*function.constants, -salt, -salt, 1 << 63, salt),
        immediates=(*function.immediates, -1, (1 << 64) - 1),
        called_imports=(*function.called_imports, f"lib{salt % 3}.dll!shared_api", "a!b!c"),
        strings=(*function.strings, "shared text", "caf\u00e9", f"text {salt % 4}"),
    )


@pytest.fixture(scope="module")
def pool(builder: FixtureBuilder) -> tuple[list[FunctionFeatures], CompactFunctions]:
    """Queries (-O2 builds) and a compact KB of -O0/-O2 builds of two programs."""
    queries = _functions(builder, "fx_codec.c", "O2") + _functions(builder, "fx_dispatch.c", "O2")
    queries += [_odd_references(f, salt) for salt, f in enumerate(queries[:12])]
    # Past the column range: kept as an object on the KB side, scored one pair at a time.
    queries.append(replace(queries[0], constants=(1 << 70,)))
    stored_builder = CompactBuilder()
    for sample_id, (source, opt) in enumerate(
        [("fx_codec.c", "O0"), ("fx_codec.c", "O2"), ("fx_dispatch.c", "O0")], start=1
    ):
        functions = _functions(builder, source, opt)
        functions += [_odd_references(f, salt) for salt, f in enumerate(functions[:5])]
        if sample_id == 3:
            functions.append(replace(functions[0], immediates=(-(1 << 70),)))
        for function_id, function in enumerate(functions):
            stored_builder.add(sample_id, sample_id * 1000 + function_id, function)
    stored = stored_builder.finish()
    assert stored.irregular, "the pool exercises the one-pair fallback"
    return queries, stored


def test_batch_similarity_equals_the_pairwise_function_bit_for_bit(
    pool: tuple[list[FunctionFeatures], CompactFunctions],
) -> None:
    queries, stored = pool
    query_positions = np.repeat(np.arange(len(queries), dtype=np.int64), len(stored))
    stored_positions = np.tile(np.arange(len(stored), dtype=np.int64), len(queries))
    batch = stored_pair_similarity(queries, query_positions, stored, stored_positions)
    pairwise = [
        function_similarity(queries[q], stored.function(k))
        for q, k in zip(query_positions.tolist(), stored_positions.tolist(), strict=True)
    ]
    assert batch.tolist() == pairwise
    assert max(pairwise) == 1.0 and min(pairwise) < 0.3  # copies and unrelated pairs both seen


def test_batch_similarity_of_a_subset_and_of_no_pairs(
    pool: tuple[list[FunctionFeatures], CompactFunctions],
) -> None:
    queries, stored = pool
    rng = np.random.default_rng(7)
    query_positions = rng.integers(0, len(queries), 300)
    stored_positions = rng.integers(0, len(stored), 300)
    batch = stored_pair_similarity(queries, query_positions, stored, stored_positions)
    for q, k, score in zip(query_positions, stored_positions, batch, strict=True):
        assert score == function_similarity(queries[int(q)], stored.function(int(k)))
    empty = np.zeros(0, dtype=np.int64)
    assert stored_pair_similarity(queries, empty, stored, empty).shape == (0,)


@pytest.mark.parametrize("chunk", [1, 7, compact_functions.LOCATE_CHUNK])
def test_locate_positions_equals_locate_of_each_request(
    pool: tuple[list[FunctionFeatures], CompactFunctions],
    chunk: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compact_functions, "LOCATE_CHUNK", chunk)
    queries, stored = pool
    requests: list[tuple[int, int, np.ndarray]] = []
    for sample_id in (*stored.sample_ranges, 99):  # 99: no such sample
        for function in queries + [stored.function(k) for k in range(len(stored))]:
            if len(function.minhash) != 64:
                continue
            signature = reduce_signatures(np.array([function.minhash], dtype=np.uint32))[0]
            requests.append((sample_id, function.exact_hash, signature))
            # The right hash with a signature no stored function has: any with the hash.
            requests.append((sample_id, function.exact_hash, signature ^ np.uint8(1)))
    positions = stored.locate_positions(
        np.array([r[0] for r in requests], dtype=np.int64),
        np.array([r[1] for r in requests], dtype=np.uint64),
        np.stack([r[2] for r in requests]),
    )
    found = 0
    for (sample_id, exact_hash, signature), position in zip(requests, positions, strict=True):
        expected = stored.locate(sample_id, exact_hash, signature)
        if expected is None:
            assert position == -1
        else:
            assert stored.function(int(position)) == expected
            found += 1
    assert 0 < found < len(requests)
