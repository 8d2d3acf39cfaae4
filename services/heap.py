"""The C heap of this process: which allocator serves it, what it holds, handing pages back.

freshrec's long-running roles run on jemalloc where the library is installed
(`allocator = "jemalloc"`, the default; `reexec_with()`): under steady load glibc's allocator
kept ever more freed memory resident, scattered among live chunks where `malloc_trim` cannot
return it (docs/limits.md, `bench.soak`). Under glibc, `trim()` hands whole free pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

JEMALLOC = "libjemalloc.so.2"
# freed pages go back to the system within about a second, by jemalloc's own thread
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
ALLOCATORS = ("jemalloc", "system")  # the values of the setting `allocator`


class HeapInfo(NamedTuple):
    allocator: str  # "jemalloc" or "glibc"
    in_use: int  # bytes the program holds
    free: int  # bytes freed but kept by the allocator (resident or not)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)  # the process' global symbols: a preloaded jemalloc's first
    except OSError:
        return None


_LIBC = _libc()
_MALLCTL = getattr(_LIBC, "mallctl", None)  # jemalloc's
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)  # glibc >= 2.33
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _Mallinfo2


def _jemalloc_stat(name: str) -> int:
    value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
    assert _MALLCTL is not None
    if _MALLCTL(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        raise OSError(f"mallctl {name} failed")
    return value.value


def jemalloc_loaded() -> bool:
    """Whether jemalloc serves this process' malloc (preloaded)."""
    return _MALLCTL is not None


def info() -> HeapInfo | None:
    """Bytes in use and freed-but-kept in the heap (jemalloc's statistics, or glibc's
    `mallinfo2` over every arena); None where neither is there."""
    if _MALLCTL is not None:
        epoch = ctypes.c_uint64(1)  # refresh jemalloc's statistics
        _MALLCTL(b"epoch", None, None, ctypes.byref(epoch), ctypes.c_size_t(ctypes.sizeof(epoch)))
        allocated = _jemalloc_stat("stats.allocated")
        return HeapInfo("jemalloc", allocated, max(_jemalloc_stat("stats.resident") - allocated, 0))
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return HeapInfo("glibc", in_use=m.uordblks + m.hblkhd, free=m.fordblks)


def trims() -> bool:
    """Whether `trim()` does anything: under glibc only (jemalloc returns freed pages itself,
    other C libraries have no such call)."""
    return _MALLCTL is None and _MALLOC_TRIM is not None


def trim() -> None:
    """Under glibc, hand the heap's whole free pages back to the system (`malloc_trim(0)`,
    every arena; ctypes lets the GIL go for it); elsewhere nothing."""
    if trims():
        assert _MALLOC_TRIM is not None
        _MALLOC_TRIM(0)


def reexec_with(allocator: str) -> None:
    """Replace this process by the same command on jemalloc (preloaded, with `JEMALLOC_CONF`
    unless `MALLOC_CONF` is set) when `allocator` is "jemalloc", the library is installed and
    it is not loaded yet; call it first thing, before threads start. Returns (and the process
    goes on as it is) when the allocator is "system", jemalloc is already there, or it is not
    installed (logged: `apt-get install libjemalloc2`). The restarted command keeps its
    arguments and `-X` options; other interpreter flags (`-u`, `-O`, `-W`) are not carried."""
    if allocator == "system" or jemalloc_loaded() or sys.platform != "linux":
        return
    if not ctypes.util.find_library("jemalloc"):
        log.warning("allocator: jemalloc is not installed (apt-get install libjemalloc2); glibc's malloc serves")
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, (JEMALLOC, env.get("LD_PRELOAD"))))
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    argv = [sys.executable, *_interpreter_flags(), *_command()]
    os.execve(sys.executable, argv, env)


def _interpreter_flags() -> list[str]:
    return [f"-X{k}" if v is True else f"-X{k}={v}" for k, v in sys._xoptions.items()]


def _command() -> list[str]:
    """This process' command after the interpreter: `-m module …` or `script …`."""
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:  # python -m services.cli …
        name = spec.name.removesuffix(".__main__")
        return ["-m", name, *sys.argv[1:]]
    return [str(Path(sys.argv[0])), *sys.argv[1:]]  # the freshrec console script
