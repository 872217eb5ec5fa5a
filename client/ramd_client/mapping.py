"""A shared block's memory in this process, with the daemon's layout (docs/protocol.md §8).

::

    base              base+size             base+max_size  +guard
    |  fd, MAP_SHARED |  PROT_NONE, MAP_NORESERVE (reserved) |  PROT_NONE  |

``max_size`` plus one guard page (``page_size``, the block's page size) is reserved
inaccessible first, starting at a multiple of ``page_size`` (hugetlbfs fds map only at huge
page boundaries); ``[0, size)`` is then the fd mapped ``MAP_SHARED|MAP_FIXED`` at offset 0,
read-write or, for a read-only fd, ``PROT_READ``. Growing maps the new tail from the fd,
shrinking reserves the tail inaccessible again (its pages are no longer reachable from here),
and :meth:`Mapping.unmap` releases the whole range. Addresses never move, so a pointer into
``[0, size)`` stays valid until a shrink below it.

Only ctypes and the standard library (no :mod:`ramd.hostmem`: a client need not install the
daemon). Thread: the owner of a :class:`Mapping` serialises its calls.
"""

from __future__ import annotations

import ctypes
import mmap as _mm
import os

__all__ = ["Mapping"]

_MAP_FIXED = 0x10  # the same on every Linux ABI; Python's mmap module does not export it
_MAP_NORESERVE = getattr(_mm, "MAP_NORESERVE", 0x4000)
_PROT_NONE = 0
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own C library (dlopen(NULL))
_mmap_fn = _libc.mmap
_mmap_fn.restype = ctypes.c_void_p
_mmap_fn.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_munmap_fn = _libc.munmap
_munmap_fn.restype = ctypes.c_int
_munmap_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

# A memoryview (format "B") straight over raw memory, without copying or owning it.
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PYBUF_READ, _PYBUF_WRITE = 0x100, 0x200


def _mmap(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    ptr = _mmap_fn(addr or None, length, prot, flags, fd, offset)
    if ptr is None or ptr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap: {os.strerror(err)}")
    return int(ptr)


def _munmap(addr: int, length: int) -> None:
    if _munmap_fn(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap: {os.strerror(err)}")


def _reserve(addr: int, length: int) -> int:
    """Inaccessible address space without commit charge (``MAP_FIXED`` when ``addr``)."""
    flags = _mm.MAP_PRIVATE | _mm.MAP_ANONYMOUS | _MAP_NORESERVE
    if addr:
        flags |= _MAP_FIXED
    return _mmap(addr, length, _PROT_NONE, flags, -1, 0)


class Mapping:
    """``[0, size)`` of a block's fd at :attr:`base`, inside a reservation of ``max_size``
    plus a guard page; see the module docstring. The caller keeps ``fd`` open."""

    def __init__(self, fd: int, size: int, max_size: int, page_size: int, readonly: bool):
        if page_size <= 0 or page_size & (page_size - 1) or not 0 <= size <= max_size:
            raise ValueError(f"bad layout: size {size}, max-size {max_size}, page {page_size}")
        self.fd = fd
        self.max_size = max_size
        self.page_size = page_size
        self.readonly = readonly
        self.prot = _mm.PROT_READ | (0 if readonly else _mm.PROT_WRITE)
        self.size = 0
        self._total = max_size + page_size
        # Over-reserve by one page to align, then give the slack back.
        raw = _reserve(0, self._total + page_size)
        self.base = (raw + page_size - 1) & ~(page_size - 1)
        head, tail = self.base - raw, page_size - (self.base - raw)
        if head:
            _munmap(raw, head)
        if tail:
            _munmap(self.base + self._total, tail)
        try:
            self.resize(size)
        except BaseException:
            self.unmap()
            raise

    @property
    def mapped(self) -> bool:
        return self.base != 0

    def resize(self, size: int) -> None:
        """Grow (map ``[self.size, size)`` from the fd) or shrink (reserve ``[size,
        self.size)`` inaccessible again) to ``size`` bytes."""
        if not self.mapped:
            raise ValueError("the block is unmapped")
        if not 0 <= size <= self.max_size:
            raise ValueError(f"size {size} is outside [0, {self.max_size}]")
        if size > self.size:
            flags = _mm.MAP_SHARED | _MAP_FIXED
            _mmap(self.base + self.size, size - self.size, self.prot, flags, self.fd, self.size)
        elif size < self.size:
            _reserve(self.base + size, self.size - size)
        self.size = size

    def unmap(self) -> None:
        """Release the whole reservation. Idempotent."""
        if self.mapped:
            _munmap(self.base, self._total)
            self.base, self.size = 0, 0

    def view(self) -> memoryview:
        """A memoryview of ``[0, size)`` (read-only for a read-only fd). It points at the
        mapping: after a shrink below its end or :meth:`unmap`, touching it faults."""
        if not self.mapped:
            raise ValueError("the block is unmapped")
        flags = _PYBUF_READ if self.readonly else _PYBUF_WRITE
        view: memoryview = _memory_view(self.base, self.size, flags)
        return view
