"""Resizable mmaps, after QEMU's ``util/mmap-alloc.c`` with the resizable-allocation series.

Layout of one allocation (``ptr`` aligned to ``align``)::

    ptr                 ptr+size            ptr+max_size   +guard
    |  RW (populated)   |  PROT_NONE, NORESERVE (reserved) | guard |

Invariants: ``ptr``, ``size`` and ``max_size`` are multiples of the page size; exactly one
``PROT_NONE`` guard page follows ``max_size``; the reserved tail carries no commit charge.
Functions here keep no state: the caller owns the allocation and remembers its sizes.
"""

from __future__ import annotations

from ramd.hostmem import libc, linux


def mmap_pagesize(fd: int = -1) -> int:
    """Page size backing a mapping of ``fd``: hugetlbfs block size, else the host page size."""
    if fd >= 0:
        fs_type, bsize = linux.fstatfs_type_and_bsize(fd)
        if fs_type == linux.HUGETLBFS_MAGIC:
            return bsize
    return libc.host_page_size()


def _is_aligned(value: int, align: int) -> bool:
    return value % align == 0


def mmap_reserve(addr: int, size: int, fd: int = -1) -> int:
    """Reserve ``size`` bytes of inaccessible address space (``PROT_NONE``, no commit charge).

    With ``addr`` non-zero the range replaces whatever is mapped there (``MAP_FIXED``), which
    drops its pages at once. With an ``fd`` (hugetlbfs) the reservation maps the fd so the
    page size is right; ``MAP_NORESERVE`` keeps the huge pages unreserved.
    """
    flags = libc.MAP_PRIVATE | linux.MAP_NORESERVE
    if fd < 0:
        flags |= libc.MAP_ANONYMOUS
    if addr:
        flags |= libc.MAP_FIXED
    return libc.mmap(addr, size, libc.PROT_NONE, flags, fd, 0)


def mmap_populate(
    addr: int,
    size: int,
    fd: int = -1,
    offset: int = 0,
    *,
    readonly: bool = False,
    shared: bool = False,
) -> None:
    """Make ``[addr, addr+size)`` of a reservation accessible (``MAP_FIXED``, accounted).

    Anonymous or fd-backed (at file ``offset``), private or shared, read-write unless
    ``readonly``. On failure (ENOMEM when the kernel cannot back the range) the range is
    reserved again, so no hole opens inside the allocation, and the ``OSError`` propagates.
    """
    prot = libc.PROT_READ | (0 if readonly else libc.PROT_WRITE)
    flags = libc.MAP_FIXED | (libc.MAP_SHARED if shared else libc.MAP_PRIVATE)
    if fd < 0:
        flags |= libc.MAP_ANONYMOUS
    try:
        libc.mmap(addr, size, prot, flags, fd, offset)
    except OSError:
        mmap_reserve(addr, size, fd)
        raise


def mmap_alloc(
    size: int,
    max_size: int,
    align: int,
    fd: int = -1,
    *,
    readonly: bool = False,
    shared: bool = False,
) -> int:
    """Reserve ``max_size`` (+ one guard page) aligned to ``align``; populate ``[0, size)``.

    Returns the aligned start. ``align`` must be a power of two and a multiple of the page
    size; ``size`` and ``max_size`` multiples of the page size.
    """
    pagesize = mmap_pagesize(fd)
    assert align & (align - 1) == 0 and _is_aligned(align, pagesize)
    assert _is_aligned(size, pagesize) and _is_aligned(max_size, pagesize)
    assert 0 < size <= max_size
    guard = pagesize
    total = max_size + align + guard
    base = mmap_reserve(0, total, fd)
    ptr = (base + align - 1) & ~(align - 1)
    head = ptr - base
    tail = total - head - max_size - guard
    if head:
        libc.munmap(base, head)
    if tail:
        libc.munmap(ptr + max_size + guard, tail)
    try:
        mmap_populate(ptr, size, fd, readonly=readonly, shared=shared)
    except OSError:
        libc.munmap(ptr, max_size + guard)
        raise
    return ptr


def mmap_resize(
    ptr: int,
    old_size: int,
    new_size: int,
    fd: int = -1,
    *,
    readonly: bool = False,
    shared: bool = False,
) -> None:
    """Grow or shrink the accessible part of an allocation in place.

    Grow populates ``[old, new)``; shrink re-reserves ``[new, old)``, which makes it
    inaccessible and releases its pages at once. A failed grow leaves the allocation as it
    was (the range is re-reserved) and raises the ``OSError``.
    """
    pagesize = mmap_pagesize(fd)
    assert _is_aligned(ptr, pagesize)
    assert _is_aligned(old_size, pagesize) and _is_aligned(new_size, pagesize)
    assert old_size > 0 and new_size > 0
    if new_size > old_size:
        mmap_populate(
            ptr + old_size, new_size - old_size, fd, old_size, readonly=readonly, shared=shared
        )
    elif new_size < old_size:
        mmap_reserve(ptr + new_size, old_size - new_size, fd)


def mmap_free(ptr: int, max_size: int, fd: int = -1) -> None:
    """Unmap a whole allocation: ``max_size`` plus the guard page."""
    libc.munmap(ptr, max_size + mmap_pagesize(fd))


__all__ = [
    "mmap_alloc",
    "mmap_free",
    "mmap_pagesize",
    "mmap_populate",
    "mmap_reserve",
    "mmap_resize",
]
