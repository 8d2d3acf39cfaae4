"""Atomic, checksummed snapshot files of named numpy arrays plus JSON metadata.

A snapshot is written to a temporary file in the same directory, flushed and fsync'd, then
renamed over the final name (and the directory fsync'd), so a reader sees the old file or the
new one, never half of one. The file is a plain `.npz` (no pickle) whose `__sha256__` member is
the digest of every other member's name, dtype, shape and bytes; loading recomputes it and
refuses a file that does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np

_META = "__meta__"
_DIGEST = "__sha256__"


class CorruptSnapshot(ValueError):
    """A snapshot file is truncated, altered or not a snapshot at all."""


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_snapshot(path: str | Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write `arrays` and JSON-serialisable `meta` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    members = dict(arrays)
    members[_META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    members[_DIGEST] = np.frombuffer(_digest(members).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            cast(Any, np.savez)(f, **members)  # numpy's stub types **kwds as its allow_pickle flag
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_NPZ_LOCK = threading.Lock()


def read_npz(source: str | Path | Any) -> dict[str, np.ndarray]:
    """Every array of an .npz file or file-like object (no pickle), one reader at a time.

    numpy parses each member's header with `ast.literal_eval`, and CPython 3.11's parser is not
    safe to enter from several threads at once ("SystemError: AST constructor recursion depth
    mismatch", seen when store shards were restored in parallel), so every npz read in
    freshrec goes through this lock."""
    with _NPZ_LOCK, np.load(source, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def load_snapshot(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a snapshot written by `save_snapshot`.

    Raises:
        FileNotFoundError: there is no file at `path`.
        CorruptSnapshot: the file is incomplete or its checksum does not match.
    """
    path = Path(path)
    try:
        members = read_npz(path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise CorruptSnapshot(f"{path}: unreadable snapshot ({e})") from e
    digest = members.pop(_DIGEST, None)
    if digest is None or _META not in members:
        raise CorruptSnapshot(f"{path}: not a freshrec snapshot")
    if digest.tobytes().decode() != _digest(members):
        raise CorruptSnapshot(f"{path}: checksum mismatch")
    meta = json.loads(members.pop(_META).tobytes())
    return members, meta
