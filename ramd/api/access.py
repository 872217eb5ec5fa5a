"""File access for the holders of shared blocks: the API side of :mod:`ramd.hostmem.grants`.

A session holds a shared block from the ``ram-block-get-fd`` that gave it an fd until
``ram-block-put-fd`` or its close (:mod:`ramd.api.mappers`). While it does, the session's
uid may open the block's file as its fd allows (read-write, or read-only when every fd it
was given is read-only); see protocol.md §8. The two hooks:

- :func:`hold`, by ``ram-block-get-fd`` once the fd is opened, before the answer is sent, so
  the peer can reopen ``/proc/self/fd/N`` as soon as it has the fd;
- :func:`unhold`, by the mapper registry when the session stops mapping the block.

A block whose memory is freed needs no hook: its grants go with its fd. Thread: the loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ramd.hostmem.shared import FdMemory
from ramd.ramblock import RAMBlock

if TYPE_CHECKING:
    from ramd.api.service import Session


def session_uid(session: Session) -> int:
    """The uid of the session's peer (from ``SO_PEERCRED``), or -1 when unknown."""
    uid = session.peer_fields.get("uid")
    return uid if isinstance(uid, int) else -1


def hold(block: RAMBlock, session: Session, *, writable: bool) -> None:
    """``session`` got an fd of ``block``, writable or not: grant its uid access."""
    if isinstance(block.mem, FdMemory):
        block.mem.grants.hold(session, session_uid(session), writable)


def unhold(block: RAMBlock, session: Session) -> None:
    """``session`` no longer holds ``block``: its uid's grant ends with its last holding."""
    if isinstance(block.mem, FdMemory) and block.mem.fd >= 0:
        block.mem.grants.unhold(session)


__all__ = ["hold", "session_uid", "unhold"]
