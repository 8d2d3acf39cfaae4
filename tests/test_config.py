import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from services.config import (
    ALIASES,
    _build,
    env_name,
    load_config,
    load_config_with_sources,
    settings,
    value_at,
)
from services.node import Node
from tests.local_servers import free_port, wait_until
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parent.parent


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


def _sample(kind: object, default: object) -> str:
    """A valid value of a setting as an environment string (its default, so validation holds)."""
    return (
        json.dumps(list(default))
        if isinstance(default, tuple)
        else str(default).lower()
        if kind is bool
        else str(default)
    )


def test_every_setting_is_reachable_by_its_derived_environment_variable() -> None:
    """Each leaf of the config tree, set by FRESHREC_<PATH with __ between levels>, reports that
    variable as its source; changed values take effect (a float and an int checked)."""
    for path, _f, kind in settings():
        default = value_at(load_config(env={}), path)
        var = env_name(path)
        _config, sources = load_config_with_sources(env={var: _sample(kind, default)})
        assert sources[path] == f"env {var}", path
    changed = load_config(env={"FRESHREC_TRAINER__JOIN_WINDOW_S": "42.5", "FRESHREC_INDEX__NPROBE": "7"})
    assert (changed.trainer.join_window_s, changed.index.nprobe) == (42.5, 7)
    assert {path for path in ALIASES.values()} <= {path for path, _f, _k in settings()}


def test_aliases_and_derived_names_agree_or_are_refused() -> None:
    assert load_config(env={"FRESHREC_EMBEDDING_DIM": "8"}).trainer.dim == 8
    assert load_config(env={"FRESHREC_EMBEDDING_DIM": "8", "FRESHREC_TRAINER__DIM": "8"}).trainer.dim == 8
    with pytest.raises(ValueError, match=r"FRESHREC_EMBEDDING_DIM and FRESHREC_TRAINER__DIM both set trainer\.dim"):
        load_config(env={"FRESHREC_EMBEDDING_DIM": "8", "FRESHREC_TRAINER__DIM": "16"})


@pytest.mark.parametrize(
    ("var", "suggestion"),
    [
        ("FRESHREC_TRAINER__JOIN_WINDOWS", "FRESHREC_TRAINER__JOIN_WINDOW_S"),
        ("FRESHREC_HTTP_PROT", "FRESHREC_HTTP_PORT"),
        ("FRESHREC_SERVER_DOCS", "FRESHREC_SERVER__DOCS"),
    ],
)
def test_an_unknown_freshrec_variable_is_rejected_with_its_name(var: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match=f"{var}: unknown environment variable.*{suggestion}"):
        load_config(env={var: "1"})
    assert load_config(env={"FRESHREC_API_KEY": "x", "OTHER_THING": "1"}).server.http_port == 8000  # not settings


def test_an_unknown_freshrec_variable_fails_start_up_naming_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "up", "--port", "0", "--grpc-port", "0"],
        cwd=ROOT,
        env={**os.environ, "FRESHREC_TRAINER__JOIN_WINDOWS": "60"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "FRESHREC_TRAINER__JOIN_WINDOWS: unknown environment variable" in proc.stderr


@dataclasses.dataclass(frozen=True)
class _Typed:
    flag: bool = False
    limit: int | None = None
    ratio: float = 0.5
    names: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"flag": "true", "limit": "none"}, _Typed(flag=True)),
        ({"flag": "0", "limit": "12"}, _Typed(limit=12)),
        ({"flag": "Yes", "limit": ""}, _Typed(flag=True)),
        ({"ratio": "2", "names": "a, b,c"}, _Typed(ratio=2.0, names=("a", "b", "c"))),
        ({"ports": "[1, 2]", "names": '["x,y"]'}, _Typed(ports=(1, 2), names=("x,y",))),
        ({"flag": True, "ports": [3]}, _Typed(flag=True, ports=(3,))),  # TOML values as they are
    ],
)
def test_booleans_optionals_and_lists_are_parsed_from_strings(values: dict[str, object], expected: _Typed) -> None:
    assert _build(_Typed, values) == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"flag": "maybe"}, "flag: expected a boolean"),
        ({"flag": 1}, "flag: expected a boolean"),
        ({"limit": "many"}, "limit: expected int"),
        ({"ports": "[1, 'x']"}, "ports: expected a JSON list"),
        ({"ports": "1,x"}, r"ports\[1\]: expected int"),
        ({"ratio": True}, "ratio: expected float"),
    ],
)
def test_unparsable_values_name_their_setting(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _build(_Typed, values)


@pytest.mark.parametrize("docs", [False, True])
def test_a_boolean_and_a_nested_setting_from_the_environment_take_effect(docs: bool) -> None:
    """FRESHREC_SERVER__HTTP_PORT picks the port the gateway listens on; FRESHREC_SERVER__DOCS
    turns the OpenAPI spec and its (offline) Swagger UI on and off."""
    port = free_port()
    env = {"FRESHREC_SERVER__HTTP_PORT": str(port), "FRESHREC_SERVER__GRPC_PORT": "0"}
    node = Node(load_config(env={**env, "FRESHREC_SERVER__DOCS": str(docs).lower()}), ("gateway", "trainer"))
    node.start()
    try:
        assert node.http_port == port
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 20, "the gateway")
        pages = {path: httpx.get(url + path) for path in ("/docs", "/openapi.json", "/redoc")}
        assert {p: r.status_code for p, r in pages.items()} == dict.fromkeys(pages, 200 if docs else 404)
        if docs:  # the UI's assets are served by the gateway itself, none from a CDN
            html = pages["/docs"].text
            assets = re.findall(r"(?:src|href)=\"([^\"]+\.(?:js|css))\"", html)
            assert assets and all(a.startswith("/docs-assets/") for a in assets), assets
            assert all(httpx.get(url + a).status_code == 200 for a in assets)
            assert "cdn" not in html.lower()
    finally:
        node.stop()


def test_config_show_prints_each_value_and_its_source_and_masks_api_keys(tmp_path: Path) -> None:
    secret = "s3cret-key-for-show"
    path = tmp_path / "f.toml"
    path.write_text("[trainer]\ndim = 16\n")
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "config", "show", "--config", str(path), "--port", "9001"],
        cwd=ROOT,
        env={**os.environ, "FRESHREC_API_KEYS": f"ingest,recommend:{secret}", "FRESHREC_INDEX__KIND": "hnsw"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert secret not in proc.stdout
    assert 'server.api_keys = "ingest,recommend:***"  # env FRESHREC_API_KEYS' in lines
    assert f"trainer.dim = 16  # file {path}" in lines
    assert 'index.kind = "hnsw"  # env FRESHREC_INDEX__KIND' in lines
    assert "server.http_port = 9001  # flag" in lines
    assert "server.grpc_port = 50051  # default" in lines
    assert len(lines) == len(list(settings()))


def test_the_store_shard_reads_its_section_of_the_config() -> None:
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "store-shard", "--host", "127.0.0.1"],
        cwd=ROOT,
        env={**os.environ, "FRESHREC_SHARD__PORT": str(port), "FRESHREC_SHARD__METRICS_PORT": str(metrics_port)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"gRPC on 127.0.0.1:{port}, metrics on :{metrics_port}" in line, line
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").status_code == 200, 20, "metrics")
    finally:
        proc.terminate()
        proc.wait(20)
