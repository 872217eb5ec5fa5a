"""Copy bandwidth of a shared block: through a mapping (``ramd_client.shared.SharedBlock``)
beside ``ram-block-write`` / ``ram-block-read`` (base64 in JSON, 4 MiB per call, the
blocking ``ramd_client.Client``), 256 MiB each way, in GiB/s, in one table.

    .venv/bin/python bench/shared.py [--size 256M] [--runs 3]

Starts its own daemon (memory-dir on tmpfs, removed after). Each figure is the best of
``--runs`` copies of the whole block from / into a process-private buffer that was touched
before (no page faults of the buffer in the timing). The mapping's first write faults the
block's pages in (tmpfs allocation); it is reported apart as "first write".
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ramd_client
from ramd_client.shared import SharedBlock
from servers import start_ramd, stop

from ramd.sizes import parse_size

GiB = 1 << 30
CHUNK = 4 << 20


def best(runs: int, fn: Callable[[], object]) -> float:
    """The shortest of ``runs`` timings of ``fn``, in seconds."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=256 << 20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size: int = args.size
    tmp = Path(tempfile.mkdtemp(prefix="ramd-bench-", dir="/dev/shm"))
    proc = start_ramd(tmp)
    try:
        sock = tmp / "ramd.sock"
        src = bytearray(os.urandom(1 << 20) * (size >> 20))
        dst = bytearray(size)
        out = memoryview(dst)  # slice assignment into a memoryview is one memcpy
        with ramd_client.Client(sock, timeout=600) as client:
            client.ram_block_add("b", size, backend="memfd")
            with SharedBlock(sock, "b") as block:
                view = block.view

                def map_write() -> None:
                    view[:] = src

                def map_read() -> None:
                    out[:] = view

                def rpc_write() -> None:
                    for off in range(0, size, CHUNK):
                        client.ram_block_write("b", off, src[off : off + CHUNK])

                def rpc_read() -> None:
                    for off in range(0, size, CHUNK):
                        dst[off : off + CHUNK] = client.ram_block_read("b", off, CHUNK)

                first = best(1, map_write)
                rows = [
                    ("write", best(args.runs, map_write), best(args.runs, rpc_write)),
                    ("read", best(args.runs, map_read), best(args.runs, rpc_read)),
                ]
                assert dst == src, "read back differs"
    finally:
        stop([proc])
        shutil.rmtree(tmp)
    mib = size >> 20
    print(f"shared block copy bandwidth, {mib} MiB, best of {args.runs} (GiB/s)")
    print(f"{'':8}{'mapping':>10}{'JSON rpc':>10}{'ratio':>8}")
    for name, mapped, rpc in rows:
        gm, gr = size / GiB / mapped, size / GiB / rpc
        print(f"{name:8}{gm:10.2f}{gr:10.3f}{gm / gr:7.0f}x")
    print(f"(first write through the mapping, faulting the pages in: {size / GiB / first:.2f})")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
