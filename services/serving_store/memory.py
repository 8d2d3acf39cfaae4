"""In-process serving store (embedded mode) with the same semantics as the Redis backend."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from services.serving_store import codec
from services.serving_store.base import VersionGap
from services.serving_store.state import MAX_SEEN, ServingState
from trainer.sync import SyncMessage


class MemoryServingStore:
    """Current state plus the last `retention` versions, in memory.

    Messages round-trip through the same encoding as the Redis store, so rows are fp16
    here too (by default) and both backends serve identical values.

    Args:
        retention: versions kept for tailing replicas; older ones need a bootstrap.
        max_seen: recent items kept per user.
        row_dtype: float16 or float32 embedding rows.
    """

    def __init__(self, retention: int = 1000, max_seen: int = MAX_SEEN, row_dtype: np.dtype | None = None) -> None:
        self.row_dtype = np.dtype(row_dtype or np.float16)
        self._state = ServingState(max_seen=max_seen, dtype=self.row_dtype)
        self._stream: deque[SyncMessage] = deque(maxlen=retention)
        self._cond = threading.Condition()

    def publish(self, message: SyncMessage) -> int:
        with self._cond:
            message.version = self._state.version + 1
            encoded = codec.encode(message, self.row_dtype)
            message.encoded_bytes = len(encoded)
            stored = codec.decode(encoded)
            self._state.apply(stored)
            self._stream.append(stored)
            self._cond.notify_all()
            return stored.version

    def restore(self, message: SyncMessage) -> None:
        """Replace everything with a full message (`snapshot()` of an earlier run, from a
        checkpoint): embedded mode's serving state survives a restart."""
        with self._cond:
            self._state = ServingState(max_seen=self._state.max_seen, dtype=self.row_dtype)
            self._state.apply(message)
            self._stream.clear()
            self._cond.notify_all()

    def latest_version(self) -> int:
        with self._cond:
            return self._state.version

    def snapshot(self) -> SyncMessage:
        with self._cond:
            return self._state.to_message()

    def read_since(self, version: int, timeout_s: float) -> list[SyncMessage]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._state.version <= version:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            if not self._stream or self._stream[0].version > version + 1:
                raise VersionGap(f"version {version + 1} is no longer retained")
            start = version + 1 - self._stream[0].version
            return list(self._stream)[start:]

    def close(self) -> None:
        pass
