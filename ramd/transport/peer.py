"""Who is at the other end of a Unix socket (Linux ``SO_PEERCRED``)."""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple


class Credentials(NamedTuple):
    """The peer's process and identity at connect time. ``uid`` is -1 when unknown."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket | None) -> Credentials:
    """``(pid, uid, gid)`` of the peer of a Unix socket."""
    if sock is None:
        return Credentials(0, -1, -1)
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Credentials(*struct.unpack("3i", raw))
