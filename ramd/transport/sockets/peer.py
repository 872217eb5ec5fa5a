"""Credentials of the peer of a Unix socket: pid, uid, primary gid and every group.

Linux only: ``SO_PEERCRED`` gives pid, uid and primary gid; ``SO_PEERGROUPS`` (Linux 4.13+)
gives the supplementary groups. Both are the peer's credentials at ``connect()`` time, kept
by the kernel, so a peer cannot change them afterwards. Group rules must look at all of them:
a user can switch the primary gid to any of its groups (``newgrp``), but not drop a
supplementary group without privileges.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

#: ``SO_PEERGROUPS`` from ``<asm-generic/socket.h>`` (not exported by Python 3.11).
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
#: Most supplementary groups a process can have (``NGROUPS_MAX``).
NGROUPS_MAX = 65536
_GID = struct.Struct("I")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is at the other end. ``groups`` holds the primary gid and every supplementary
    group, or is None when the kernel could not say (then no group rule can be trusted)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] | None

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


UNKNOWN = PeerCredentials(0, -1, -1, None)


def peer_credentials(sock: socket.socket | None) -> PeerCredentials:
    """The credentials of the peer of a connected Unix socket (:data:`UNKNOWN` without one)."""
    if sock is None:
        return UNKNOWN
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups = _peer_groups(sock)
    return PeerCredentials(pid, uid, gid, None if groups is None else frozenset({gid, *groups}))


def _peer_groups(sock: socket.socket) -> list[int] | None:
    """The peer's supplementary groups (``SO_PEERGROUPS``); None if the kernel lacks it.

    The kernel answers ``ERANGE`` when the buffer is too small; Python does not return the
    size it asks for, so the buffer grows until it fits (at most ``NGROUPS_MAX`` gids).
    """
    size = 64 * _GID.size
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < NGROUPS_MAX * _GID.size:
                size = min(size * 16, NGROUPS_MAX * _GID.size)
                continue
            if e.errno in (errno.ENOPROTOOPT, errno.EINVAL):
                return None
            raise
        return [g for (g,) in _GID.iter_unpack(raw[: len(raw) - len(raw) % _GID.size])]
