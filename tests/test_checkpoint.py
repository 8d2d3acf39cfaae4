"""Trainer checkpoints: a trainer resumed from one continues exactly as the one that wrote it,
offsets are committed only once a checkpoint reflects them, and a half-written checkpoint is
never resumed from."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embedding_store import feature_keys
from tests.test_ranking import events
from trainer.checkpoint import load_latest, save_checkpoint
from trainer.config import TrainerConfig
from trainer.eventlog import MemoryLog
from trainer.loop import Trainer

CONFIG = TrainerConfig(batch_size=128, blend_users=16, checkpoint_interval_s=3600.0)


def fill(log: MemoryLog, n: int, seed: int = 0) -> None:
    log.append(events(n, seed))


def drain(trainer: Trainer) -> int:
    """Train until the log has nothing more for it; the number of events trained."""
    total = 0
    while True:
        step = trainer.poll_and_train()
        total += step.events
        if not step.events and trainer._consumer.lag() == 0:
            return total


def snapshot(trainer: Trainer) -> dict[str, object]:
    """What a resumed trainer must agree on: rows, dense parameters, features, counts, AUC."""
    users = feature_keys("user", [f"u{u}" for u in range(50)])
    items = feature_keys("item", [f"i{i}" for i in range(200)])
    return {
        "users": trainer.users.get(users)[0],
        "items": trainer.items.get(items)[0],
        "dense": trainer.models.dense_state(),
        "history": trainer.features.histories(users, 20),
        "counts": trainer.catalog.counts(items),
        "auc": (trainer.auc.value(), trainer.auc.log_loss()),
        "events_trained": trainer.events_trained,
        "clock": trainer.clock.now_s,
    }


def assert_same(a: dict[str, object], b: dict[str, object], rtol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        pairs = [(a[key], b[key], key)]
        if isinstance(a[key], dict):
            left, right = a[key], b[key]
            assert isinstance(left, dict) and isinstance(right, dict) and left.keys() == right.keys(), key
            pairs = [(left[name], right[name], f"{key}.{name}") for name in left]
        for x, y, what in pairs:
            if rtol:
                np.testing.assert_allclose(np.asarray(x, float), np.asarray(y, float), rtol, 1e-4, err_msg=what)
            else:
                np.testing.assert_equal(x, y, err_msg=what)


def test_a_resumed_trainer_continues_exactly_as_the_original(tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path))
    log = MemoryLog(partitions=2)
    fill(log, 2000)
    original = Trainer(config, log.consumer("g"))
    assert drain(original) == 2000
    original.checkpoint()
    committer = log.consumer("resumed")  # its group reads the same batches as the original from here
    committer.commit(original._offsets)
    committer.close()
    resumed = Trainer(config, log.consumer("resumed"))
    assert resumed.events_trained == 2000  # it resumed: counters, tables, models, features
    assert_same(snapshot(original), snapshot(resumed))
    fill(log, 1000, seed=1)
    torch.manual_seed(1)
    assert drain(original) == 1000
    torch.manual_seed(1)
    assert drain(resumed) == 1000
    # every piece of state was in the checkpoint: the same steps give the same model, up to
    # float summation order (the two differ by 2e-7 in rows and up to 3e-5 in the attention's
    # last bias, whose gradient is ~0 and which Adam scales up); a missing piece — optimizer
    # state, features, counts, sampler, a cache that follows the wall clock — changes far more
    assert_same(snapshot(original), snapshot(resumed), rtol=1e-3)


def test_offsets_are_committed_only_with_a_checkpoint(tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path))
    log = MemoryLog(partitions=2)
    fill(log, 600)
    trainer = Trainer(config, log.consumer("g"))
    assert drain(trainer) == 600
    trainer._consumer.close()
    assert drain(Trainer(CONFIG, log.consumer("g"))) == 600  # nothing committed: all replayed

    trainer = Trainer(config, log.consumer("g2"))  # resumes the (empty) checkpoint dir: none yet
    assert trainer.events_trained == 0 and drain(trainer) == 600
    path = trainer.checkpoint()
    assert path is not None and (path / "trainer.pt").is_file()
    trainer._consumer.close()
    assert drain(Trainer(CONFIG, log.consumer("g2"))) == 0  # committed with the checkpoint
    # a crash between the checkpoint and its commit: a resumed trainer reads those records
    # again and skips them (the state has them), so each event counts once
    resumed = Trainer(config, log.consumer("commit-lost"))
    assert drain(resumed) == 0 and resumed.events_trained == 600
    fill(log, 100, seed=5)
    assert drain(resumed) == 100 and resumed.events_trained == 700


def test_only_complete_checkpoints_are_resumed_and_old_ones_go(tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path), checkpoints_kept=2)
    log = MemoryLog()
    trainer = Trainer(config, log.consumer("g"))
    for n in range(3):
        fill(log, 200, seed=n)
        drain(trainer)
        trainer.checkpoint()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-000000000002", "ckpt-000000000003"]  # the oldest was deleted
    # a crash while writing the next one: its store is there, its trainer state is not
    torn = tmp_path / "ckpt-000000000004"
    trainer.store.save(torn / "store")
    (torn / "trainer.pt.tmp").write_bytes(b"half a pickle")
    fresh = Trainer(dataclasses.replace(config, checkpoint_dir=""), MemoryLog().consumer("x"))
    state = load_latest(tmp_path, fresh.store)
    assert state is not None and state["events_trained"] == 600  # checkpoint 3, not the torn one
    # a damaged newest checkpoint falls back to the one before: start-up is not blocked
    (tmp_path / "ckpt-000000000003" / "trainer.pt").write_bytes(b"not a checkpoint")
    state = load_latest(tmp_path, fresh.store)
    assert state is not None and state["events_trained"] == 400  # checkpoint 2
    assert fresh.users.get(feature_keys("user", ["u0"]))[1].all()  # and its tables
    (tmp_path / "ckpt-000000000002" / "trainer.pt").write_bytes(b"nor this one")
    with pytest.raises(ValueError, match=r"ckpt-000000000002.*ckpt-000000000003|ckpt-000000000003.*ckpt-000000000002"):
        load_latest(tmp_path, fresh.store)


@dataclasses.dataclass
class Holder:
    """State kept as an object's attributes, as the joiner and the catalog are."""

    rows: np.ndarray


def test_arrays_in_the_state_are_saved_as_records_and_come_back_as_arrays(tmp_path: Path) -> None:
    """NumPy arrays, in containers or objects, go into trainer.pt as tensor records written
    from memory, not copied into the pickle (which held several times their size while a
    checkpoint was written), and load as arrays of the same dtype and values; strings, objects
    and containers stay as they were."""
    big = np.random.default_rng(0).random(500_000)  # 4 MB
    state: dict[str, Any] = {
        "big": big,
        "holder": Holder(np.arange(200_000, dtype=np.int64)),  # 1.6 MB
        "keys": np.arange(5, dtype=np.uint64),
        "half": np.ones((2, 3), np.float16)[:, 1],  # not contiguous
        "flags": np.array([True, False]),
        "names": np.array(["a", "b"]),
        "nested": [("u1", "i1", None), (np.arange(3, dtype=np.int32), 7)],
        "tensor": torch.arange(4),
    }
    trainer = Trainer(CONFIG, MemoryLog().consumer("g"))  # for its store
    path = save_checkpoint(tmp_path, trainer.store, state)
    with zipfile.ZipFile(path / "trainer.pt") as z:
        pickled = max((i for i in z.infolist() if i.filename.endswith("data.pkl")), key=lambda i: i.file_size)
    assert pickled.file_size < 10_000  # the 5.6 MB are not in the pickle
    loaded = load_latest(tmp_path, trainer.store)
    assert loaded is not None
    for name in ("big", "keys", "half", "flags", "names"):
        assert type(loaded[name]) is np.ndarray and loaded[name].dtype == state[name].dtype, name
        np.testing.assert_array_equal(loaded[name], state[name], err_msg=name)
    assert type(loaded["holder"].rows) is np.ndarray
    np.testing.assert_array_equal(loaded["holder"].rows, state["holder"].rows)
    assert loaded["nested"][0] == ("u1", "i1", None)
    np.testing.assert_array_equal(loaded["nested"][1][0], np.arange(3, dtype=np.int32))
    assert loaded["nested"][1][1] == 7 and torch.equal(loaded["tensor"], torch.arange(4))
