"""The Linux-only part of the memory layer: flags and calls with no POSIX equivalent.

- ``MAP_NORESERVE``: a mapping that carries no commit charge (the reservation).
- ``madvise`` advice with Linux semantics: ``MADV_DONTNEED`` (private anonymous pages read
  back as zeros), ``MADV_POPULATE_WRITE`` (5.14+), ``MADV_HUGEPAGE``, ``MADV_MERGEABLE``,
  ``MADV_DONTDUMP``.
- ``fstatfs`` to recognise hugetlbfs and read its page size.
"""

from __future__ import annotations

import ctypes
import errno
import mmap as _mmap

from ramd.hostmem import libc

MAP_NORESERVE = 0x4000
MADV_DONTNEED = _mmap.MADV_DONTNEED
MADV_DONTFORK = _mmap.MADV_DONTFORK
MADV_MERGEABLE = _mmap.MADV_MERGEABLE
MADV_DONTDUMP = _mmap.MADV_DONTDUMP
MADV_HUGEPAGE = _mmap.MADV_HUGEPAGE
MADV_POPULATE_WRITE = 23
HUGETLBFS_MAGIC = 0x958458F6


class _StatFs(ctypes.Structure):
    """``struct statfs`` (the leading fields we read; padded to the kernel's size)."""

    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("_rest", ctypes.c_byte * 104),
    ]


_fstatfs = libc._libc.fstatfs
_fstatfs.restype = ctypes.c_int
_fstatfs.argtypes = [ctypes.c_int, ctypes.POINTER(_StatFs)]


def fstatfs_type_and_bsize(fd: int) -> tuple[int, int]:
    """``(f_type, f_bsize)`` of the filesystem holding ``fd``."""
    st = _StatFs()
    if _fstatfs(fd, ctypes.byref(st)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fstatfs: {errno.errorcode.get(err, err)}")
    return st.f_type & 0xFFFFFFFF, st.f_bsize


def populate_write(addr: int, length: int) -> bool:
    """Fault in ``[addr, addr+length)`` writable with ``MADV_POPULATE_WRITE``.

    Returns False when the kernel does not know the advice (EINVAL before 5.14), so the
    caller can fall back to touching each page. Other failures (ENOMEM, EFAULT) raise.
    """
    try:
        libc.madvise(addr, length, MADV_POPULATE_WRITE)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    return True
