"""Image files in the state directory: names, opening, and atomic replacement.

Every path operation is relative to a directory fd opened once with ``O_NOFOLLOW`` and checked
(:func:`open_state_dir`), and no final component is ever followed if it is a symlink. An image
is written to a temporary name in the same directory and renamed over its final name only
once it is complete and fsynced (:func:`atomic_target`): a crash, a cancel or an error at any
point leaves either the previous image or the new one under the final name, never a part.

Thread: any. The functions keep no state beyond the fds they return.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from ramd.snapshot.fileio import strerror
from ramd.snapshot.format import ImageError

#: An image name (docs/protocol.md §10): no paths, never a hidden file.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
#: Temporary names start with a dot, so no valid image name can be one.
_TEMP_RE = re.compile(r"^\.(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})\.[0-9a-f]{12}\.tmp$")


def check_name(name: str) -> None:
    """Refuse a name that is not a valid image name (a path, a hidden name, too long)."""
    if not _NAME_RE.match(name):
        raise ImageError(f"Invalid image name '{name}'")


def open_state_dir(path: str) -> int:
    """Open the state directory (created mode 0700 if missing); returns a directory fd for
    the ``dir_fd`` arguments here. The caller owns it and closes it.

    Refused: a symlink as the last component, anything not a directory, a directory not
    owned by this user (or root), or writable by group or others.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"Cannot open state directory {path}: {strerror(e)}") from None
    st = os.fstat(fd)
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise ImageError(f"State directory {path} is writable by another user")
    return fd


def open_image(dir_fd: int, name: str) -> int:
    """Open the image ``name`` in ``dir_fd`` for reading; refuses symlinks and non-files."""
    check_name(name)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise ImageError(f"Image '{name}' not found") from None
        raise ImageError(f"Cannot open image '{name}': {strerror(e)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"Image '{name}' is not a regular file")
    return fd


@contextmanager
def atomic_target(dir_fd: int, name: str) -> Iterator[int]:
    """Yield a writable fd of a new temporary file that becomes ``name`` on success.

    On a normal exit of the ``with`` body: fsync the file, rename it over ``name``, fsync the
    directory. On an exception (a cancel included): close and unlink the temporary file, and
    re-raise; ``name`` is untouched. The fd is closed either way; the caller must not close it.
    """
    check_name(name)
    temp = f".{name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, 0o600, dir_fd=dir_fd)
    except OSError as e:
        raise ImageError(f"Cannot create image '{name}': {strerror(e)}") from None
    try:
        yield fd
        os.fsync(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException as e:
        os.close(fd)
        with suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=dir_fd)
        if isinstance(e, OSError):
            raise ImageError(f"Cannot write image '{name}': {strerror(e)}") from None
        raise
    os.close(fd)
    try:
        os.fsync(dir_fd)
    except OSError as e:
        raise ImageError(f"Cannot sync the state directory: {strerror(e)}") from None


def remove_stale_temporaries(dir_fd: int) -> list[str]:
    """Unlink temporary files left by a writer that died (call while no save runs).

    Only regular files named as :func:`atomic_target` names them are removed; returns them.
    """
    removed = []
    for entry in os.scandir(dir_fd):
        if _TEMP_RE.match(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return sorted(removed)
