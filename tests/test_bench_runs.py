"""How bench/attribution_pe.py combines an engine's child runs: timed runs without the memory
sampler, memory figures from one run with it (hand-made run records, known answers)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# bench/ is a tool directory beside src/, not an installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attribution_pe import median_run, render_repeats, with_memory_of
from bench.common import unwatched_memory


def run(wall: float, memory: int, scores: dict[str, float] | None = None) -> dict[str, Any]:
    """A child's result for settings (a) and (c): index walls ``wall`` and ``wall / 2``,
    every memory figure ``memory``."""
    phases = [
        {
            "setting": setting,
            "index": {
                "wall_seconds": wall / divisor,
                "functions_added": 1000,
                "peak_rss_bytes": memory,
                "tree_peak_rss_bytes": memory,
            },
            "query_peak_rss_bytes": memory,
            "query_tree_peak_rss_bytes": memory,
            "queries": [{"path": "q.dll", "scores": scores or {"lz4": 0.9}}],
        }
        for setting, divisor in (("a", 1), ("c", 2))
    ]
    return {
        "engine": "earmark",
        "phases": phases,
        "peak_rss_bytes": memory,
        "peak_child_rss_bytes": memory,
    }


def test_timed_run_keeps_its_walls_and_takes_every_memory_figure_of_the_sampled_run() -> None:
    timed, sampled = run(3.0, 0), run(3.3, 200)
    merged = with_memory_of(timed, sampled)
    assert [p["index"]["wall_seconds"] for p in merged["phases"]] == [3.0, 1.5]
    for phase in merged["phases"]:
        assert phase["index"]["peak_rss_bytes"] == phase["index"]["tree_peak_rss_bytes"] == 200
        assert phase["query_peak_rss_bytes"] == phase["query_tree_peak_rss_bytes"] == 200
    assert merged["peak_rss_bytes"] == merged["peak_child_rss_bytes"] == 200
    assert merged["memory_run"] == {"a": {"wall_seconds": 3.3}, "c": {"wall_seconds": 1.65}}
    assert merged["memory_run_same_scores"] is True
    assert timed["phases"][0]["index"]["peak_rss_bytes"] == 0  # the inputs are not changed
    assert "3.000 s without the memory sampler, 3.300 s in the memory run" in render_repeats(
        [merged]
    )


def test_a_memory_run_with_other_scores_is_flagged() -> None:
    merged = with_memory_of(run(3.0, 0), run(3.3, 200, scores={"lz4": 0.8}))
    assert merged["memory_run_same_scores"] is False
    assert "WARNING: earmark's memory run gave other scores" in render_repeats([merged])


def test_median_of_timed_runs_then_memory() -> None:
    runs = [run(wall, 0) for wall in (3.4, 3.1, 3.9, 3.2, 3.3)]
    chosen = with_memory_of(median_run(runs), run(3.5, 200))
    assert chosen["phases"][0]["index"]["wall_seconds"] == 3.3
    assert [r["a"]["wall_seconds"] for r in chosen["repeats"]] == [3.4, 3.1, 3.9, 3.2, 3.3]
    assert "3.100 / 3.300 / 3.900 s" in render_repeats([chosen])


def test_unwatched_memory_runs_no_sampler() -> None:
    import threading

    before = {thread.name for thread in threading.enumerate()}
    with unwatched_memory() as reading:
        assert "rss-sampler" not in {t.name for t in threading.enumerate()} - before
    assert (reading.start_bytes, reading.peak_bytes, reading.tree_peak_bytes) == (0, 0, 0)


def test_update_doc_replaces_the_generated_text_and_keeps_the_analyses(tmp_path: Path) -> None:
    from bench.attribution_pe import SECTION_TITLE, update_doc

    doc = tmp_path / "benchmarks.md"
    doc.write_text(
        f"# Benchmarks\n\n## Before\n\nkept\n\n{SECTION_TITLE}\n\nold table\n\n"
        "### Analysis of a run\n\nhand-written\n\n## After\n\nalso kept\n",
        encoding="utf-8",
    )
    update_doc(doc, "new table")
    assert doc.read_text(encoding="utf-8") == (
        f"# Benchmarks\n\n## Before\n\nkept\n\n{SECTION_TITLE}\n\nnew table\n\n"
        "### Analysis of a run\n\nhand-written\n\n## After\n\nalso kept\n"
    )
