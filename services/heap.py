"""The C heap of this process (glibc): what it holds, and handing its free pages back.

Where the C library is not glibc (musl, macOS) `info()` is None and `trim()` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import NamedTuple


class HeapInfo(NamedTuple):
    in_use: int  # bytes the program holds: allocated chunks, mmapped blocks included
    free: int  # bytes freed but kept by the allocator (the part of RSS a trim may give back)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None


_LIBC = _libc()
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)  # glibc >= 2.33
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _Mallinfo2


def info() -> HeapInfo | None:
    """Bytes in use and free in every arena of the heap, or None without glibc's `mallinfo2`."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return HeapInfo(in_use=m.uordblks + m.hblkhd, free=m.fordblks)


def trim() -> bool:
    """Hand the heap's whole free pages back to the system (`malloc_trim(0)`, every arena);
    False where there is no such call. ctypes lets the GIL go for it."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
