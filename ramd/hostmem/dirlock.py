"""The exclusive lock a daemon holds on its ``memory-dir`` (docs/protocol.md §9).

The lock is ``flock(LOCK_EX)`` on the file ``.lock`` inside the directory (created
``O_NOFOLLOW`` through the directory fd, mode 0600), which holds the holder's pid in decimal.
The kernel drops the lock when the holder exits, however it exits (SIGKILL included), so a
stale ``.lock`` file never blocks a restart; the file is never removed (removing it would
let two daemons lock two different files). Thread: the RAM list's owner thread.
"""

from __future__ import annotations

import errno
import fcntl
import os

#: The lock file's name in ``memory-dir`` (a dot name: never taken for a block).
LOCK_NAME = ".lock"


class MemoryDirInUse(OSError):
    """Another process holds the lock; the message names the directory and its pid."""


def lock_memory_dir(dir_fd: int, path: str) -> int:
    """Lock the directory behind ``dir_fd`` and write our pid into its lock file; returns
    the lock file's fd (close-on-exec), which holds the lock until it is closed.

    Raises :class:`MemoryDirInUse` when another process holds it, ``OSError`` otherwise.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    fd = os.open(LOCK_NAME, flags, 0o600, dir_fd=dir_fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or _holder(fd)
            raise MemoryDirInUse(
                f"memory-dir '{path}' is in use by another ramd (pid {holder})"
            ) from None
        _write_pid(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_pid(fd: int) -> None:
    """Record our pid in the lock file. hugetlbfs has no ``write``: there the file stays
    empty and the holder is found in ``/proc/locks`` instead (:func:`_holder`)."""
    os.ftruncate(fd, 0)
    try:
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise


def _holder(fd: int) -> str:
    """The pid holding the ``flock`` of the file behind ``fd``, from ``/proc/locks``
    (``N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END``)."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want:
                return fields[4]
    return "unknown"


__all__ = ["LOCK_NAME", "MemoryDirInUse", "lock_memory_dir"]
