"""``memory-dir`` and ``state-dir``: checked at start, made at their first use, and what a bad
one means. Neither stops the daemon (only another daemon holding ``memory-dir`` does, §9).

- At start, :func:`probe` tells whether a directory can be used, without creating anything:
  every existing directory on its path must pass :func:`ramd.fsdir.unsafe_reason`, an
  existing final directory must be this user's (``memory-dir``) or root's (``state-dir``)
  and writable by nobody else, and the deepest existing directory must let this process
  create the rest. The daemon logs a warning naming the path, the config key and what to do.
- ``memory-dir`` at its use (:class:`MemoryDirRAMList`): created (0700, every missing
  directory, through :func:`ramd.fsdir.open_dir`) and checked before every open, so a
  directory fixed while the daemon runs is used without a restart; while it is bad, each
  ``file`` block is refused with the reason and :func:`memory_dir_hint`. Anonymous and
  ``memfd`` blocks never touch it.
- ``state-dir`` keeps its own opening (:func:`ramd.snapshot.open_state_dir`); a ``ram-save``
  or ``ram-load`` of a file fails with that function's message.

Thread: the loop thread.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ramd.fsdir import UnsafeDirectory, open_dir
from ramd.hostmem.dirlock import MemoryDirInUse
from ramd.ramblock import RAMList

__all__ = ["MemoryDirRAMList", "memory_dir_hint", "probe", "state_dir_hint"]


def probe(path: Path, *, own: bool) -> str | None:
    """Why the directory ``path`` cannot be made and used by this process, or None.

    ``own``: an existing ``path`` must be owned by this process's uid (else by it or root).
    Nothing is created; the answer names the directory at fault.
    """
    path = Path(os.path.abspath(path))
    top = path
    while not os.path.lexists(top):
        top = top.parent
    try:
        checked = open_dir(top, create=False)
    except OSError as e:
        return e.strerror or str(e)
    try:
        st = os.fstat(checked.fd)
    finally:
        checked.close()
    euid = os.geteuid()
    if top == path:
        if st.st_uid != euid and (own or st.st_uid != 0):
            return f"{path} is owned by uid {st.st_uid}, not by this daemon's uid {euid}"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"other users can write {path} (mode {stat.S_IMODE(st.st_mode):04o})"
        what = f"files in {path}"
    else:
        what = f"directory {top / path.relative_to(top).parts[0]}"
    if not os.access(top, os.W_OK | os.X_OK, effective_ids=True):
        return f"cannot create {what}: no write permission on {top}"
    return None


def memory_dir_hint(defaulted: bool) -> str:
    """What to do about a bad ``memory-dir``; ``defaulted``: the path is the default, which
    ``XDG_RUNTIME_DIR`` moves."""
    if not defaulted:
        return "file blocks are refused until it is fixed or memory-dir is changed (--config FILE)"
    return (
        "file blocks are refused until it is fixed: set XDG_RUNTIME_DIR (a user's daemon "
        "keeps them in $XDG_RUNTIME_DIR/ramd/memory), or memory-dir (--config FILE)"
    )


def state_dir_hint(defaulted: bool) -> str:
    """What to do about a bad ``state-dir`` (``defaulted`` as for :func:`memory_dir_hint`)."""
    if not defaulted:
        return "ram-save and ram-load of files fail until it is fixed or state-dir is changed"
    return (
        "ram-save and ram-load of files fail until it is fixed: set state-dir (--config FILE),"
        " or STATE_DIRECTORY or XDG_STATE_HOME"
    )


class MemoryDirRAMList(RAMList):
    """A :class:`~ramd.ramblock.RAMList` whose ``memory-dir`` is made with every missing
    directory and checked (:func:`ramd.fsdir.open_dir`) before each open; a failure is
    raised as ``OSError`` with ``hint`` appended (another daemon's lock, ``MemoryDirInUse``,
    as it is), which the list reports as its "Cannot use
    memory-dir" error of the ``file`` block being added (or, at start, of adoption)."""

    def __init__(self, memory_dir: Path, hint: str) -> None:
        super().__init__(memory_dir)
        self.hint = hint

    def open_memory_dir(self) -> int:
        try:
            open_dir(Path(self.memory_dir)).close()
            return super().open_memory_dir()
        except MemoryDirInUse:
            raise
        except OSError as e:
            message = f"{e.strerror or e}; {self.hint}"
            raise (OSError(e.errno, message) if e.errno else UnsafeDirectory(message)) from None
