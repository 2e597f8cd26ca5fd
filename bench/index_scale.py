"""Function-index benchmarks.

    python bench/index_scale.py scale --rows 1000000 10000000   # latency, memory, bytes/function
    python bench/index_scale.py min-size                        # what counts as a noise function
    python bench/index_scale.py kb --db earmark.db              # bytes/function of a real KB

``scale`` fills the index with synthetic signatures (random MinHash rows, 1 % "library"
functions copied many times, planted near-duplicates of the query functions at Jaccard
0.5..1.0), built in chunks of 2^20 rows so 10^7 rows fit in memory. Each size is then loaded
from disk in a fresh process, so the RSS delta is the index alone, and queried with a
1,000-function sample (p50/p95 over repeated queries).

``min-size`` disassembles the symbol-bounded functions of the xcomp corpus (zlib, zstd, brotli
built by gcc and clang at five -O levels; see ../shared/corpus/README.md), normalises them and
reports, per instruction count, how often a function body also occurs in an unrelated library:
the noise that MIN_INSTRUCTIONS cuts away.

``kb`` builds the index of an existing knowledge base and reports its bytes per function by
column: real KBs share code between samples (versions of one project, statically linked
libraries), so more of their clusters span several samples than in the synthetic one.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil

from earmark.index import FunctionIndex, FunctionIndexBuilder, QueryFunctions, candidate_probability
from earmark.model.kb import FunctionTable, Provenance, SampleLabel, SampleRecord
from earmark.model.sample import MINHASH_PERMUTATIONS

CHUNK_ROWS = 1 << 20
QUERY_FUNCTIONS = 1000
PLANTED_LEVELS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # Jaccard of planted near-duplicates
PLANTED_PER_LEVEL = 60  # 360 of the 1,000 query functions have a planted twin
LIBRARY_FUNCTIONS = 1000  # distinct "runtime" functions copied into 1 % of all rows
FUNCTIONS_PER_SAMPLE = 1000
FAMILIES = 200
REPEATS = 15
CORPUS = Path.home() / ".cache" / "earmark-corpus"


def _random_signatures(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.integers(0, 1 << 32, size=(rows, MINHASH_PERMUTATIONS), dtype=np.uint32)


def _with_jaccard(rng: np.random.Generator, base: np.ndarray, jaccard: float) -> np.ndarray:
    """Copy of ``base`` whose slots agree with probability ``jaccard`` (a MinHash twin)."""
    changed = rng.random(base.shape) >= jaccard
    return np.where(changed, _random_signatures(rng, base.shape[0]), base).astype(np.uint32)


def _query_set(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    library = _random_signatures(rng, LIBRARY_FUNCTIONS)
    queries = _random_signatures(rng, QUERY_FUNCTIONS)
    queries[-100:] = library[:100]  # a tenth of a real sample is runtime/library code
    exact = rng.integers(0, 1 << 63, size=QUERY_FUNCTIONS, dtype=np.uint64)
    return library, queries, exact


def build_index(rows: int, directory: Path, seed: int = 7) -> dict[str, float]:
    """Build a synthetic index of ``rows`` functions in chunks and save it to ``directory``."""
    library, queries, query_exact = _query_set(seed)
    rng = np.random.default_rng(seed + 1)
    planted_rows = rng.choice(rows, size=PLANTED_PER_LEVEL * len(PLANTED_LEVELS), replace=False)
    planted_signatures = np.concatenate(
        [
            _with_jaccard(
                rng, queries[level * PLANTED_PER_LEVEL : (level + 1) * PLANTED_PER_LEVEL], j
            )
            for level, j in enumerate(PLANTED_LEVELS)
        ]
    )
    builder = FunctionIndexBuilder(revision=rows)
    started, cpu_started = time.perf_counter(), time.process_time()
    for start in range(0, rows, CHUNK_ROWS):
        count = min(CHUNK_ROWS, rows - start)
        minhash = _random_signatures(rng, count)
        exact = rng.integers(0, 1 << 63, size=count, dtype=np.uint64)
        library_rows = np.flatnonzero(rng.random(count) < 0.01)
        picks = rng.integers(0, LIBRARY_FUNCTIONS, size=len(library_rows))
        minhash[library_rows] = library[picks]
        exact[library_rows] = picks.astype(np.uint64)  # same code, same exact hash
        planted_here = np.flatnonzero((planted_rows >= start) & (planted_rows < start + count))
        minhash[planted_rows[planted_here] - start] = planted_signatures[planted_here]
        identical = planted_here[planted_here < PLANTED_PER_LEVEL]  # the J = 1.0 level
        exact[planted_rows[identical] - start] = query_exact[identical]
        builder.add(
            FunctionTable(
                function_id=np.arange(start, start + count, dtype=np.int64),
                sample_id=np.arange(start, start + count, dtype=np.int64) // FUNCTIONS_PER_SAMPLE,
                address=np.zeros(count, dtype=np.uint64),
                size=np.full(count, 64, dtype=np.uint32),
                instruction_count=np.full(count, 20, dtype=np.uint32),
                exact_hash=exact,
                minhash=minhash,
            )
        )
    index = builder.finish()
    built, built_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    samples = _synthetic_samples(rows, seed)
    started, cpu_started = time.perf_counter(), time.process_time()
    index = index.with_rarity(samples)
    rarity_seconds = time.perf_counter() - started
    rarity_cpu = time.process_time() - cpu_started
    index.save(directory)
    np.save(directory / "bench_planted_rows.npy", planted_rows)
    return {
        "build_seconds": built,
        "build_cpu_seconds": built_cpu,
        "rarity_seconds": rarity_seconds,
        "rarity_cpu_seconds": rarity_cpu,
        "build_peak_rss_mb": psutil.Process().memory_info().rss / 2**20,
    }


def _synthetic_samples(rows: int, seed: int) -> dict[int, SampleRecord]:
    rng = np.random.default_rng(seed + 2)
    provenance = Provenance(source="bench", recorded_at=datetime(2025, 1, 1, tzinfo=UTC))
    samples: dict[int, SampleRecord] = {}
    for sample_id in range((rows + FUNCTIONS_PER_SAMPLE - 1) // FUNCTIONS_PER_SAMPLE):
        goodware = bool(rng.random() < 0.1)
        family = None if goodware else f"family-{int(rng.integers(FAMILIES))}"
        label = SampleLabel(actor=None, family=family, goodware=goodware, provenance=provenance)
        samples[sample_id] = SampleRecord(
            sample_id=sample_id,
            sha256=f"{sample_id:064x}",
            format="pe",
            arch="x86_64",
            size=0,
            function_count=FUNCTIONS_PER_SAMPLE,
            labels=(label,),
        )
    return samples


def measure_index(rows: int, directory: Path, memory_map: bool, seed: int = 7) -> dict[str, float]:
    """Load ``directory`` (fresh process) and time 1,000-function queries."""
    _, queries, query_exact = _query_set(seed)
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    index = FunctionIndex.load(directory, revision=rows, memory_map=memory_map)
    assert index is not None and index.rarity is not None
    loaded = process.memory_info().rss
    batch = QueryFunctions(
        exact_hash=query_exact,
        minhash=queries,
        instruction_count=np.full(QUERY_FUNCTIONS, 20, dtype=np.uint32),
    )
    latencies = []
    cpu = []
    for _ in range(REPEATS):
        started, cpu_started = time.perf_counter(), time.process_time()
        matches = index.query(batch, min_similarity=0.5, top_k=20)
        index.rarity.weights(matches.row)
        latencies.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    after = process.memory_info().rss
    candidates = index.query(batch, min_similarity=0.0, top_k=1000)
    candidate_pairs = set(
        zip(candidates.query.tolist(), candidates.function_id.tolist(), strict=True)
    )
    planted_rows = np.load(directory / "bench_planted_rows.npy")
    found = set(zip(matches.query.tolist(), matches.function_id.tolist(), strict=True))
    recall = {}
    for level, jaccard in enumerate(PLANTED_LEVELS):
        wanted = range(level * PLANTED_PER_LEVEL, (level + 1) * PLANTED_PER_LEVEL)
        hits = sum(1 for q in wanted if (q, int(planted_rows[q])) in found)
        recall[f"recall_at_{jaccard}"] = hits / PLANTED_PER_LEVEL
        as_candidate = sum(1 for q in wanted if (q, int(planted_rows[q])) in candidate_pairs)
        recall[f"candidate_recall_at_{jaccard}"] = as_candidate / PLANTED_PER_LEVEL
        recall[f"theory_at_{jaccard}"] = candidate_probability(jaccard)
    unrelated = range(len(PLANTED_LEVELS) * PLANTED_PER_LEVEL, QUERY_FUNCTIONS - 100)
    on_disk = sum(
        path.stat().st_size for path in directory.iterdir() if path.name != "bench_planted_rows.npy"
    )
    return {
        "memory_map_columns": memory_map,
        "rows": len(index),
        "lookup_bytes_per_function": index.lookup_nbytes / len(index),
        "index_bytes_per_function": index.nbytes / len(index),
        "rarity_bytes_per_function": index.rarity.nbytes / len(index),
        "whole_index_bytes_per_function": (index.nbytes + index.rarity.nbytes) / len(index),
        "on_disk_bytes_per_function": on_disk / len(index),
        "rarity_profiles": len(index.rarity.owner_count),
        "column_widths": {
            "band_orders": index.band_orders.width,
            "function_id": index.function_id.width,
            "sample_position": index.sample_position.width,
            "rarity_profile": index.rarity.profile.width,
        },
        "rss_bytes_per_function_after_load": (loaded - before) / len(index),
        "rss_delta_mb_after_load": (loaded - before) / 2**20,
        "rss_delta_mb_after_queries": (after - before) / 2**20,
        "p50_seconds": float(np.percentile(latencies, 50)),
        "p95_seconds": float(np.percentile(latencies, 95)),
        "p50_cpu_seconds": float(np.percentile(cpu, 50)),
        "matches": len(matches),
        "unrelated_queries_matched": sum(1 for q in unrelated if q in set(matches.query.tolist())),
        "truncated_buckets": matches.truncated_buckets,
        **recall,
    }


def run_scale(sizes: list[int]) -> None:
    for rows in sizes:
        with tempfile.TemporaryDirectory(prefix="earmark-index-") as temporary:
            directory = Path(temporary) / "index"
            build = build_index(rows, directory)
            gc.collect()
            for mode in ("in-memory", "memory-mapped"):
                measured = subprocess.run(
                    [sys.executable, __file__, "_measure", str(rows), str(directory), mode],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                result = {**build, **json.loads(measured.stdout)}
                print(json.dumps(result, indent=1), flush=True)


def run_kb(database: str) -> None:
    from earmark.store import open_store

    with open_store(database) as store:
        samples = dict(store.sample_labels())
        table = store.load_function_table()
        started, cpu_started = time.perf_counter(), time.process_time()
        index = FunctionIndex.build(table, store.revision(), samples)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    assert index.rarity is not None
    rows = max(len(index), 1)
    columns = {
        "signatures": index.signatures.nbytes,
        "band_orders": index.band_orders.nbytes,
        "exact_hash": index.exact_hash.nbytes,
        "function_id": index.function_id.nbytes,
        "sample_position": index.sample_position.nbytes,
        "sample_ids": index.sample_ids.nbytes,
        **{name: array.nbytes for name, array in index.rarity.arrays().items()},
    }
    with tempfile.TemporaryDirectory(prefix="earmark-index-") as temporary:
        index.save(Path(temporary) / "index")
        on_disk = sum(path.stat().st_size for path in (Path(temporary) / "index").iterdir())
    result = {
        "samples": len(index.sample_ids),
        "stored_functions": len(table),
        "indexed_functions": len(index),
        "rarity_profiles": len(index.rarity.owner_count),
        "build_seconds": seconds,
        "build_cpu_seconds": cpu_seconds,
        "bytes_per_function": {name: size / rows for name, size in columns.items()},
        "whole_index_bytes_per_function": (index.nbytes + index.rarity.nbytes) / rows,
        "on_disk_bytes_per_function": on_disk / rows,
    }
    print(json.dumps(result, indent=1))


# --- min-size: noise functions on the xcomp corpus -------------------------------------------

_NUMBER = re.compile(r"0x[0-9a-f]+|\b\d+\b")


def _normalise(mnemonic: str, operands: str) -> str:
    def mask(match: re.Match[str]) -> str:
        value = int(match.group(0), 0)
        return match.group(0) if value < 0x1000 else "addr"

    return mnemonic + " " + _NUMBER.sub(mask, operands)


def _function_bodies(library: Path, table: Path) -> list[tuple[int, str]]:
    import capstone
    import lief

    binary = lief.parse(str(library))
    assert binary is not None
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    bodies = []
    for line in table.read_text().splitlines()[1:]:
        fields = line.split("\t")
        address, size = int(fields[3], 16), int(fields[4])
        if size <= 0:
            continue
        code = bytes(binary.get_content_from_virtual_address(address, size))
        tokens = [_normalise(m, o) for _, _, m, o in disassembler.disasm_lite(code, address)]
        digest = hashlib.blake2b("\n".join(tokens).encode(), digest_size=8).hexdigest()
        bodies.append((len(tokens), digest))
    return bodies


def run_min_size() -> None:
    # body hash -> libraries it occurs in, per build configuration (compiler-opt)
    owners: dict[tuple[str, str], set[str]] = defaultdict(set)
    functions: list[tuple[str, str, int, str]] = []
    for table in sorted((CORPUS / "xcomp").glob("*/*/functions.tsv")):
        library_name, config = table.parent.parent.name, table.parent.name
        shared_object = next(table.parent.glob("*.so"))
        for count, digest in _function_bodies(shared_object, table):
            owners[(config, digest)].add(library_name)
            functions.append((library_name, config, count, digest))
    buckets = [(1, 2), (3, 3), (4, 4), (5, 5), (6, 6), (7, 7), (8, 9), (10, 11), (12, 15), (16, 31)]
    buckets.append((32, 1 << 30))
    print("instructions  functions  in-another-library")
    for low, high in buckets:
        chosen = [f for f in functions if low <= f[2] <= high]
        shared = sum(1 for f in chosen if len(owners[(f[1], f[3])]) > 1)
        label = f"{low}-{high}" if high < 1 << 30 else f"{low}+"
        share = shared / len(chosen) if chosen else 0.0
        print(f"{label:>12}  {len(chosen):9d}  {share:8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    scale = commands.add_parser("scale")
    scale.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    commands.add_parser("min-size")
    kb = commands.add_parser("kb")
    kb.add_argument("--db", required=True, help="knowledge base path or URL")
    hidden = commands.add_parser("_measure")
    hidden.add_argument("rows", type=int)
    hidden.add_argument("directory", type=Path)
    hidden.add_argument("mode", choices=("in-memory", "memory-mapped"))
    arguments = parser.parse_args()
    if arguments.command == "scale":
        run_scale(arguments.rows)
    elif arguments.command == "min-size":
        run_min_size()
    elif arguments.command == "kb":
        run_kb(arguments.db)
    else:
        memory_map = arguments.mode == "memory-mapped"
        print(json.dumps(measure_index(arguments.rows, arguments.directory, memory_map)))


if __name__ == "__main__":
    main()
