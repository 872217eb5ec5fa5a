"""Benchmark of ``ram-save`` and ``ram-load`` through a real daemon, beside ``cp``.

Run as ``python bench/snapshot.py [--size 4G] [--dir DIR] [--repeat N]``. It starts
``python -m ramd`` with its ``state-dir`` and ``memory-dir`` in a temporary directory under
``DIR`` (default ``/var/tmp``), adds one ``memfd`` block of ``--size``, fills it through its
mapping (:class:`ramd_client.shared.SharedBlock`), and times, for two contents:

- "full": every page non-zero (a pseudo-random 64 MiB pattern, each chunk tagged apart);
- "mostly zero": 8 MiB of data at the start and one data page every 64 MiB, the rest zero;

``ram-save`` into the state directory (the daemon's atomic target: write, fsync, rename) and
``ram-load`` of that image after ``ram-block-del`` of the block (the load creates it again, as
an incoming migration into fresh memory: verify pass, then copy pass). Each time runs from
sending the command to the job's ``concluded`` status in ``query-jobs``, polled every 20 ms.
In the same repetition it times ``cp`` of a dense regular file of the same size to a new name
in the same directory, without and with ``sync FILE``. ``sync`` runs (untimed) before every
timed step. Bandwidth is block bytes / time; ratio is ramd's bandwidth over cp's (medians over
``--repeat``). The daemon is stopped and the temporary directory removed at the end, also on
error.

Which ``cp`` is the peer: a save is durable (its image is fsynced before the rename), so
``cp`` + ``sync`` does the same work; plain ``cp`` leaves up to the dirty limits of its copy in
the page cache, so against it a save is bounded by the disk's write bandwidth. A load reads
the image twice (verify, then copy) where ``cp`` reads its source once; both sources are in the
page cache (the image was just written, the reference just copied).

What ramd does to keep up (ramd/snapshot/, docs/image-format.md "Writing"): page-aligned
1 MiB buffers (on this VM's AMD EPYC, a ``pread`` into a buffer 16 bytes past a page boundary,
where CPython puts a large ``bytearray``, copies 3-4 times slower), the read and hash of one
buffer overlapped with the write of the previous ones in a helper thread, and, for saves,
writeback started as each range is written (``sync_file_range``), so the fsync finds little.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ramd_client import Client
from ramd_client.shared import SharedBlock

from ramd.sizes import format_size, parse_size

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096
CHUNK = 64 * MiB
POLL = 0.02
BLOCK = "src"


def timed(fn: Callable[[], object]) -> float:
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def pattern() -> bytearray:
    return bytearray(os.urandom(CHUNK))


def fill(socket: Path, client: Client, size: int, kind: str) -> None:
    """Write the block's contents through a mapping of its memfd."""
    client.ram_block_discard(BLOCK, 0, size)
    data = pattern()
    src = (ctypes.c_char * len(data)).from_buffer(data)
    with SharedBlock(socket, BLOCK) as block:
        base = block.address
        if kind == "full":
            for off in range(0, size, CHUNK):
                data[:8] = off.to_bytes(8, "little")  # no two chunks alike
                ctypes.memmove(base + off, src, min(CHUNK, size - off))
        else:
            ctypes.memmove(base, src, min(8 * MiB, size))
            for off in range(64 * MiB, size, 64 * MiB):
                ctypes.memmove(base + off, ctypes.byref(src, off % (8 * MiB)), PAGE)
    del src


def run_job(client: Client, start: Callable[[], str]) -> None:
    """Start a job and wait for it to conclude; raise if it failed."""
    job = start()
    while True:
        info = next(j for j in client.query_jobs() if j.id == job)
        if info.status == "concluded":
            break
        time.sleep(POLL)
    client.job_dismiss(job)
    if info.error is not None:
        raise RuntimeError(f"job {job} failed: {info.error}")


def make_reference(path: Path, size: int) -> None:
    """A dense regular file of ``size`` non-zero bytes, for ``cp``."""
    data = pattern()
    with open(path, "wb") as f:
        for off in range(0, size, CHUNK):
            data[:8] = off.to_bytes(8, "little")
            f.write(data[: min(CHUNK, size - off)])


def cp(src: Path, dst: Path, sync: bool) -> None:
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if sync:
        subprocess.run(["sync", str(dst)], check=True)


class Daemon:
    """``python -m ramd`` on a socket in ``base``; stopped by :meth:`stop` (idempotent)."""

    def __init__(self, base: Path) -> None:
        self.socket = base / "ramd.sock"
        config = base / "ramd.toml"
        config.write_text(f'state-dir = "{base / "state"}"\nmemory-dir = "{base / "mem"}"\n')
        self.log = open(base / "ramd.log", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ramd", "--socket", str(self.socket), "--config", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self._accepts():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ramd did not start: {(base / 'ramd.log').read_text()}")
            time.sleep(0.05)

    def _accepts(self) -> bool:
        """True once the socket accepts connections (it exists a little before)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(self.socket))
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def bench(
    base: Path, client: Client, socket: Path, size: int, repeat: int
) -> dict[str, list[float]]:
    """Times (seconds) per step name, one per repetition."""
    reference = base / "reference"
    make_reference(reference, size)
    times: dict[str, list[float]] = {}

    def add(step: str, seconds: float) -> None:
        times.setdefault(step, []).append(seconds)

    for _ in range(repeat):
        add("cp", timed(lambda: cp(reference, base / "copy", False)))
        os.unlink(base / "copy")
        add("cp+sync", timed(lambda: cp(reference, base / "copy", True)))
        os.unlink(base / "copy")
        for kind in ("full", "zero"):
            client.ram_block_add(BLOCK, size, backend="memfd")
            fill(socket, client, size, kind)
            expect = client.ram_block_read(BLOCK, 64 * MiB, PAGE)
            add(f"save {kind}", timed(partial(run_job, client, partial(client.ram_save, kind))))
            client.ram_block_del(BLOCK)
            add(f"load {kind}", timed(partial(run_job, client, partial(client.ram_load, kind))))
            if client.ram_block_read(BLOCK, 64 * MiB, PAGE) != expect:
                raise RuntimeError(f"{kind}: the loaded block differs from the saved one")
            client.ram_block_del(BLOCK)
            os.unlink(base / "state" / kind)
    return times


def report(times: dict[str, list[float]], size: int, repeat: int, loads: list[str]) -> None:
    gib = size / GiB
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ramd ram-save/ram-load vs cp, block {format_size(size)}, median of {repeat}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"loadavg before / after: {loads[0]} / {loads[1]}; cores: {os.cpu_count()}")
    print(f"cp {gib / med['cp']:.2f} GiB/s, cp+sync {gib / med['cp+sync']:.2f} GiB/s")
    print(f"{'step':<18}{'seconds':>9}{'GiB/s':>9}{'/cp':>8}{'/cp+sync':>10}")
    for kind, label in (("full", "full"), ("zero", "mostly zero")):
        for op in ("save", "load"):
            t = med[f"{op} {kind}"]
            print(
                f"{op + ' ' + label:<18}{t:>9.2f}{gib / t:>9.2f}"
                f"{med['cp'] / t:>8.2f}{med['cp+sync'] / t:>10.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--size", default="4G", help="block size (default 4G)")
    parser.add_argument("--dir", default="/var/tmp", help="parent of the temporary directory")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    size = parse_size(args.size)
    loads = [", ".join(f"{x:.1f}" for x in os.getloadavg())]
    base = Path(tempfile.mkdtemp(prefix="ramd-snapshot-bench-", dir=args.dir))
    try:
        daemon = Daemon(base)
        try:
            with Client(daemon.socket, timeout=120) as client:
                times = bench(base, client, daemon.socket, size, args.repeat)
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    loads.append(", ".join(f"{x:.1f}" for x in os.getloadavg()))
    report(times, size, args.repeat, loads)


if __name__ == "__main__":
    main()
