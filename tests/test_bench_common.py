"""Metrics and splits of bench/common.py, on hand-made data with known answers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

# bench/ is a tool directory beside src/, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CorpusFile,
    GroundTruthFunction,
    RankOutcome,
    XcompBuild,
    deduplicate_by_sha256,
    margin_true_vs_runner_up,
    mean_reciprocal_rank,
    rank_outcome,
    rank_outcome_from_ranking,
    recall_at_k,
    render_table,
    roc_auc,
    split_all_but_newest,
    split_oldest_only,
    split_third_party_queries,
    version_sort_key,
)


def corpus_file(project: str, version: str, sha: str, origin: str = "project") -> CorpusFile:
    return CorpusFile(
        Path(f"/c/{project}/{version}/{sha}.dll"), project, version, sha, 1, origin, ""
    )


def test_rank_outcome_counts_better_and_tied() -> None:
    assert rank_outcome(0.5, [0.9, 0.5, 0.1, 0.5]) == RankOutcome(better=1, tied=2)


def test_recall_and_mrr_on_clear_ranks() -> None:
    outcomes = [RankOutcome(0, 0), RankOutcome(1, 0), RankOutcome(10, 0)]  # ranks 1, 2, 11
    assert recall_at_k(outcomes, 1) == pytest.approx(1 / 3)
    assert recall_at_k(outcomes, 2) == pytest.approx(2 / 3)
    assert mean_reciprocal_rank(outcomes) == pytest.approx((1 + 1 / 2 + 1 / 11) / 3)
    assert mean_reciprocal_rank(outcomes, cutoff=10) == pytest.approx((1 + 1 / 2) / 3)


def test_ties_earn_chance_level_not_rank_one() -> None:
    # A scorer that gives the true item and 100 wrong ones the same score is guessing.
    constant = rank_outcome(0.0, np.zeros(100))
    assert recall_at_k([constant], 1) == pytest.approx(1 / 101)
    expected_rr10 = sum(1 / r for r in range(1, 11)) / 101
    assert mean_reciprocal_rank([constant], cutoff=10) == pytest.approx(expected_rr10)


def test_roc_auc_known_values() -> None:
    assert roc_auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert roc_auc([0.1], [0.9]) == 0.0
    assert roc_auc([0.5, 0.5], [0.5]) == 0.5  # ties count one half
    assert roc_auc([0.8, 0.4], [0.6, 0.2]) == pytest.approx(0.75)


@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=30),
    st.lists(st.integers(0, 20), min_size=1, max_size=30),
)
def test_roc_auc_equals_pairwise_definition(positives: list[int], negatives: list[int]) -> None:
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives]
    assert roc_auc(positives, negatives) == pytest.approx(sum(pairs) / len(pairs))


def test_family_ranking_outcome_and_margin() -> None:
    ranked = {"lz4": 0.7, "zstandard": 0.4}
    universe = ["lz4", "zstandard", "pillow", "regex"]
    assert rank_outcome_from_ranking(ranked, "lz4", universe) == RankOutcome(0, 0)
    # A family the engine did not list scores 0 and ties with the other unlisted ones.
    assert rank_outcome_from_ranking(ranked, "pillow", universe) == RankOutcome(2, 1)
    assert margin_true_vs_runner_up(ranked, "lz4") == pytest.approx(0.3)
    assert margin_true_vs_runner_up(ranked, "zstandard") == pytest.approx(-0.3)


def test_version_sort_key_orders_numerically() -> None:
    versions = ["3.1.10", "3.1.9", "38.0.4", "2018.11.22", "3.2.0"]
    assert sorted(versions, key=version_sort_key) == [
        "3.1.9",
        "3.1.10",
        "3.2.0",
        "38.0.4",
        "2018.11.22",
    ]


def test_deduplicate_keeps_oldest_release() -> None:
    files = [
        corpus_file("p", "2.0", "aa"),
        corpus_file("p", "1.10", "aa"),
        corpus_file("p", "1.9", "bb"),
    ]
    kept = deduplicate_by_sha256(files)
    assert sorted((f.version, f.sha256) for f in kept) == [("1.10", "aa"), ("1.9", "bb")]


def release_corpus() -> list[CorpusFile]:
    return [
        corpus_file("lz4", "1.0", "l1"),
        corpus_file("lz4", "2.0", "l2"),
        corpus_file("lz4", "10.0", "l3"),
        corpus_file("regex", "2019.1", "r1"),
        corpus_file("regex", "2024.1", "r2"),
        corpus_file("solo", "1.0", "s1"),  # one release: nothing to learn from
        corpus_file("regex", "2024.1", "l2"),  # byte-identical to an lz4 file: dropped
        corpus_file("pillow", "8.4.0", "m1", origin="msvc-runtime"),
    ]


def test_split_all_but_newest() -> None:
    split = split_all_but_newest(release_corpus())
    assert sorted(f.sha256 for f in split.knowledge_base) == ["l1", "l2", "r1"]
    assert sorted(f.sha256 for f in split.queries) == ["l3", "r2"]
    assert all(split.expected(q) == q.project for q in split.queries)


def test_split_oldest_only() -> None:
    split = split_oldest_only(release_corpus())
    assert sorted(f.sha256 for f in split.knowledge_base) == ["l1", "r1"]
    assert sorted(f.sha256 for f in split.queries) == ["l3", "r2"]


def test_split_third_party_queries_expect_nobody() -> None:
    split = split_third_party_queries(release_corpus())
    assert [f.sha256 for f in split.queries] == ["m1"]
    assert split.expected(split.queries[0]) is None
    assert "m1" not in {f.sha256 for f in split.knowledge_base}


def test_xcomp_representatives_prefer_base_and_skip_fragments() -> None:
    functions = (
        GroundTruthFunction("_init", "_init", 0x1000, 0),
        GroundTruthFunction("a.c:f.constprop.0", "a.c:f", 0x2000, 80),
        GroundTruthFunction("a.c:f", "a.c:f", 0x2100, 60),
        GroundTruthFunction("a.c:g.cold", "a.c:g", 0x2200, 90),
        GroundTruthFunction("a.c:g.isra.0", "a.c:g", 0x2300, 50),
        GroundTruthFunction("h", "h", 0x2400, 10),
    )
    build = XcompBuild("zlib", "gcc", "O2", Path("libz.so"), functions)
    chosen = build.representatives(min_size=40)
    assert {key: f.address for key, f in chosen.items()} == {"a.c:f": 0x2100, "a.c:g": 0x2300}


def test_render_table_markdown_columns() -> None:
    table = render_table(["engine", "R@1"], [["mcrit", 0.25], ["earmark", float("nan")]])
    lines = table.splitlines()
    assert lines[0] == "| engine  | R@1   |"
    assert lines[1] == "|---------|-------|"
    assert lines[3] == "| earmark | nan   |"
