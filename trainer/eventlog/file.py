"""The embedded event log made durable: `MemoryLog` semantics, with every append written and
fsync'd to a file per partition before it is acknowledged, and committed offsets kept on disk.

Layout under the directory::

    meta.json           {"partitions": N}
    p0.log ... pN-1.log records: u32 length, i64 acceptance time (ms), the value; little-endian
    offsets.json        committed offsets per consumer group (tmp file, fsync, rename)

At open, each partition file is read back into memory; a torn last record (the process died
while writing it — so it was never acknowledged) is cut off. The whole log stays in memory
and on disk: there is no retention, which suits a single-process deployment's volumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from trainer.eventlog.base import LogUnavailable
from trainer.eventlog.memory import MemoryLog

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<Iq")  # value length, acceptance time (ms)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileLog(MemoryLog):
    """A durable single-process event log in `directory`; see the module docstring.

    Args:
        directory: where the log lives (created if missing).
        partitions: partitions of a new log; an existing log keeps its own.
    """

    def __init__(self, directory: str | Path, partitions: int = 4) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "meta.json"
        if meta.exists():
            partitions = int(json.loads(meta.read_text())["partitions"])
        else:
            meta.write_text(json.dumps({"partitions": partitions}))
            _fsync_dir(self.directory)
        super().__init__(partitions)
        self._files: list[BinaryIO] = []
        for p in range(partitions):
            path = self.directory / f"p{p}.log"
            self._partitions[p] = self._read(path)
            self._files.append(open(path, "ab"))  # noqa: SIM115 - open for the log's lifetime
        offsets = self.directory / "offsets.json"
        if offsets.exists():
            stored = json.loads(offsets.read_text())
            self._committed = {g: {int(p): int(o) for p, o in parts.items()} for g, parts in stored.items()}

    @staticmethod
    def _read(path: Path) -> list[tuple[bytes, int]]:
        """The records of one partition file, cutting off a torn last record."""
        if not path.exists():
            return []
        data = path.read_bytes()
        records, at = [], 0
        while at + _HEADER.size <= len(data):
            length, accepted_ms = _HEADER.unpack_from(data, at)
            end = at + _HEADER.size + length
            if end > len(data):
                break
            records.append((data[at + _HEADER.size : end], accepted_ms))
            at = end
        if at < len(data):  # torn tail: never acknowledged
            with open(path, "r+b") as f:
                f.truncate(at)
                f.flush()
                os.fsync(f.fileno())
        return records

    def _persist(self, records: Sequence[tuple[int, bytes]], now_ms: int) -> None:
        ends = {partition: self._files[partition].tell() for partition, _ in records}
        try:
            for partition, value in records:
                self._files[partition].write(_HEADER.pack(len(value), now_ms) + value)
            for partition in ends:
                self._files[partition].flush()
                os.fsync(self._files[partition].fileno())
        except OSError as e:
            # none of these records is acknowledged: cut what reached the files, so that the
            # next append does not follow a torn record (which reopening would cut, with
            # every acknowledged record after it)
            for partition, end in ends.items():
                try:
                    self._cut(partition, end)
                except OSError:
                    log.exception("could not cut partition %d back to %d bytes", partition, end)
            raise LogUnavailable(f"file log {self.directory}: write failed: {e}") from e

    def _cut(self, partition: int, end: int) -> None:
        """Drop whatever follows byte `end` of a partition's file (its buffer too), durably."""
        path = self._files[partition].name
        with contextlib.suppress(OSError):
            self._files[partition].close()  # a failed flush leaves the buffer full: drop it
        os.truncate(path, end)
        self._files[partition] = open(path, "ab")  # noqa: SIM115 - open for the log's lifetime
        os.fsync(self._files[partition].fileno())

    def _persist_offsets(self) -> None:
        path, tmp = self.directory / "offsets.json", self.directory / "offsets.json.tmp"
        with open(tmp, "w") as f:
            json.dump({g: {str(p): o for p, o in parts.items()} for g, parts in self._committed.items()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def close(self) -> None:
        with self._cond:
            for f in self._files:
                f.close()
            self._files = []
