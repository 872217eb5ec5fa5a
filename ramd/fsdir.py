"""Directories the daemon creates files in, opened so that no other user can redirect it.

ramd runs as root and creates, replaces and removes files (its sockets; later the entries of
``memory-dir`` and ``state-dir``) at paths that may lie under directories other users can
write. :func:`open_dir` walks such a path from ``/`` one component at a time, each opened with
``O_PATH | O_DIRECTORY | O_NOFOLLOW`` relative to the previous one, and checks every directory
on the way (see :func:`unsafe_reason`). The result, a :class:`SafeDir`, holds an fd of the last
directory; every later operation on its entries goes through that fd (``*at`` calls with
``follow_symlinks=False``, or the ``/proc/self/fd/N/name`` path for ``bind``/``connect``), so
renaming or replacing a directory or a symlink on the path after the check changes nothing.

The trust rule (:func:`unsafe_reason`): a directory is trusted when it is owned by root or by
the daemon's effective uid, and is either writable by its owner only or has the sticky bit
(like ``/tmp``: others may add entries but cannot rename or remove ours). Group-writable
counts as writable by others. A symbolic link anywhere on the path is refused (give the
path it points to). ACLs are not consulted.

Thread: call from the loop thread at start-up and shutdown; nothing here is shared.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import NoReturn

#: How each directory on the way is opened: no read permission needed, never a symlink.
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeDirectory(OSError):
    """A directory (or an entry in it) ramd refuses to use; the message names it and why."""


def unsafe_reason(st: os.stat_result, euid: int) -> str | None:
    """Why a directory with status ``st`` must not be trusted by a process of ``euid``, or
    None when it may be (the rule of the module docstring)."""
    if not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if st.st_uid not in (0, euid):
        return f"it is owned by uid {st.st_uid}, who could replace what ramd puts there"
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not st.st_mode & stat.S_ISVTX:
        return f"other users can write it (mode {stat.S_IMODE(st.st_mode):04o}, no sticky bit)"
    return None


class SafeDir:
    """An open, checked directory and the operations ramd does on its entries.

    Ownership: the object owns :attr:`fd` (an ``O_PATH`` fd, close-on-exec) until
    :meth:`close`. ``path`` is for messages only; it is never resolved again.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    def entry_address(self, name: str) -> str:
        """A path naming entry ``name`` of this very directory (through ``/proc/self/fd``),
        for calls that take no directory fd: ``bind`` and ``connect`` of a Unix socket."""
        return f"/proc/self/fd/{self.fd}/{name}"

    def lstat(self, name: str) -> os.stat_result | None:
        """Status of entry ``name`` itself (a symlink is not followed); None if absent."""
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def unlink_if_same(self, name: str, st: os.stat_result) -> bool:
        """Remove entry ``name`` only if it is still the file ``st`` describes (same device
        and inode); return whether it was removed.

        Between the check and the unlink only the owner of the directory, root, or (in a
        sticky directory) the owner of the entry can swap the entry, and :func:`open_dir`
        made sure none of them is another user.
        """
        now = self.lstat(name)
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def chown_entry(self, name: str, gid: int) -> None:
        """Set the group of entry ``name`` (never following a symlink)."""
        os.chown(name, -1, gid, dir_fd=self.fd, follow_symlinks=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_dir(
    path: Path, *, create: bool = True, mode: int = 0o700, gid: int | None = None
) -> SafeDir:
    """Open directory ``path``, creating missing components when ``create``, and check every
    directory from ``/`` down to it.

    Directories created here get ``mode`` exactly (0700, or 0750 when a group must reach a
    socket) and, when ``gid`` is given, that group. Raises :class:`UnsafeDirectory` naming the
    first directory that fails the trust rule, is a symlink or is not a directory, and a
    plain ``OSError`` (message naming the path) when the system refuses an operation.
    """
    absolute = Path(os.path.abspath(path))
    euid = os.geteuid()
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check(Path("/"), os.fstat(fd), euid)
        current = Path("/")
        for name in absolute.parts[1:]:
            current = current / name
            child, created = _open_child(fd, name, current, create)
            os.close(fd)
            fd = child
            st = os.fstat(fd)
            if created and st.st_uid == euid:
                _settle_new_dir(fd, mode, gid)
                st = os.fstat(fd)
            _check(current, st, euid)
        return SafeDir(absolute, fd)
    except BaseException:
        os.close(fd)
        raise


def _check(path: Path, st: os.stat_result, euid: int) -> None:
    reason = unsafe_reason(st, euid)
    if reason is not None:
        raise UnsafeDirectory(f"refusing directory {path}: {reason}")


def _open_child(parent: int, name: str, path: Path, create: bool) -> tuple[int, bool]:
    """Open directory ``name`` under the fd ``parent``; ``(fd, created here)``."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent), False
    except FileNotFoundError:
        if not create:
            raise UnsafeDirectory(f"refusing directory {path}: it does not exist") from None
    except OSError as e:
        _refuse(parent, name, path, e)
    created = True
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
    except FileExistsError:
        created = False
    except OSError as e:
        raise OSError(e.errno, f"cannot create directory {path}: {e.strerror}") from None
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent), created
    except OSError as e:
        _refuse(parent, name, path, e)


def _refuse(parent: int, name: str, path: Path, e: OSError) -> NoReturn:
    """Turn a failed open of ``name`` into a message naming ``path``."""
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafeDirectory(f"refusing directory {path}: it is {what}") from None
    raise OSError(e.errno, f"cannot open directory {path}: {e.strerror}") from None


def _settle_new_dir(fd: int, mode: int, gid: int | None) -> None:
    """Give a directory created here its group and exact mode (``mkdir`` applied the umask).

    The ``/proc/self/fd`` path names exactly the inode behind ``fd``.
    """
    here = f"/proc/self/fd/{fd}"
    if gid is not None:
        os.chown(here, -1, gid)
    os.chmod(here, mode)
