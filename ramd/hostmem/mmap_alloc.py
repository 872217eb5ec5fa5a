"""Reserve-then-map allocations, after QEMU's ``util/mmap-alloc.c`` with the resizable series.

Layout of one allocation (``ptr`` aligned to ``align``)::

    ptr                 ptr+size            ptr+max_size   +guard
    |  RW (populated)   |  PROT_NONE, NORESERVE (reserved) | guard |

The reservation is always private anonymous memory; the populated part is either private
anonymous memory or a ``MAP_SHARED`` mapping of an fd at the matching file offset.

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


def mmap_reserve(addr: int, size: int) -> int:
    """Reserve ``size`` bytes of inaccessible address space (``PROT_NONE``, no commit charge).

    With ``addr`` non-zero the range replaces whatever is mapped there (``MAP_FIXED``), which
    drops its pages at once (for a shared mapping: this process's view of them).
    """
    flags = libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | linux.MAP_NORESERVE
    if addr:
        flags |= libc.MAP_FIXED
    return libc.mmap(addr, size, libc.PROT_NONE, flags)


def mmap_reserve_aligned(size: int, align: int) -> int:
    """Reserve ``size`` bytes starting at a multiple of ``align`` (a power of two, a multiple
    of the host page size); returns the start. The slack needed to align is unmapped again."""
    assert align & (align - 1) == 0 and align % libc.host_page_size() == 0
    total = size + align
    base = mmap_reserve(0, total)
    ptr = (base + align - 1) & ~(align - 1)
    head = ptr - base
    tail = total - head - size
    if head:
        libc.munmap(base, head)
    if tail:
        libc.munmap(ptr + size, tail)
    return ptr


def mmap_populate(
    addr: int, size: int, fd: int = -1, offset: int = 0, *, readonly: bool = False
) -> None:
    """Make ``[addr, addr+size)`` of a reservation read-write (``MAP_FIXED``), or read-only
    with ``readonly`` (a shared mapping of a sealed memfd, made from an ``O_RDONLY`` fd).

    Without ``fd``: private anonymous memory (accounted, zero-filled). With ``fd``:
    ``MAP_SHARED`` from file ``offset`` (on hugetlbfs this reserves the huge pages). On
    failure (ENOMEM when the kernel cannot back the range) the range is reserved again, so no
    hole opens inside the allocation, and the ``OSError`` propagates.
    """
    prot = libc.PROT_READ if readonly else libc.PROT_READ | libc.PROT_WRITE
    flags = libc.MAP_FIXED
    if fd < 0:
        flags |= libc.MAP_PRIVATE | libc.MAP_ANONYMOUS
    else:
        flags |= libc.MAP_SHARED
    try:
        libc.mmap(addr, size, prot, flags, fd, offset)
    except OSError:
        mmap_reserve(addr, size)
        raise


def mmap_free(ptr: int, size: int) -> None:
    """Unmap ``[ptr, ptr+size)``: a whole allocation is ``max_size`` plus its guard page."""
    libc.munmap(ptr, size)


__all__ = [
    "mmap_free",
    "mmap_pagesize",
    "mmap_populate",
    "mmap_reserve",
    "mmap_reserve_aligned",
]
