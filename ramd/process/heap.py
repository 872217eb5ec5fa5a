"""The daemon's own heap: large buffers are reused while busy and go back to the kernel when
the connections that needed them close.

glibc serves an allocation above ``M_MMAP_THRESHOLD`` with its own ``mmap``, unmapped on
``free``; by default that threshold moves (up to 32 MiB) each time such a block is freed. Two
costs pull in opposite directions:

- memory held: with a moving threshold, a client's message buffer of a few MiB comes from the
  main heap and is not returned when its connection closes: 32 slow clients, each halfway
  through an 8 MiB message, would leave the daemon's RSS hundreds of MiB high for good;
- page faults: a buffer that is mmapped afresh for every message faults in every page (one
  fault per 4 KiB, several µs each on a virtual machine): a bulk ``ram-block-write`` or
  ``ram-block-read`` makes five such buffers of 4-6 MiB per chunk, and the faults cost more
  than all the rest of the work (measured: about half the daemon's CPU time per GiB).

So both thresholds are fixed (which turns the moving off): allocations up to
``MMAP_THRESHOLD`` come from the heap, where freed buffers are reused without faults, and at
most ``TRIM_THRESHOLD`` bytes of free memory stay at the top of the heap; :func:`trim` hands
every free page back (holes in the middle of the heap too), and a connection that moved
large data calls it when it closes. Other C libraries: nothing to do, nothing done.
"""

from __future__ import annotations

import ctypes
from typing import Any

#: glibc's ``mallopt`` parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Allocations from this size on are mmapped (and unmapped when freed): more than any buffer
#: of a message within the default ``max-message-size`` (8 MiB) and its decoded forms.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free bytes kept at the top of the heap between :func:`trim` calls.
TRIM_THRESHOLD = 32 * 1024 * 1024

_malloc_trim: Any = None


def keep_large_buffers() -> bool:
    """Fix glibc's thresholds (see the module docstring); False when the C library has no
    ``mallopt``. Call once, at start-up, on the main thread."""
    global _malloc_trim
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own C library (dlopen(NULL))
    mallopt = getattr(libc, "mallopt", None)
    trim_fn = getattr(libc, "malloc_trim", None)
    if mallopt is None or trim_fn is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trim_fn.argtypes = [ctypes.c_size_t]
    trim_fn.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    ok = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and ok
    _malloc_trim = trim_fn
    return ok


def trim() -> None:
    """Give every free page of the heap back to the kernel (``malloc_trim(0)``; its cost grows
    with the number of free chunks, not with their bytes). Nothing before
    :func:`keep_large_buffers`."""
    if _malloc_trim is not None:
        _malloc_trim(0)
