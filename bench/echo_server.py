"""The Python floor: a bare asyncio Unix-socket server answering each newline-terminated JSON
request with a tiny JSON response (no validation, no dispatch)."""

from __future__ import annotations

import asyncio
import json
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            req = json.loads(line)
            out = {"jsonrpc": "2.0", "result": {"ok": True}, "id": req.get("id")}
            self.t.write(json.dumps(out).encode() + b"\n")  # type: ignore[attr-defined]


async def main(path: str) -> None:
    server = await asyncio.get_running_loop().create_unix_server(Echo, path)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
