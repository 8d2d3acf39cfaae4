"""Binary encoding of sync messages (no pickle) for stores that hold bytes.

A message is a set of named numpy arrays, framed as: the magic `MAGIC`, a little-endian
uint32 header length, a JSON header (each array's name, dtype, shape and byte offset), then
the arrays' bytes, each at an 8-byte-aligned offset. Decoding is one copy of the buffer and a
view per array. It replaced .npz (a zip whose every member header numpy parses with
`ast.literal_eval`, under a process-wide lock), which cost the embedded store more than the
rest of a sync; bytes written as .npz by earlier versions are still read.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np

from embedding_store.base import TableDelta
from embedding_store.snapshot import read_npz
from trainer.items import ItemRecord, UserRecord
from trainer.sync import SyncMessage

MAGIC = b"FRSYNC1\n"
_ALIGN = 8


def pack(arrays: dict[str, np.ndarray]) -> bytes:
    """Named arrays as one buffer (see the module docstring).

    Example:
        >>> out = unpack(pack({"a": np.arange(3, dtype=np.uint64), "s": np.array(["x", "yz"])}))
        >>> out["a"].tolist(), out["s"].tolist()
        ([0, 1, 2], ['x', 'yz'])
    """
    header, chunks, offset = {}, [], 0
    for name, value in arrays.items():
        array = np.ascontiguousarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"{name}: object arrays cannot be encoded")
        header[name] = [array.dtype.str, list(array.shape), offset]
        data = array.tobytes()
        pad = -len(data) % _ALIGN
        chunks.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(len(MAGIC) + 4 + len(head)) % _ALIGN)
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *chunks])


def unpack(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `pack` (writable arrays); .npz bytes of earlier versions are read too."""
    if not data.startswith(MAGIC):
        return read_npz(io.BytesIO(data))
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(data[start : start + length])
    body = bytearray(memoryview(data)[start + length :])
    out = {}
    for name, (dtype, shape, offset) in header.items():
        dt = np.dtype(dtype)
        if dt.hasobject:  # never from `pack`: refused, as pickles are
            raise ValueError(f"{name}: object arrays cannot be decoded")
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(body, dtype=dt, count=count, offset=offset).reshape(shape)
    return out


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
    return pack(
        dict(
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
            **extra,
        )
    )


def decode(data: bytes) -> SyncMessage:
    """Inverse of `encode`; embedding rows come back as float32."""
    z = unpack(data)
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
    """A dict of arrays as bytes (`pack`)."""
    return pack(arrays)


def decode_arrays(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of `encode_arrays`."""
    return unpack(data)
