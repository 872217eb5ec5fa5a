"""The Linux-only part of the memory layer: flags and calls with no POSIX equivalent.

- ``MAP_NORESERVE``: a mapping that carries no commit charge (the reservation).
- ``madvise`` advice with Linux semantics: ``MADV_DONTNEED`` (private anonymous pages read
  back as zeros), ``MADV_POPULATE_WRITE`` (5.14+), ``MADV_COLLAPSE`` (6.1+),
  ``MADV_HUGEPAGE``, ``MADV_MERGEABLE``, ``MADV_DONTDUMP``.
- ``fstatfs`` to recognise hugetlbfs and read its page size.
- ``memfd_create`` flags (``MFD_HUGETLB``) and seals, ``fallocate`` with ``FALLOC_FL_PUNCH_HOLE``.
- ``MemAvailable`` of ``/proc/meminfo``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap as _mmap
import os

from ramd.hostmem import libc

MAP_NORESERVE = 0x4000
MADV_DONTNEED = _mmap.MADV_DONTNEED
MADV_DONTFORK = _mmap.MADV_DONTFORK
MADV_MERGEABLE = _mmap.MADV_MERGEABLE
MADV_DONTDUMP = _mmap.MADV_DONTDUMP
MADV_HUGEPAGE = _mmap.MADV_HUGEPAGE
MADV_POPULATE_WRITE = 23
MADV_COLLAPSE = 25
#: The PMD size: what one transparent huge page covers (x86-64, arm64 with 4 KiB pages).
PMD_SIZE = 2 * 1024 * 1024
HUGETLBFS_MAGIC = 0x958458F6
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


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


def collapse_zeroed(addr: int, length: int) -> None:
    """Back the whole ``PMD_SIZE`` chunks of a shared memory mapping ``[addr, addr+length)``
    with transparent huge pages, zero-filled: one small page of each chunk is faulted in (the
    kernel collapses no chunk with no page at all), then one ``MADV_COLLAPSE`` fills the rest
    of each chunk into a huge page. ``MADV_COLLAPSE`` ignores the THP sysfs settings but
    ``deny``, so this works where shmem THP is ``never``. Best effort: a chunk the kernel
    would not collapse (no ``MADV_COLLAPSE``, THP denied, no free huge page) keeps only the
    page faulted in, and the caller faults in the rest. Raises ``OSError`` only when faulting
    a page in fails (ENOMEM)."""
    start = -(-addr // PMD_SIZE) * PMD_SIZE
    end = (addr + length) // PMD_SIZE * PMD_SIZE
    page = libc.host_page_size()
    for chunk in range(start, end, PMD_SIZE):
        if not populate_write(chunk, page):
            return  # no MADV_POPULATE_WRITE (before 5.14): no MADV_COLLAPSE either
    if end > start:
        try:
            libc.madvise(start, end - start, MADV_COLLAPSE)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EAGAIN, errno.ENOMEM, errno.EBUSY):
                raise


_fallocate = libc._libc.fallocate64
_fallocate.restype = ctypes.c_int
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def memfd_create(name: str, *, hugetlb: bool = False) -> int:
    """A close-on-exec memfd that can be sealed (``MFD_ALLOW_SEALING``, docs/protocol.md §14);
    with ``hugetlb`` backed by default-size huge pages."""
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | (os.MFD_HUGETLB if hugetlb else 0)
    return os.memfd_create(name, flags)


#: The seals of a template: no write, no size change, no further seal.
TEMPLATE_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL


def write_sealed(fd: int) -> bool:
    """``fd`` is a memfd whose contents can never change again (``F_SEAL_WRITE``); False
    for files that take no seals."""
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE)
    except OSError:
        return False


def add_template_seals(fd: int) -> None:
    """Seal memfd ``fd`` as a template (:data:`TEMPLATE_SEALS`). ``OSError`` EBUSY while a
    writable shared mapping of it exists (or its pages are pinned), EPERM when it was
    created without ``MFD_ALLOW_SEALING``."""
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, TEMPLATE_SEALS)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of ``fd``, keeping its length: the range reads
    back as zeros and its memory (tmpfs, hugetlbfs) is freed at once."""
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    while _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"fallocate: {os.strerror(err)}")


def mem_available() -> int:
    """Bytes the kernel estimates it can still allocate without swapping or OOM-killing:
    ``MemAvailable`` plus ``SwapFree`` from ``/proc/meminfo``."""
    total = 0
    with open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith((b"MemAvailable:", b"SwapFree:")):
                total += int(line.split()[1]) * 1024
    return total


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_process_vm_writev = libc._libc.process_vm_writev
_process_vm_writev.restype = ctypes.c_ssize_t
_process_vm_writev.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def copy_into_own_mapping(addr: int, data: bytes) -> int:
    """Copy ``data`` to ``addr`` in this process with ``process_vm_writev`` on itself.

    The kernel faults the destination in as ``ptrace`` would: a page it cannot provide (past
    the end of a file that another process truncated) ends the copy early instead of raising
    ``SIGBUS``. Returns the number of bytes copied (less than ``len(data)`` after such a
    page); raises ``OSError`` when not even the first byte could be copied for another
    reason than a bad destination.
    """
    libc._check_span("process_vm_writev", addr, len(data))
    src = ctypes.c_char_p(data)  # points into ``data`` itself, kept alive by it
    base = ctypes.cast(src, ctypes.c_void_p).value or 0
    local = _IoVec()
    done = 0
    while done < len(data):
        local.iov_base = base + done
        local.iov_len = len(data) - done
        remote = _IoVec(addr + done, len(data) - done)
        n = _process_vm_writev(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err == errno.EFAULT:
                break
            raise OSError(err, f"process_vm_writev: {os.strerror(err)}")
        if n == 0:
            break
        done += n
    return done


RENAME_NOREPLACE = 0x1
_renameat2 = libc._libc.renameat2
_renameat2.restype = ctypes.c_int
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def rename_noreplace(dir_fd: int, old: str, new: str) -> None:
    """Rename entry ``old`` of the directory ``dir_fd`` to ``new`` in it, atomically, never
    replacing an existing ``new`` (``FileExistsError``); ``renameat2(RENAME_NOREPLACE)``,
    supported by tmpfs and hugetlbfs (Linux 3.15+)."""
    if _renameat2(dir_fd, os.fsencode(old), dir_fd, os.fsencode(new), RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), new)
