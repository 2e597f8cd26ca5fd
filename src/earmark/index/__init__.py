"""Function index: exact-hash and MinHash-LSH lookup, and rarity of code across the KB.

The index takes a ``FunctionTable`` and a mapping of sample id to ``SampleRecord``; it never
talks to the store itself (see docs/index.md).
"""

from earmark.errors import IndexCacheError
from earmark.index.function_index import (
    DEFAULT_MIN_SIMILARITY,
    DEFAULT_TOP_K,
    MIN_INSTRUCTIONS,
    FunctionIndex,
    FunctionIndexBuilder,
    FunctionMatches,
    QueryFunctions,
    saved_index_revision,
)
from earmark.index.lsh import candidate_probability, s_curve_threshold
from earmark.index.rarity import FunctionRarity, RarityTable, rarity_weight

__all__ = [
    "DEFAULT_MIN_SIMILARITY",
    "DEFAULT_TOP_K",
    "MIN_INSTRUCTIONS",
    "FunctionIndex",
    "FunctionIndexBuilder",
    "FunctionMatches",
    "FunctionRarity",
    "IndexCacheError",
    "QueryFunctions",
    "RarityTable",
    "candidate_probability",
    "rarity_weight",
    "s_curve_threshold",
    "saved_index_revision",
]
