"""Positional file I/O for images: whole writes and reads, data/hole search, target checks.

All functions take a plain fd, never move its file offset (``pread``/``pwrite``/``lseek`` with
``SEEK_DATA``/``SEEK_HOLE`` only), and are safe to call from any thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from ramd.snapshot.format import ImageError

#: Bytes moved per read or write call. Large enough that per-call costs vanish, small enough
#: that the buffer stays in the CPU caches between the copy, the zero check, the hash and the
#: write. Measured on a 1 GiB save (no fsync), median of 4: 1 MiB 1.61 s, 2 MiB 1.42 s,
#: 4 MiB 1.56 s, 8 MiB 2-3.5 s; verify + load: 2 MiB 1.21 s, 8 MiB 1.61 s.
IO_SIZE = 2 * 1024 * 1024


def strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def check_regular(fd: int, *, writing: bool) -> os.stat_result:
    """Refuse an fd that is not a regular file (or, for writing, that is in append mode).

    Images need random access and holes, so pipes, sockets and devices cannot hold one; and
    ``pwrite`` on an ``O_APPEND`` fd appends on Linux instead of writing at the offset.
    """
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as e:
        raise ImageError(f"Cannot use image fd: {strerror(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("Image fd is not a regular file")
    if writing and flags & os.O_APPEND:
        raise ImageError("Image fd is in append mode")
    if writing and flags & os.O_ACCMODE == os.O_RDONLY:
        raise ImageError("Image fd is not open for writing")
    if not writing and flags & os.O_ACCMODE == os.O_WRONLY:
        raise ImageError("Image fd is not open for reading")
    return st


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (looping over short writes)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset``; returns the bytes read (fewer only at the end of file)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def next_data(fd: int, offset: int, end: int) -> int:
    """The first offset >= ``offset`` that may hold data, or ``end`` if none before it.

    A filesystem without ``SEEK_DATA`` reports everything as data.
    """
    try:
        return min(os.lseek(fd, offset, os.SEEK_DATA), end)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return end
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return offset
        raise


def next_hole(fd: int, offset: int, end: int) -> int:
    """The first offset >= ``offset`` inside a hole (or the end of file), at most ``end``."""
    try:
        return min(os.lseek(fd, offset, os.SEEK_HOLE), end)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
            return end
        raise
