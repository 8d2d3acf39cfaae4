"""Binary encoding of sync messages (numpy .npz, no pickle) for stores that hold bytes."""

from __future__ import annotations

import io

import numpy as np

from embedding_store.base import TableDelta
from trainer.sync import SyncMessage


def encode(message: SyncMessage, dtype: np.dtype | type = np.float16) -> bytes:
    """Serialise a message; rows are stored as `dtype` (fp16 by default)."""
    name_keys = np.fromiter(message.item_names.keys(), dtype=np.uint64, count=len(message.item_names))
    names = np.array(list(message.item_names.values()), dtype=np.str_)
    buf = io.BytesIO()
    np.savez(
        buf,
        meta=np.array([message.version, message.created_ms, int(message.full)], dtype=np.int64),
        user_keys=message.users.keys,
        user_rows=message.users.rows.astype(dtype),
        user_evicted=message.users.evicted,
        item_keys=message.items.keys,
        item_rows=message.items.rows.astype(dtype),
        item_evicted=message.items.evicted,
        name_keys=name_keys,
        names=names,
        seen_users=message.seen_users,
        seen_items=message.seen_items,
        popular_keys=message.popular_keys,
        popular_scores=message.popular_scores,
    )
    return buf.getvalue()


def decode(data: bytes) -> SyncMessage:
    """Inverse of `encode`; rows come back as float32."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        meta = z["meta"]
        return SyncMessage(
            users=TableDelta("user", z["user_keys"], z["user_rows"].astype(np.float32), z["user_evicted"]),
            items=TableDelta("item", z["item_keys"], z["item_rows"].astype(np.float32), z["item_evicted"]),
            item_names=dict(zip(z["name_keys"].tolist(), z["names"].tolist(), strict=True)),
            seen_users=z["seen_users"],
            seen_items=z["seen_items"],
            popular_keys=z["popular_keys"],
            popular_scores=z["popular_scores"],
            version=int(meta[0]),
            created_ms=int(meta[1]),
            full=bool(meta[2]),
        )
