"""``query-images`` and ``image-remove``: the image files of the daemon's ``state-dir``.

Names are validated as ``ram-save``'s ``{"file": NAME}`` (:data:`ramd.api.models.ImageName`,
checked again by :func:`ramd.snapshot.files.check_name`), so temporary files (hidden names)
are never listed or removed. Every operation is relative to the state directory's fd
(opened once by :mod:`ramd.api.snapshots`) and never follows a symlink: a
listed entry is a regular file by ``lstat``, an image is opened with ``O_NOFOLLOW``, and a
removal refuses an entry that is not a regular file by ``lstat`` (``unlink`` itself never
follows a symlink: an entry swapped meanwhile, which only the daemon's own uid can do in a
state directory the daemon checked, is removed, never its target).

Threads: ``query-images`` reads each image's header and table in a worker thread (a
directory of large images costs a few small reads per image, still disk I/O); ``image-remove``
runs on the loop thread (one ``lstat`` and one ``unlink``). A save's final rename and a
removal may race: the removal then removes either the old image or the new one, never a
part (the rename is atomic).
"""

from __future__ import annotations

import os
import re
import stat

from ramd.api import models as m
from ramd.api.service import Session
from ramd.api.snapshots import state_dir_fd
from ramd.api.table import command
from ramd.errors import RamdError
from ramd.snapshot import open_image, read_info
from ramd.snapshot.files import NAME_PATTERN, check_name
from ramd.snapshot.format import ImageError

__all__ = ["image_remove", "list_images", "query_images"]

_NAME_RE = re.compile(NAME_PATTERN)


def _entry(dir_fd: int, name: str, st: os.stat_result) -> m.ImageEntry:
    """What ``query-images`` says of image ``name`` (worker thread)."""
    blocks: list[str] | None = None
    data_bytes: int | None = None
    error: str | None = None
    try:
        fd = open_image(dir_fd, name)
    except ImageError as e:
        error = e.desc
    else:
        try:
            info = read_info(fd)
            blocks = [b.desc.id for b in info.blocks]
            data_bytes = info.data_bytes
        except ImageError as e:
            error = e.desc
        finally:
            os.close(fd)
    return m.ImageEntry(
        name=name,
        size=st.st_size,
        disk_size=st.st_blocks * 512,
        mtime=st.st_mtime,
        blocks=blocks,
        data_bytes=data_bytes,
        error=error,
    )


def list_images(dir_fd: int) -> list[m.ImageEntry]:
    """Every regular file of ``dir_fd`` with an image name, sorted by name (any thread)."""
    entries = []
    for name in sorted(os.listdir(dir_fd)):
        if not _NAME_RE.match(name):
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed meanwhile
        if stat.S_ISREG(st.st_mode):
            entries.append(_entry(dir_fd, name, st))
    return entries


@command("query-images", m.NoArgs, m.ImageEntryList, readonly=True)
async def query_images(session: Session, args: m.NoArgs) -> m.ImageEntryList:
    """The image files of the daemon's ``state-dir``, by name: each one's file size,
    modification time (seconds since the epoch), block ids and their total size, or, for a
    file that is no readable image, ``error``. Symlinks and other non-files are not listed."""
    dir_fd = state_dir_fd(session.service)
    try:
        entries = await session.service.in_worker(lambda: list_images(dir_fd))
    except OSError as e:
        raise RamdError(f"Cannot list the state directory: {e.strerror}") from None
    return m.ImageEntryList(entries)


@command("image-remove", m.ImageRemoveArgs, m.Empty, audit=True)
def image_remove(session: Session, args: m.ImageRemoveArgs) -> m.Empty:
    """Remove the image ``file`` from the daemon's ``state-dir`` (a regular file only; a
    symlink of that name is refused, never followed). A load already reading it goes on."""
    check_name(args.file)
    dir_fd = state_dir_fd(session.service)
    try:
        st = os.stat(args.file, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise RamdError(f"Image '{args.file}' not found") from None
    except OSError as e:
        raise RamdError(f"Cannot remove image '{args.file}': {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise RamdError(f"Image '{args.file}' is not a regular file: not removed")
    try:
        os.unlink(args.file, dir_fd=dir_fd)
    except FileNotFoundError:
        raise RamdError(f"Image '{args.file}' not found") from None
    except OSError as e:
        raise RamdError(f"Cannot remove image '{args.file}': {e.strerror}") from None
    return m.Empty()
