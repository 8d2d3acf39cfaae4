"""A freshrec process allocates from at most `MALLOC_ARENAS` glibc heaps (`limit_malloc_arenas`,
called by the CLI before its roles start), however many of its threads allocate at once; an
operator's MALLOC_ARENA_MAX wins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from services.node import _MALLOC_TRIM, MALLOC_ARENAS

# Eight threads allocate at once (each contended allocation may open a heap), then glibc's
# malloc_info reports the heaps; printed as the last line.
PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, re, sys, tempfile, threading
    from services.node import limit_malloc_arenas
    if sys.argv[1] == "limit":
        print(limit_malloc_arenas())
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]

    def work():
        for _ in range(20_000):
            [bytes(200) for _ in range(50)]

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with tempfile.NamedTemporaryFile("r") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        print(len(re.findall("<heap nr=", f.read())))
    """
)


def heaps(mode: str, **env: str) -> tuple[list[str], int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return out[:-1], int(out[-1])


@pytest.mark.skipif(_MALLOC_TRIM is None, reason="not glibc")
def test_the_heaps_are_limited_and_the_environment_wins() -> None:
    assert heaps("default")[1] > MALLOC_ARENAS  # glibc alone: a heap per contending thread
    assert heaps("limit") == (["True"], MALLOC_ARENAS)
    said, count = heaps("limit", MALLOC_ARENA_MAX="1")
    assert said == ["False"] and count == 1  # glibc applied the operator's limit; ours stood back
