"""A minimal blocking client for the benchmark: one Unix socket, one line per message.

It speaks JSON-RPC 2.0 or QMP (greeting and ``qmp_capabilities`` done on connect) with the
standard ``json`` module, so every server is driven by the same client code and cost.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path


class Conn:
    """A blocking line-oriented connection; not thread-safe (one owner)."""

    def __init__(self, path: Path, qmp: bool = False) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.f = self.s.makefile("rb")
        self.qmp = qmp
        self.n = 0
        if qmp:
            self.f.readline()
            self.send_raw(b'{"execute":"qmp_capabilities"}\n')
            self.f.readline()

    def send_raw(self, data: bytes) -> None:
        self.s.sendall(data)

    def request_bytes(self, method: str, params: dict[str, object] | None = None) -> bytes:
        self.n += 1
        if self.qmp:
            msg: dict[str, object] = {"execute": method, "id": self.n}
            if params:
                msg["arguments"] = params
        else:
            msg = {"jsonrpc": "2.0", "method": method, "id": self.n}
            if params:
                msg["params"] = params
        return json.dumps(msg).encode() + b"\n"

    def reply(self) -> dict[str, object]:
        """The next message carrying an ``id`` (events in between are skipped)."""
        while True:
            line = self.f.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            msg = json.loads(line)
            if "id" in msg:
                return msg  # type: ignore[no-any-return]

    def call(self, method: str, params: dict[str, object] | None = None) -> dict[str, object]:
        self.send_raw(self.request_bytes(method, params))
        r = self.reply()
        if "error" in r:
            raise RuntimeError(f"{method}: {r['error']}")
        return r

    def close(self) -> None:
        self.f.close()
        self.s.close()
