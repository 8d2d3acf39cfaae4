"""MkDocs hooks (mkdocs.yml `hooks:`): the build fails when a generated page is out of date with
its source, or a benchmark result it renders is missing or names no commit."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from docs import generate


def on_pre_build(config: Any) -> None:
    try:
        pages = generate.stale()
    except (FileNotFoundError, ValueError) as e:
        raise PluginError(str(e)) from e
    if pages:
        raise PluginError(
            f"out of date with their sources: {', '.join('docs/' + p for p in pages)}; run python -m docs.generate"
        )
