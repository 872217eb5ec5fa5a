"""The memory of one resizable allocation, whatever backs it: the backend interface.

Every backend has the same layout (see :mod:`.mmap_alloc`): ``max_size`` plus one guard page
of reserved address space at ``host``, of which ``[host, host+size)`` is read-write. Only the
backing differs: private anonymous memory (:class:`AnonymousMemory`), or a file mapped
``MAP_SHARED`` whose length is ``size``, or ``max_size`` while a VMM maps all of it
(:mod:`.shared`).

Life cycle: construct (opens the fd, if any) -> :meth:`~HostMemory.reserve` ->
:meth:`~HostMemory.populate` ``(0, size)`` -> any number of ``populate`` (grow) and
:meth:`~HostMemory.release` (shrink) -> :meth:`~HostMemory.free` (unmap, close the fd),
with :meth:`~HostMemory.unlink` before it when the memory is deleted for good. ``free`` may
be called in any state, including before ``reserve``.

Ownership and threads: an instance is owned by one caller (a RAM block) and used from one
thread at a time. The caller remembers ``size`` and passes ranges that lie inside it, or,
for ``populate``/``release``, the tail being added or removed; nothing here re-checks them.
Failures raise :class:`OSError` with the kernel's errno, after undoing what the call did.
"""

from __future__ import annotations

import ctypes
import os
from abc import ABC, abstractmethod
from typing import ClassVar

from ramd.hostmem import libc, linux
from ramd.hostmem.mmap_alloc import (
    mmap_free,
    mmap_pagesize,
    mmap_populate,
    mmap_reserve,
    mmap_reserve_aligned,
)

#: Bytes of zeros written per call where a range cannot be discarded (huge or locked pages).
ZERO_CHUNK = 2 * 1024 * 1024


class BackingTruncated(Exception):
    """A read or write found the backing file shorter than the range: another process
    changed its length. ``file_size`` is the length seen."""

    def __init__(self, file_size: int) -> None:
        super().__init__(f"the backing file is 0x{file_size:x} bytes long")
        self.file_size = file_size


class HostMemory(ABC):
    """One allocation's memory. Subclasses set the class-level facts and the backing.

    ``kind``: the backend name on the wire. ``shared``: has an fd other processes can map.
    ``persistent``: its memory outlives the process (a named file). ``private``: private
    anonymous memory, the only kind where KSM merging and THP advice apply.
    """

    kind: ClassVar[str]
    shared: ClassVar[bool]
    persistent: ClassVar[bool]
    private: ClassVar[bool]

    #: The contents can never change again (a memfd sealed as a template, docs/protocol.md §14):
    #: the process's own view is read-only, and nothing may write, discard or resize it.
    sealed = False

    def __init__(self, fd: int = -1, path: str | None = None) -> None:
        #: The backing fd, owned by this object (closed by :meth:`free`); -1 when none.
        self.fd = fd
        #: The backing file's path, for backends whose file has a name.
        self.path = path
        #: Size of the pages backing the memory (a huge page size on hugetlbfs).
        self.page_size = mmap_pagesize(fd)
        #: Backed by hugetlbfs pages.
        self.hugetlb = self.page_size != libc.host_page_size()
        #: Start of the reservation; 0 until :meth:`reserve`.
        self.host = 0
        self._reserved = 0

    def reserve(self, max_size: int, align: int) -> int:
        """Reserve ``max_size`` plus a guard page, inaccessible, starting at a multiple of
        ``align`` (a power of two, at least the page size); returns the start."""
        assert self.host == 0 and max_size % self.page_size == 0
        assert align % self.page_size == 0
        self._reserved = max_size + self.page_size
        self.host = mmap_reserve_aligned(self._reserved, align)
        return self.host

    @abstractmethod
    def populate(self, start: int, end: int, *, allocate: bool = True) -> None:
        """Make ``[start, end)`` read-write and backed, ``start`` being the current size
        (0 when the allocation is new) and ``end`` the new one. The new range reads as
        zeros. On failure everything is as before the call (file length included).
        ``allocate=False``: a shared backend skips allocating the range's memory now (see
        :meth:`ramd.ramblock.RAMList.create`); its size is still checked."""

    @abstractmethod
    def release(self, start: int, end: int) -> None:
        """Make the tail ``[start, end)`` inaccessible again and free its memory at once;
        ``start`` becomes the size (the file is shortened to it)."""

    @abstractmethod
    def preallocate(self, length: int) -> None:
        """Allocate the memory of ``[0, length)`` now (prealloc). May run in a worker thread
        while no other call is made on this object."""

    @abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Free the memory of a page-aligned range; it reads back as zeros."""

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` (inside the used range)."""

    @abstractmethod
    def write(self, offset: int, data: bytes) -> int:
        """Store ``data`` at ``offset`` (inside the used range); returns its length."""

    @abstractmethod
    def read_into(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset`` (inside the used range). Bulk transfers (images) use
        it from a worker thread while the caller holds the block's pin."""

    @abstractmethod
    def write_from(self, offset: int, data: memoryview) -> None:
        """Store ``data`` at ``offset`` (inside the used range); as :meth:`read_into`."""

    def zero(self, offset: int, length: int, *, locked: bool) -> None:
        """Make ``[offset, offset+length)`` (inside the used range) read as zeros: discarded
        when it is whole pages and not ``locked`` (locked pages refuse to be dropped),
        written with zeros otherwise."""
        if not locked and offset % self.page_size == 0 and length % self.page_size == 0:
            self.discard(offset, length)
            return
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.write_from(offset, zeros[:n])
            offset += n

    @abstractmethod
    def resident(self, length: int) -> int:
        """Bytes of ``[0, length)`` whose memory is allocated right now."""

    def unlink(self) -> None:  # noqa: B027 (a hook: only named files have anything to do)
        """Remove the backing file's name, if it has one (default: nothing to remove)."""

    def free(self) -> None:
        """Unmap the whole reservation and close the fd. Safe in any state; once only."""
        if self.host:
            mmap_free(self.host, self._reserved)
            self.host = 0
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


class AnonymousMemory(HostMemory):
    """Private anonymous memory: QEMU's resizable anonymous allocation.

    Grow maps fresh accounted zero pages (an impossible grow is ENOMEM under the kernel's
    overcommit rules); shrink re-reserves the tail, dropping its pages. The daemon reads and
    writes it through its own mapping: no other process can change it.
    """

    kind = "anonymous"
    shared = False
    persistent = False
    private = True

    def populate(self, start: int, end: int, *, allocate: bool = True) -> None:
        mmap_populate(self.host + start, end - start)

    def release(self, start: int, end: int) -> None:
        mmap_reserve(self.host + start, end - start)

    def preallocate(self, length: int) -> None:
        if not linux.populate_write(self.host, length):
            _touch_pages(self.host, length, self.page_size)

    def discard(self, offset: int, length: int) -> None:
        libc.madvise(self.host + offset, length, linux.MADV_DONTNEED)

    def read(self, offset: int, length: int) -> bytes:
        return ctypes.string_at(self.host + offset, length)

    def write(self, offset: int, data: bytes) -> int:
        ctypes.memmove(self.host + offset, data, len(data))
        return len(data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        if buf:
            ctypes.memmove(_address(buf), self.host + offset, len(buf))

    def write_from(self, offset: int, data: memoryview) -> None:
        if not data:
            return
        if data.readonly:
            ctypes.memmove(self.host + offset, bytes(data), len(data))
        else:
            ctypes.memmove(self.host + offset, _address(data), len(data))

    def resident(self, length: int) -> int:
        return libc.mincore_resident(self.host, length) * libc.host_page_size()


def _address(view: memoryview) -> int:
    """The address of a writable buffer's first byte (valid while ``view`` lives)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _touch_pages(host: int, size: int, page_size: int) -> None:
    """Fault in each page by rewriting its first byte (contents are preserved)."""
    view = memoryview((ctypes.c_char * size).from_address(host)).cast("B")
    view[::page_size] = bytes(view[::page_size])
