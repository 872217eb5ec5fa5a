"""A test peer that receives and sends fds over the daemon's JSON-RPC socket."""

from __future__ import annotations

import array
import json
import os
import socket
from pathlib import Path
from typing import Any

from daemon import Raw


class Mapper(Raw):
    """A JSON-RPC connection that can receive fds (``recvmsg``) and send them; at most
    ``MAX_FDS`` per read."""

    MAX_FDS = 4

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        super().__init__(path, timeout)
        self.fds: list[int] = []

    def line(self) -> dict[str, Any] | list[Any]:
        while b"\n" not in self.buf:
            data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * self.MAX_FDS))
            for level, kind, raw in anc:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds = array.array("i")
                    fds.frombytes(raw[: len(raw) - len(raw) % 4])
                    self.fds.extend(fds)
            if not data:
                raise ConnectionError("daemon closed the connection")
            self.buf += data
        raw_line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(raw_line)  # type: ignore[no-any-return]

    def get_fd(self, block: str, readonly: bool = False) -> tuple[int, dict[str, Any]]:
        result = self.call("ram-block-get-fd", id=block, readonly=readonly)
        assert len(self.fds) == 1, self.fds
        return self.fds.pop(), result

    def send_with_fd(self, msg: dict[str, Any], fd: int) -> None:
        data = json.dumps(msg).encode()
        self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        super().close()
