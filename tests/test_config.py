import re
from pathlib import Path

import pytest

from services.config import load_config
from services.node import Node
from trainer.config import TrainerConfig


def test_defaults_are_embedded() -> None:
    config = load_config(env={})
    assert config.embedded and config.server.http_port == 8000 and config.server.grpc_port == 50051


def test_file_then_env_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text("[server]\nhttp_port = 8100\ngrpc_port = 50100\n[trainer]\ndim = 16\n")
    config = load_config(
        path, env={"FRESHREC_GRPC_PORT": "50200", "FRESHREC_EMBEDDING_DIM": "8"}, overrides={"server.http_port": 8300}
    )
    assert (config.server.http_port, config.server.grpc_port, config.trainer.dim) == (8300, 50200, 8)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nhttp_prot = 1\n", "server.http_prot: unknown"),
        ("[trainer]\ndim = 'big'\n", "trainer.dim: expected int"),
        ("[trainer]\ndim = 0\n", "trainer.dim"),
        ("log_url = 'kafak://x'\n", "log_url"),
        ("[server]\nhttp_port = 70000\n", "server.http_port"),
        ("[server]\nmax_clock_skew_s = -1.0\n", "server.max_clock_skew_s"),
        ("[trainer]\nmax_clock_skew_s = -1.0\n", "trainer.max_clock_skew_s"),
        ("[trainer]\nmax_clock_jump_s = 0.0\n", "trainer.max_clock_jump_s"),
        ("[trainer]\nstall_after_s = 0.0\n", "trainer.stall_after_s"),
        ("[trainer]\nworkers = 2\n", "trainer.workers: 2 workers share their tables through grpc://"),
        (
            "[trainer]\nworkers = 2\nstore_url = 'grpc://a:1'\ncheckpoint_dir = '/c'\n",
            "leave trainer.checkpoint_dir empty",
        ),
    ],
)
def test_bad_values_name_their_path(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(path, env={})


@pytest.mark.parametrize(
    ("roles", "env", "message"),
    [
        (("gateway", "trainer"), {"FRESHREC_LOG_URL": "kafka://h:1"}, "memory:// must be used for both"),
        (("trainer",), {"FRESHREC_SERVING_STORE_URL": "redis://h:1"}, "memory:// must be used for both"),
        (("retrieval",), {}, "serving_store_url: a retrieval service follows a shared store"),
        (("gateway", "trainer"), {"FRESHREC_CHECKPOINT_DIR": "/tmp/x"}, "checkpoints need a durable event log"),
        (("ranking", "gateway"), {"FRESHREC_SERVING_STORE_URL": "redis://h:1"}, "a ranking service runs alone"),
        (("gateway",), {"FRESHREC_RETRIEVAL_URL": "grpc://r:1"}, "set both (remote stages) or neither"),
        (("gateway",), {"FRESHREC_RETRIEVAL_URL": "r:1", "FRESHREC_RANKING_URL": "grpc://k:2"}, "retrieval_url"),
    ],
)
def test_roles_and_urls_that_cannot_work_together_are_refused(
    roles: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    """Checked before anything is opened or connected."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Node(load_config(env=env), roles)


def test_env_value_of_wrong_type_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"server\.http_port"):
        load_config(env={"FRESHREC_HTTP_PORT": "eighty"})


def test_trainer_config_validates() -> None:
    with pytest.raises(ValueError, match=r"trainer\.sparse_sync_interval_s"):
        TrainerConfig(sparse_sync_interval_s=0)
