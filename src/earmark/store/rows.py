"""One sample's rows as the store writes them, computed without a database.

``prepare_sample`` is pure (features and their frozen bytes in, plain values out), so ingest
workers run it in parallel and send the writing process only what it inserts: a few sample
columns, the frozen features and the function columns as numpy arrays. Pickling whole
``SampleFeatures`` instead (every token of every function) measured 86 MB for 39.6k corpus
functions and ~2 s of the writer's CPU to unpickle; these records are ~25 % of that size and
cost almost nothing to unpickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import numpy.typing as npt

from earmark.errors import StoreError
from earmark.model.sample import MINHASH_PERMUTATIONS, SampleFeatures

# Bytes of one stored MinHash signature (little-endian uint32 values).
MINHASH_BLOB_BYTES = MINHASH_PERMUTATIONS * 4

# One row of the functions table, columns in FUNCTION_ROW_COLUMNS order (address and
# exact_hash as signed int64).
FunctionRow = tuple[int, int, int, int, int, int, int, bytes]
FUNCTION_ROW_COLUMNS = (
    "sample_id",
    "address",
    "size",
    "instruction_count",
    "block_count",
    "exact_hash",
    "minhash",
)


@dataclass(frozen=True, slots=True, eq=False)
class PreparedSample:
    """The samples-table columns of one sample and its functions' columns (one array entry
    per function, in the features' order). Unsigned 64-bit values are kept as the int64 with
    the same bits, because SQLite and PostgreSQL integers are signed 64-bit."""

    sha256: str  # lower case, like every column below that holds a digest
    sha1: str
    md5: str
    size: int
    format: str
    arch: str
    bits: int
    imphash: str | None
    tlsh: str | None
    pdb_path: str | None
    rich_header: str | None  # JSON: {"key", "checksum_valid", "entries": [[id, build, count]]}
    format_version: str
    analyzer_version: str
    features_blob: bytes  # the store codec's frozen features
    addresses: npt.NDArray[np.int64]
    sizes: npt.NDArray[np.int64]
    instruction_counts: npt.NDArray[np.int64]
    block_counts: npt.NDArray[np.int64]
    exact_hashes: npt.NDArray[np.int64]
    minhashes: npt.NDArray[np.uint32]  # (function_count, MINHASH_PERMUTATIONS)

    @property
    def function_count(self) -> int:
        return len(self.addresses)

    def function_rows(self, sample_id: int) -> list[FunctionRow]:
        """One row per function, ready for the driver's executemany."""
        blob = self.minhashes.astype("<u4", copy=False).tobytes()
        signatures = [
            blob[start : start + MINHASH_BLOB_BYTES]
            for start in range(0, len(blob), MINHASH_BLOB_BYTES)
        ]
        return list(
            zip(
                repeat(sample_id, self.function_count),
                self.addresses.tolist(),
                self.sizes.tolist(),
                self.instruction_counts.tolist(),
                self.block_counts.tolist(),
                self.exact_hashes.tolist(),
                signatures,
                strict=True,
            )
        )


def _signed64(values: list[int]) -> npt.NDArray[np.int64]:
    """The int64s with the same bits as unsigned 64-bit values."""
    return np.array(values, dtype=np.uint64).view(np.int64)


def _rich_header_json(features: SampleFeatures) -> str | None:
    rich = features.pe.rich_header if features.pe else None
    if rich is None:
        return None
    entries = [[e.product_id, e.build, e.count] for e in rich.entries]
    return json.dumps({"key": rich.key, "checksum_valid": rich.checksum_valid, "entries": entries})


def prepare_sample(features: SampleFeatures, features_blob: bytes) -> PreparedSample:
    """The rows of ``features``; raises ``StoreError`` for a function whose MinHash has the
    wrong length (features from another configuration)."""
    functions = features.functions
    for function in functions:
        if len(function.minhash) != MINHASH_PERMUTATIONS:
            raise StoreError(
                f"function at {function.address:#x} has {len(function.minhash)} MinHash "
                f"values, expected {MINHASH_PERMUTATIONS}"
            )
    minhashes = np.array([function.minhash for function in functions], dtype=np.uint32).reshape(
        len(functions), MINHASH_PERMUTATIONS
    )
    pe = features.pe
    return PreparedSample(
        sha256=features.sha256.lower(),
        sha1=features.sha1.lower(),
        md5=features.md5.lower(),
        size=features.size,
        format=features.format,
        arch=features.arch,
        bits=features.bits,
        imphash=pe.imphash if pe else None,
        tlsh=features.tlsh,
        pdb_path=pe.pdb_path if pe else None,
        rich_header=_rich_header_json(features),
        format_version=features.format_version,
        analyzer_version=features.analyzer_version,
        features_blob=features_blob,
        addresses=_signed64([function.address for function in functions]),
        sizes=np.array([function.size for function in functions], dtype=np.int64),
        instruction_counts=np.array(
            [function.instruction_count for function in functions], dtype=np.int64
        ),
        block_counts=np.array([function.block_count for function in functions], dtype=np.int64),
        exact_hashes=_signed64([function.exact_hash for function in functions]),
        minhashes=minhashes,
    )
