"""Dense parameters shared by trainer workers: one suite over the in-process backend and a
store shard's dense service, with torch's Adam as the reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from embedding_store import TableConfig, open_dense
from embedding_store.dense import DenseAdam, DenseParameters, LocalDense
from embedding_store.remote import RemoteDense, RemoteStore, serve_shard
from trainer.models import DenseModule


@pytest.fixture
def shard() -> Iterator[str]:
    server, port, _ = serve_shard("127.0.0.1:0", workers=2)
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(params=["local", "remote"])
def dense(request: pytest.FixtureRequest) -> Iterator[DenseParameters]:
    backend = LocalDense() if request.param == "local" else RemoteDense(request.getfixturevalue("shard"))
    yield backend
    backend.close()


def torch_adam(initial: np.ndarray, grads: list[np.ndarray], lr: float) -> np.ndarray:
    param = torch.nn.Parameter(torch.from_numpy(initial.copy()))
    optimizer = torch.optim.Adam([param], lr=lr)
    for g in grads:
        param.grad = torch.from_numpy(g)
        optimizer.step()
    return param.detach().numpy()


def test_steps_match_torch_adam(dense: DenseParameters) -> None:
    rng = np.random.default_rng(0)
    initial = rng.normal(size=50).astype(np.float32)
    grads = [rng.normal(size=50).astype(np.float32) * scale for scale in (1.0, 0.1, 10.0, 1e-4, 3.0)]
    assert np.array_equal(dense.register("w", initial, 0.01), initial)
    for n, g in enumerate(grads, start=1):
        values, version = dense.step("w", g)
        assert version == n
    np.testing.assert_allclose(values, torch_adam(initial, grads, 0.01), rtol=1e-5, atol=1e-7)


def test_register_keeps_the_first_values_and_refuses_another_size(dense: DenseParameters) -> None:
    first = np.arange(4, dtype=np.float32)
    dense.register("w", first, 0.1)
    dense.step("w", np.ones(4, np.float32))
    again = dense.register("w", np.zeros(4, np.float32), 0.1)  # a second worker joining
    assert not np.array_equal(again, np.zeros(4)) and not np.array_equal(again, first)
    with pytest.raises(ValueError, match=r"'w'.*4 values"):
        dense.register("w", np.zeros(5, np.float32), 0.1)
    with pytest.raises(ValueError, match="gradient"):
        dense.step("w", np.zeros(3, np.float32))
    with pytest.raises(KeyError, match="'nope'"):
        dense.step("nope", np.zeros(4, np.float32))


def test_workers_stepping_in_turn_equal_one_optimizer_over_all_their_gradients(shard: str) -> None:
    a, b = RemoteDense(shard), RemoteDense(shard)
    rng = np.random.default_rng(1)
    initial = rng.normal(size=20).astype(np.float32)
    a.register("w", initial, 0.05)
    b.register("w", rng.normal(size=20).astype(np.float32), 0.05)  # ignored: "w" exists
    grads = [rng.normal(size=20).astype(np.float32) for _ in range(6)]
    for n, g in enumerate(grads):
        values, version = (a if n % 2 else b).step("w", g)
    assert version == 6
    np.testing.assert_allclose(values, torch_adam(initial, grads, 0.05), rtol=1e-5, atol=1e-7)
    a.close()
    b.close()


def test_the_shard_saves_and_restores_dense_parameters_with_its_tables(shard: str, tmp_path: Path) -> None:
    store = RemoteStore(shard, [TableConfig("t", 4)])
    dense = RemoteDense(shard)
    dense.register("w", np.ones(8, np.float32), 0.1)
    saved, _ = dense.step("w", np.full(8, 0.5, np.float32))
    store.save(tmp_path)
    dense.step("w", np.ones(8, np.float32))
    store.restore(tmp_path)
    assert np.array_equal(dense.register("w", np.zeros(8, np.float32), 0.1), saved)
    values, version = dense.step("w", np.full(8, 0.5, np.float32))
    assert version == 2  # the optimizer state came back too: one step after the saved one
    expected = torch_adam(np.ones(8, np.float32), [np.full(8, 0.5, np.float32)] * 2, 0.1)
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    store.close()
    dense.close()


def test_local_state_dict_round_trips() -> None:
    dense = LocalDense()
    dense.register("w", np.ones(3, np.float32), 0.1)
    dense.step("w", np.ones(3, np.float32))
    copy = LocalDense()
    copy.load_state_dict(dense.state_dict())
    assert np.array_equal(copy.step("w", np.ones(3, np.float32))[0], dense.step("w", np.ones(3, np.float32))[0])


def test_dense_module_trains_a_torch_module_through_the_backend(dense: DenseParameters) -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(3, 1)
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(module.state_dict())
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    wrapped = DenseModule("linear", module, dense, 0.01)
    x = torch.randn(16, 3)
    for _ in range(3):
        wrapped.zero_grad()
        module(x).pow(2).sum().backward()
        wrapped.step()
        optimizer.zero_grad()
        reference(x).pow(2).sum().backward()
        optimizer.step()
    for mine, theirs in zip(module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert wrapped.version == 3


def test_open_dense_follows_the_store_url(shard: str) -> None:
    assert isinstance(open_dense("local://?shards=2"), LocalDense)
    remote = open_dense(f"grpc://{shard},127.0.0.1:1")
    assert isinstance(remote, RemoteDense) and remote.address == shard
    remote.close()


def test_adam_refuses_a_gradient_of_another_shape() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        DenseAdam(np.zeros(2), 0.1).step(np.zeros(3, np.float32))
