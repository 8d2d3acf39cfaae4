"""Binary encoding of sync messages (numpy .npz, no pickle) for stores that hold bytes."""

from __future__ import annotations

import io

import numpy as np

from embedding_store.base import TableDelta
from embedding_store.snapshot import read_npz
from trainer.items import ItemRecord, UserRecord
from trainer.sync import SyncMessage


def stored_rows(rows: np.ndarray, dtype: np.dtype | type = np.float16) -> np.ndarray:
    """Rows as a serving store keeps them: float32 embeddings as `dtype`, anything else exactly."""
    return rows.astype(dtype) if rows.dtype == np.float32 else rows


def encode(message: SyncMessage, dtype: np.dtype | type = np.float16) -> bytes:
    """Serialise a message; float32 rows are stored as `dtype` (fp16 by default)."""
    extra: dict[str, np.ndarray] = {}
    for name, delta in message.tables.items():
        extra[f"table__{name}__keys"] = delta.keys
        extra[f"table__{name}__rows"] = stored_rows(delta.rows, dtype)
        extra[f"table__{name}__evicted"] = delta.evicted
    extra.update({f"dense__{name}": value for name, value in message.dense.items()})
    name_keys = np.fromiter(message.item_names.keys(), dtype=np.uint64, count=len(message.item_names))
    names = np.array(list(message.item_names.values()), dtype=np.str_)
    buf = io.BytesIO()
    np.savez(
        buf,
        meta=np.array([message.version, message.created_ms, int(message.full)], dtype=np.int64),
        clock=np.array([message.clock_s, message.trending_half_life_s], dtype=np.float64),
        accepted_ms=message.accepted_ms.astype(np.int64),
        user_keys=message.users.keys,
        user_rows=message.users.rows.astype(dtype),
        user_evicted=message.users.evicted,
        item_keys=message.items.keys,
        item_rows=message.items.rows.astype(dtype),
        item_evicted=message.items.evicted,
        name_keys=name_keys,
        names=names,
        erased_users=message.erased_users,
        user_records=np.array([r.to_json() for r in message.user_records.values()], dtype=np.str_),
        catalogue=np.array([r.to_json() for r in message.catalogue.values()], dtype=np.str_),
        seen_users=message.seen_users,
        seen_items=message.seen_items,
        popular_keys=message.popular_keys,
        popular_scores=message.popular_scores,
        **extra,  # type: ignore[arg-type]
    )
    return buf.getvalue()


def decode(data: bytes) -> SyncMessage:
    """Inverse of `encode`; embedding rows come back as float32."""
    z = read_npz(io.BytesIO(data))
    meta, clock = z["meta"], z["clock"]
    tables = {}
    for key in z:
        if key.startswith("table__") and key.endswith("__keys"):
            name = key[len("table__") : -len("__keys")]
            rows = z[f"table__{name}__rows"]
            rows = rows.astype(np.float32) if rows.dtype == np.float16 else rows
            tables[name] = TableDelta(name, z[key], rows, z[f"table__{name}__evicted"])
    dense = {key[len("dense__") :]: z[key] for key in z if key.startswith("dense__")}
    return SyncMessage(
        users=TableDelta("user", z["user_keys"], z["user_rows"].astype(np.float32), z["user_evicted"]),
        items=TableDelta("item", z["item_keys"], z["item_rows"].astype(np.float32), z["item_evicted"]),
        item_names=dict(zip(z["name_keys"].tolist(), z["names"].tolist(), strict=True)),
        seen_users=z["seen_users"],
        seen_items=z["seen_items"],
        popular_keys=z["popular_keys"],
        popular_scores=z["popular_scores"],
        tables=tables,
        dense=dense,
        accepted_ms=z["accepted_ms"],
        erased_users=z["erased_users"] if "erased_users" in z else np.zeros(0, np.uint64),
        user_records={
            r.user_id: r for r in map(UserRecord.from_json, z["user_records"].tolist() if "user_records" in z else [])
        },
        catalogue=_catalogue(z["catalogue"].tolist() if "catalogue" in z else []),
        clock_s=float(clock[0]),
        trending_half_life_s=float(clock[1]),
        version=int(meta[0]),
        created_ms=int(meta[1]),
        full=bool(meta[2]),
    )


def _catalogue(texts: list[str]) -> dict[str, ItemRecord]:
    records = (ItemRecord.from_json(t) for t in texts)
    return {r.item_id: r for r in records}


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """A dict of arrays as npz bytes (no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def decode_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_arrays`."""
    return read_npz(io.BytesIO(data))
