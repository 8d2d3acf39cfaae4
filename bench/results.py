"""Where benchmarks write their figures: one JSON file per benchmark under bench/results/."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def interleaved_medians(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Call each function in `runs` `repeats` times, interleaved (a, b, a, b, ...) so that machine
    noise hits all of them alike; each returns the seconds of its own timed part (set-up excluded).
    Returns the median seconds of each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(fn())
    return {name: float(np.median(t)) for name, t in times.items()}


class Stopwatch:
    """`with Stopwatch() as sw: ...` then `sw.seconds`."""

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def commit() -> dict[str, Any]:
    """The commit the working tree is at, and whether tracked files other than the results
    themselves differ from it (what a result measured: a benchmark run after another has
    rewritten a result file still measured the commit)."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], cwd=RESULTS_DIR.parent, capture_output=True, text=True, check=False)
        return run.stdout.strip()

    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)bench/results"))
    return {"sha": git("rev-parse", "HEAD") or None, "dirty": dirty}


def write(name: str, figures: dict[str, Any]) -> Path:
    """Write `figures` with the machine's description and the commit measured to
    bench/results/<name>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    record = {
        "benchmark": name,
        "commit": commit(),
        "machine": {"python": platform.python_version(), "processor": platform.machine(), "system": platform.system()},
        **figures,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
