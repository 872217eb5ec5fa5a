"""One bulk transfer through the client library (``ramd_client.transfer``), for bench/compare.py.

Usage: ``python bench/libtransfer.py SOCKET write BLOCK FILE`` (the file's bytes, read into
memory first, then ``write_range`` at offset 0) or ``... read BLOCK LENGTH`` (``read_range``
from offset 0, the bytes dropped). Prints the seconds the transfer itself took (connection and
set-up excluded), so the number compares with ``ramctl``'s minus its start-up.
"""

from __future__ import annotations

import asyncio
import sys
import time

import ramd_client
from ramd_client.transfer import read_range, write_range


async def main(sock: str, direction: str, block: str, arg: str) -> float:
    async with await ramd_client.connect(sock) as client:
        if direction == "write":
            with open(arg, "rb") as f:
                data = f.read()
            t0 = time.perf_counter()
            await write_range(client, block, 0, data)
        else:
            length, got = int(arg), 0
            t0 = time.perf_counter()
            async for piece in read_range(client, block, 0, length):
                got += len(piece)
            assert got == length
        return time.perf_counter() - t0


if __name__ == "__main__":
    print(f"{asyncio.run(main(*sys.argv[1:5])):.6f}")
