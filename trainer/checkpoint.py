"""Trainer checkpoints: the embedding store, the dense models and every piece of trainer state,
with the log offsets they reflect, written together and resumed from at start.

Layout under the checkpoint directory::

    ckpt-000000000007/
        store/          Store.save(): one checksummed snapshot per table (per shard, on the
                        shard's host when the store is remote: give the shards the same path)
        trainer.pt      everything else (torch.save), written last: tmp file, fsync, rename

A checkpoint is complete once its `trainer.pt` exists; the newest complete one is what
`load_latest` returns, so a crash while writing leaves the previous checkpoint in charge.
The `checkpoints_kept` newest complete checkpoints are kept, and older ones — complete or
not — are deleted after each write.

Guarantee (with `Trainer`): offsets are committed to the log only after the checkpoint that
reflects them is complete, so every acknowledged event is trained on at least once: a
restart resumes from the checkpoint and the log replays what came after it (events trained
after the checkpoint, before the crash, are trained again). `trainer.pt` is a pickle: load
checkpoints only from a directory you trust.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedding_store import Store

log = logging.getLogger(__name__)

FORMAT = 1
_NAME = re.compile(r"ckpt-(\d{12})")
_STATE = "trainer.pt"


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy array saved by `_Pickler`, back from its tensor (sharing the loaded memory)."""
    return tensor.numpy()


class _Pickler(pickle.Pickler):
    """Pickles each NumPy array, wherever it sits in the state (trainer objects' attributes
    included), as a tensor sharing its memory: torch.save writes a tensor's bytes straight from
    memory as a record of its own, where a pickled array is copied into the pickle first, and
    a checkpoint held several times the state's arrays in memory while it was written. Arrays
    of a dtype torch has not (strings, objects) pickle as before."""

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is np.ndarray and obj.dtype.kind in "biuf" and obj.dtype.isnative:
            with warnings.catch_warnings():  # a read-only array: the tensor is only read (saved)
                warnings.simplefilter("ignore", UserWarning)
                try:
                    return _array, (torch.from_numpy(np.ascontiguousarray(obj)),)
                except TypeError:  # a dtype torch does not take
                    pass
        return NotImplemented


_PICKLE = types.ModuleType("freshrec_checkpoint_pickle")  # what torch.save takes as pickle_module
vars(_PICKLE).update({k: v for k, v in vars(pickle).items() if not k.startswith("__")})
_PICKLE.Pickler = _Pickler  # type: ignore[attr-defined]


def _checkpoints(directory: Path) -> list[tuple[int, Path, bool]]:
    """(sequence, path, complete) of every checkpoint folder, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        m = _NAME.fullmatch(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path, (path / _STATE).is_file()))
    return sorted(found)


def save_checkpoint(
    directory: Path, store: Store, state: dict[str, Any], keep: int = 2, extra: dict[str, bytes] | None = None
) -> Path:
    """Write one checkpoint of `store` and `state` (the trainer's `state_dict()`), plus `extra`
    files (name -> bytes; the embedded serving store's snapshot); returns its folder."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = _checkpoints(directory)
    sequence = (existing[-1][0] + 1) if existing else 1
    path = directory / f"ckpt-{sequence:012d}"
    path.mkdir()
    store.save(path / "store")
    for name, data in (extra or {}).items():
        with open(path / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    tmp = path / f"{_STATE}.tmp"
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f, pickle_module=_PICKLE)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / _STATE)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    folders = [*existing, (sequence, path, True)]  # the listing from before, and this one
    complete = [p for _, p, done in folders if done]
    for _, old, done in folders:
        if not done or old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def latest_file(directory: Path, name: str) -> Path | None:
    """`name` in the newest complete checkpoint that has it (an `extra` file), if any."""
    for _, path, done in reversed(_checkpoints(directory)):
        if done and (path / name).is_file():
            return path / name
    return None


def load_latest(directory: Path, store: Store) -> dict[str, Any] | None:
    """Restore `store` from the newest complete checkpoint that restores and return its
    trainer state (None when there is none). A damaged checkpoint (unreadable state, another
    format, a corrupt or mismatched store snapshot) is logged and the one before it tried.

    Raises:
        ValueError: there are checkpoints, and none of them restores (each one's error named).
    """
    complete = [path for _, path, done in _checkpoints(directory) if done]
    failures = []
    for path in reversed(complete):  # newest first; a damaged one falls back to the one before
        try:
            state: dict[str, Any] = torch.load(path / _STATE, weights_only=False)
            if state.get("format") != FORMAT:
                raise ValueError(f"checkpoint {path}: format {state.get('format')!r}, expected {FORMAT}")
            store.restore(path / "store")
        except Exception as e:
            log.error(
                "checkpoint %s cannot be restored (%s: %s); trying the one before", path.name, type(e).__name__, e
            )
            failures.append(f"{path.name}: {type(e).__name__}: {e}")
            continue
        log.info("restored checkpoint %s (offsets %s)", path.name, state.get("offsets"))
        return state
    if failures:
        raise ValueError(f"no checkpoint in {directory} can be restored: " + "; ".join(failures))
    return None
