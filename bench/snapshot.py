"""Benchmark of ``ram-save`` and ``ram-load`` through a real daemon, beside ``cp``.

Run as ``python bench/snapshot.py [--size 4G] [--dir DIR] [--repeat N]``. It starts
``python -m ramd`` with its ``state-dir`` and ``memory-dir`` in a temporary directory under
``DIR`` (default ``/var/tmp``), adds one ``memfd`` block of ``--size``, fills it through its
mapping (:class:`ramd_client.shared.SharedBlock`), and times, for two contents:

- "full": every page non-zero (a pseudo-random 64 MiB pattern, each chunk tagged apart);
- "mostly zero": 8 MiB of data at the start and one data page every 64 MiB, the rest zero;

``ram-save`` into the state directory (the daemon's atomic target: write, fsync, rename),
``ram-save`` to a ``getfd`` fd (a new file in the same directory, opened by the bench and sent
with ``SCM_RIGHTS``, as QEMU's ``getfd`` + ``migrate fd:``: written, not fsynced) and
``ram-load`` of the state-directory image after ``ram-block-del`` of the block (the load
creates it again, as an incoming migration into fresh memory: one pass that verifies the image
and fills the new, still invisible block). Each time runs from sending the command (for the fd
save: opening the file and ``getfd``) to the job's ``concluded`` status in ``query-jobs``,
polled every 20 ms.

For each content, right before the steps it is compared with, it times ``cp`` of a dense
regular file of the same size to a new name in the same directory, without and with ``sync
FILE``, while the block exists and holds that content (the same memory state: with 4 GiB less
free memory, the kernel's dirty limits are lower), after reading the reference file whole
(untimed), so that ``cp`` reads it from the page cache as ramd reads the block from memory.
``sync`` runs (untimed) before every timed step. Bandwidth is block bytes / time; ratio is
ramd's bandwidth over its peer's (medians over ``--repeat``). The daemon is stopped and the
temporary directory removed at the end, also on error.

Which ``cp`` is the peer: a save to a file target is durable (its image is fsynced before
the rename), so ``cp`` + ``sync`` does the same work; plain ``cp`` leaves up to the dirty limits
of its copy in the page cache, so against it such a save is bounded by the disk's write
bandwidth. A save to an fd is not fsynced (the client owns durability), so plain ``cp`` is its
peer. A load into fresh memory reads the image once, as ``cp`` reads its source; both sources
are in the page cache (the image was just written, the reference just copied).

What ramd does to keep up (ramd/snapshot/, docs/image-format.md "Writing"): page-aligned
1 MiB buffers (on this VM's AMD EPYC, a ``pread`` into a buffer 16 bytes past a page boundary,
where CPython puts a large ``bytearray``, copies 3-4 times slower), the read and hash of one
buffer overlapped with the write of the previous ones in a helper thread, and, for saves,
writeback started as each range is written (``sync_file_range``), so the fsync finds little.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
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


class FdSaver:
    """A second connection that passes a file with ``getfd`` and saves to it: the fd belongs
    to the connection's session, so ``getfd`` and ``ram-save`` go on the same one."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.buf = b""
        self.next_id = 0

    def close(self) -> None:
        self.sock.close()

    def call(self, method: str, params: dict[str, object], fd: int = -1) -> object:
        self.next_id += 1
        data = json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method})
        data = data[:-1] + f', "params": {json.dumps(params)}}}\n'
        fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd >= 0 else []
        self.sock.sendmsg([data.encode()], fds)
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    raise RuntimeError("the daemon closed the connection")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']['message']}")
                return msg["result"]

    def save(self, target: Path) -> str:
        """Open ``target`` (new), pass it as ``img``, start ``ram-save`` to it; the job id."""
        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self.call("getfd", {"fdname": "img"}, fd)
        finally:
            os.close(fd)
        result = self.call("ram-save", {"target": {"fd": "img"}})
        self.call("closefd", {"fdname": "img"})  # the job holds its own duplicate
        return str(result["job-id"])  # type: ignore[index]


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


def image_id(path: Path) -> tuple[int, bytes]:
    """Length and header page of an image (whose file checksum covers the whole image)."""
    with open(path, "rb") as f:
        return os.fstat(f.fileno()).st_size, f.read(PAGE)


def warm(path: Path) -> None:
    """Read ``path`` whole, so that ``cp`` reads it from the page cache as ramd reads the
    block from memory (the bench's files can exceed what the cache keeps)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        while f.readinto(buf):
            pass


def bench(
    base: Path, client: Client, socket: Path, size: int, repeat: int
) -> dict[str, list[float]]:
    """Times (seconds) per step name, one per repetition."""
    reference = base / "reference"
    make_reference(reference, size)
    times: dict[str, list[float]] = {}
    saver = FdSaver(socket)

    def add(step: str, seconds: float) -> None:
        times.setdefault(step, []).append(seconds)

    for _ in range(repeat):
        for kind in ("full", "zero"):
            client.ram_block_add(BLOCK, size, backend="memfd")
            fill(socket, client, size, kind)
            expect = client.ram_block_read(BLOCK, 64 * MiB, PAGE)
            # each cp right before the steps it is the peer of, in the same memory state
            warm(reference)
            add(f"cp {kind}", timed(lambda: cp(reference, base / "copy", False)))
            os.unlink(base / "copy")
            fd_image = base / f"fd-{kind}"
            add(f"fdsave {kind}", timed(partial(run_job, client, partial(saver.save, fd_image))))
            fd_saved = image_id(fd_image)
            os.unlink(fd_image)  # the bench's files must stay in the page cache
            warm(reference)
            add(f"cp+sync {kind}", timed(lambda: cp(reference, base / "copy", True)))
            os.unlink(base / "copy")
            add(f"save {kind}", timed(partial(run_job, client, partial(client.ram_save, kind))))
            if fd_saved != image_id(base / "state" / kind):
                raise RuntimeError(f"{kind}: the image saved to an fd differs from the file one")
            client.ram_block_del(BLOCK)
            add(f"load {kind}", timed(partial(run_job, client, partial(client.ram_load, kind))))
            if client.ram_block_read(BLOCK, 64 * MiB, PAGE) != expect:
                raise RuntimeError(f"{kind}: the loaded block differs from the saved one")
            client.ram_block_del(BLOCK)
            os.unlink(base / "state" / kind)
    saver.close()
    return times


def report(times: dict[str, list[float]], size: int, repeat: int, loads: list[str]) -> None:
    gib = size / GiB
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ramd ram-save/ram-load vs cp, block {format_size(size)}, median of {repeat}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"loadavg before / after: {loads[0]} / {loads[1]}; cores: {os.cpu_count()}")
    print("ratio: ramd's bandwidth over its peer's, the cp that does the same work, timed")
    print("just before it with the block's contents in memory; /cp: over plain cp's, whatever")
    print("the work")
    print(f"{'step':<33}{'seconds':>8}{'GiB/s':>7}{'peer':>9}{'peer s':>8}{'ratio':>7}{'/cp':>6}")
    ops = (
        ("save", "save file (fsync)", "cp+sync"),
        ("fdsave", "save fd (no fsync)", "cp"),
        ("load", "load file", "cp"),
    )
    for kind, label in (("full", "full"), ("zero", "mostly zero")):
        for op, name, peer in ops:
            t, p, c = med[f"{op} {kind}"], med[f"{peer} {kind}"], med[f"cp {kind}"]
            print(
                f"{name + ', ' + label:<33}{t:>8.2f}{gib / t:>7.2f}{peer:>9}{p:>8.2f}"
                f"{p / t:>7.2f}{c / t:>6.2f}"
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
