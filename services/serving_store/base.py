"""The serving parameter store: current model state plus an ordered stream of versions.

The trainer publishes one `SyncMessage` per version; serving replicas bootstrap from a
`snapshot()` of the current state and then tail `read_since(version)`. A replica that has
fallen behind the retained stream gets `VersionGap` and bootstraps again.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from trainer.sync import SyncMessage


class VersionGap(RuntimeError):
    """The versions after the one asked for are no longer retained: bootstrap again."""


class ServingStore(Protocol):
    """Backends: `memory://` (in-process) and `redis://` (Redis hashes + a Redis Stream).

    `row_dtype`: how embedding rows are stored, sent and served (float16 by default).
    """

    row_dtype: np.dtype

    def publish(self, message: SyncMessage) -> int:
        """Apply `message` to the current state and append it as the next version; return it.
        Sets `message.version` and `message.encoded_bytes`."""
        ...

    def latest_version(self) -> int: ...

    def snapshot(self) -> SyncMessage:
        """The whole current state as one message with `full=True` and the current version."""
        ...

    def read_since(self, version: int, timeout_s: float) -> list[SyncMessage]:
        """Messages with versions > `version`, in order, waiting up to `timeout_s` for one.

        Raises:
            VersionGap: version + 1 is no longer retained.
        """
        ...

    def close(self) -> None: ...
