"""The daemon's own heap: large buffers go back to the kernel as soon as they are freed.

glibc serves an allocation above ``M_MMAP_THRESHOLD`` with its own ``mmap``, unmapped on
``free``. By default that threshold grows (up to 32 MiB) each time such a block is freed, after
which a client's message buffer of a few MiB comes from the main heap and is not returned
when its connection closes: 32 slow clients, each halfway through an 8 MiB message, would
leave the daemon's RSS hundreds of MiB high for good. Setting the threshold fixes it (and
turns that growth off). Other C libraries: nothing to do, nothing done.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's ``mallopt`` parameter number of ``M_MMAP_THRESHOLD``.
M_MMAP_THRESHOLD = -3
#: Allocations from this size on are mmapped (and unmapped when freed).
MMAP_THRESHOLD = 256 * 1024


def return_large_buffers() -> bool:
    """Fix glibc's mmap threshold; False when the C library has no ``mallopt``."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
