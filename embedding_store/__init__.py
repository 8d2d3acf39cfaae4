"""Collisionless embedding tables: every 64-bit feature key owns its own row.

- `keys`: stable 64-bit feature keys from (slot, raw value).
- `hash_index`: vectorised open-addressing map from keys to dense row ids.
- `base`: the table interface, its config and the delta it drains for sync.
- `local`: the in-process table (rows, row-wise Adagrad state, change tracking).
"""

from embedding_store.base import EmbeddingTable, TableConfig, TableDelta
from embedding_store.hash_index import KeyIndex
from embedding_store.keys import feature_key, feature_keys
from embedding_store.local import LocalTable

__all__ = [
    "EmbeddingTable",
    "KeyIndex",
    "LocalTable",
    "TableConfig",
    "TableDelta",
    "feature_key",
    "feature_keys",
]
