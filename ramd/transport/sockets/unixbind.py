"""Bind a listening Unix socket file without following symlinks, and remove only that file.

The socket's directory is opened and checked by :func:`ramd.fsdir.open_dir`; every later step
goes through its fd:

1. An entry already at the name is looked at with ``lstat`` (never followed). A socket owned
   by our uid on which ``connect`` is refused is stale and removed (if it is still the same
   inode); a live one raises :class:`AlreadyRunning`; anything else (a symlink, a regular
   file, another user's socket) raises :class:`~ramd.fsdir.UnsafeDirectory`, untouched.
2. ``bind`` to ``/proc/self/fd/N/name``: the kernel creates the file in exactly that
   directory. Its mode comes from the umask set around ``bind`` (no ``chmod`` afterwards).
3. The group, when configured, is set by ``fchownat(..., AT_SYMLINK_NOFOLLOW)`` before
   ``listen``, so nobody can connect while the group is still the default one.
4. At shutdown :meth:`BoundSocket.remove` unlinks the name only if it still is the inode
   bound in step 2.

Thread: start-up and shutdown, on the loop thread (the umask is process-wide; no other thread
creates files then).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from ramd.fsdir import SafeDir, UnsafeDirectory, open_dir

#: ``sizeof(sun_path)`` on Linux, including the terminating NUL.
SUN_PATH_MAX = 108
#: Backlog of a listening socket.
BACKLOG = 128


class AlreadyRunning(Exception):
    """Another daemon serves the socket path."""


class BoundSocket:
    """A listening socket bound here, and what is needed to remove its file safely.

    Ownership: owns the directory fd (``dir``) until :meth:`remove`; the socket object is
    handed to the event loop, which owns it from then on.
    """

    def __init__(self, sock: socket.socket, where: SafeDir, name: str, st: os.stat_result):
        self.sock = sock
        self.dir = where
        self.name = name
        self._st = st

    @property
    def path(self) -> Path:
        return self.dir.path / self.name

    def remove(self) -> bool:
        """Unlink the socket file if it is still the one bound here; return whether it was.
        Idempotent."""
        if self.dir.fd < 0:
            return False
        try:
            return self.dir.unlink_if_same(self.name, self._st)
        finally:
            self.dir.close()


def bind_unix(path: Path, mode: int, gid: int | None = None) -> BoundSocket:
    """Bind and listen on a Unix stream socket at ``path`` with ``mode`` (and group ``gid``).

    Missing directories are created 0700 (0750 and group ``gid`` when a group is given).
    Raises :class:`AlreadyRunning` if a live server answers on ``path``,
    :class:`~ramd.fsdir.UnsafeDirectory` if a directory on the way or the entry at ``path``
    cannot be trusted, ``OSError`` otherwise.
    """
    where = open_dir(path.parent, mode=0o700 if gid is None else 0o750, gid=gid)
    name = path.name
    try:
        address = where.entry_address(name)
        if len(os.fsencode(address)) >= SUN_PATH_MAX:
            raise OSError(f"socket name {name!r} is too long for a Unix socket address")
        _clear_stale(where, name, path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            st = _bind(sock, where, name, address, mode)
            try:
                if gid is not None:
                    where.chown_entry(name, gid)
                sock.listen(BACKLOG)
            except BaseException:
                where.unlink_if_same(name, st)
                raise
        except BaseException:
            sock.close()
            raise
    except BaseException:
        where.close()
        raise
    sock.setblocking(False)
    return BoundSocket(sock, where, name, st)


def _bind(
    sock: socket.socket, where: SafeDir, name: str, address: str, mode: int
) -> os.stat_result:
    """Bind with the umask that yields ``mode``; the status of the new socket file."""
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(address)
    finally:
        os.umask(old_umask)
    st = where.lstat(name)
    if st is None or not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{where.path / name}: the socket file vanished after bind")
    return st


def _clear_stale(where: SafeDir, name: str, path: Path) -> None:
    """Remove a stale socket of ours at ``name``; refuse anything else there."""
    st = where.lstat(name)
    if st is None:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafeDirectory(f"refusing {path}: it exists and is not a socket; left untouched")
    if st.st_uid != os.geteuid():
        raise UnsafeDirectory(
            f"refusing {path}: it is a socket of uid {st.st_uid}, not ours; left untouched"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(where.entry_address(name))
    except ConnectionRefusedError:
        where.unlink_if_same(name, st)
        return
    except FileNotFoundError:
        return
    finally:
        probe.close()
    raise AlreadyRunning(f"another daemon is already listening on {path}")
