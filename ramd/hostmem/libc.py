"""ctypes bindings to the POSIX memory calls of libc.

Every wrapper raises :class:`OSError` carrying the real ``errno`` when the call fails.
Addresses and lengths are plain ``int``; nothing here keeps state or knows about blocks.
Linux-only calls and flags live in :mod:`ramd.hostmem.linux`.
"""

from __future__ import annotations

import ctypes
import errno
import mmap as _mmap
import os

PROT_NONE = _mmap.PROT_NONE if hasattr(_mmap, "PROT_NONE") else 0
PROT_READ = _mmap.PROT_READ
PROT_WRITE = _mmap.PROT_WRITE
MAP_SHARED = _mmap.MAP_SHARED
MAP_PRIVATE = _mmap.MAP_PRIVATE
MAP_ANONYMOUS = _mmap.MAP_ANONYMOUS
#: Not exported by Python's mmap module; the value is the same on every Linux ABI we target
#: and on the BSDs.
MAP_FIXED = 0x10
MAP_FAILED = ctypes.c_void_p(-1).value

#: The C library the interpreter runs on: ``dlopen(NULL)`` (POSIX) gives the symbols the
#: process already has, without ``ctypes.util.find_library`` (which imports shutil and
#: tempfile, and with them the compression modules: half a MiB of the idle daemon).
_libc = ctypes.CDLL(None, use_errno=True)

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


def _int_fn(name: str, *argtypes: type) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    fn = getattr(_libc, name)
    fn.restype = ctypes.c_int
    fn.argtypes = list(argtypes)
    return fn


_munmap = _int_fn("munmap", ctypes.c_void_p, ctypes.c_size_t)
_madvise = _int_fn("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mincore = _int_fn("mincore", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_mlock = _int_fn("mlock", ctypes.c_void_p, ctypes.c_size_t)
_munlock = _int_fn("munlock", ctypes.c_void_p, ctypes.c_size_t)


def _raise(call: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{call}: {os.strerror(err)}")


#: The largest address or length a C ``size_t`` holds. ctypes silently keeps only the low
#: bits of a larger Python int, so a span past it would reach the kernel wrapped around (a
#: huge reservation turned into a page or two): such spans are refused here instead.
_SPAN_MAX = (1 << (8 * ctypes.sizeof(ctypes.c_size_t))) - 1


def _check_span(call: str, addr: int, length: int, err: int = errno.EINVAL) -> None:
    """Raise ``OSError(err)`` unless ``[addr, addr+length)`` fits in the address type."""
    if addr < 0 or length < 0 or addr + length > _SPAN_MAX:
        raise OSError(err, f"{call}: {os.strerror(err)}")


def host_page_size() -> int:
    """The host page size for anonymous memory."""
    return os.sysconf("SC_PAGESIZE")


def mmap(addr: int, length: int, prot: int, flags: int, fd: int = -1, offset: int = 0) -> int:
    """``mmap(2)``; returns the address of the mapping. A span past the address type is
    ENOMEM, as the kernel answers for a length beyond the address space."""
    _check_span("mmap", addr, length, errno.ENOMEM)
    ptr = _mmap_fn(addr or None, length, prot, flags, fd, offset)
    if ptr is None or ptr == MAP_FAILED:
        _raise("mmap")
    assert ptr is not None
    return int(ptr)


def munmap(addr: int, length: int) -> None:
    """``munmap(2)``."""
    _check_span("munmap", addr, length)
    if _munmap(addr, length) != 0:
        _raise("munmap")


def madvise(addr: int, length: int, advice: int) -> None:
    """``madvise(2)`` with a raw advice value."""
    _check_span("madvise", addr, length)
    if _madvise(addr, length, advice) != 0:
        _raise("madvise")


def mlock(addr: int, length: int) -> None:
    """``mlock(2)``."""
    _check_span("mlock", addr, length)
    if _mlock(addr, length) != 0:
        _raise("mlock")


def munlock(addr: int, length: int) -> None:
    """``munlock(2)``."""
    _check_span("munlock", addr, length)
    if _munlock(addr, length) != 0:
        _raise("munlock")


#: Pages asked of mincore per call, so the result vector stays small for huge ranges.
_MINCORE_CHUNK_PAGES = 1 << 18


def mincore_resident(addr: int, length: int) -> int:
    """Number of pages of ``[addr, addr+length)`` resident in RAM (``mincore(2)``).

    ``addr`` must be page-aligned. The range is walked in chunks, so the temporary vector
    never exceeds 256 KiB whatever the length.
    """
    _check_span("mincore", addr, length)
    page = host_page_size()
    pages = (length + page - 1) // page
    vec = (ctypes.c_ubyte * min(pages, _MINCORE_CHUNK_PAGES))()
    resident = 0
    done = 0
    while done < pages:
        n = min(pages - done, _MINCORE_CHUNK_PAGES)
        if _mincore(addr + done * page, n * page, vec) != 0:
            _raise("mincore")
        raw = bytes(memoryview(vec)[:n])
        resident += n - raw.count(0)
        done += n
    return resident
