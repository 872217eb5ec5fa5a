"""What a shell user waits for: ``ramctl`` start-up and bulk ``ramctl write`` / ``read``.

``ramctl`` is the console script installed next to the interpreter running the benchmark (the
worktree's venv); every run is a fresh process, timed from spawn to exit.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from servers import cpu_seconds
from wire import Conn

MiB = 1 << 20


def ramctl() -> list[str]:
    exe = Path(sys.executable).parent / "ramctl"
    if not exe.exists():
        raise RuntimeError(f"{exe} not found: install the project (pip install -e .)")
    return [str(exe)]


def wall_times(cmd: list[str], runs: int) -> list[float]:
    """Seconds from spawn to exit of ``cmd``, ``runs`` times (output discarded; must exit 0)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return times


@dataclass(frozen=True)
class Startup:
    """Median / min / max wall seconds of ``ramctl version`` and of a bare interpreter."""

    ramctl: tuple[float, float, float]
    python: tuple[float, float, float]


def startup(sock: Path, runs: int) -> Startup:
    def summary(ts: list[float]) -> tuple[float, float, float]:
        return statistics.median(ts), min(ts), max(ts)

    version = [*ramctl(), "--socket", str(sock), "version"]
    bare = [sys.executable, "-c", "pass"]
    wall_times(version, 2)  # warm the page cache and the .pyc files
    ours, floor = [], []
    for _ in range(runs):  # interleaved, like everything else here
        ours += wall_times(version, 1)
        floor += wall_times(bare, 1)
    return Startup(summary(ours), summary(floor))


@dataclass(frozen=True)
class Transfer:
    """One bulk transfer: bytes, wall seconds, and CPU seconds of ramctl and of the daemon."""

    size: int
    wall: float
    client_cpu: float
    server_cpu: float

    @property
    def mib_s(self) -> float:
        return self.size / MiB / self.wall


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _timed(cmd: list[str], pid: int, size: int, **kw: object) -> Transfer:
    c0, s0 = _children_cpu(), cpu_seconds(pid)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]
    wall = time.perf_counter() - t0
    return Transfer(size, wall, _children_cpu() - c0, cpu_seconds(pid) - s0)


def make_file(path: Path, size: int) -> None:
    """``size`` bytes of incompressible data (one random MiB repeated, each copy stamped with
    its index so no two MiB are equal)."""
    pattern = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for i in range(0, size, MiB):
            pattern[:8] = i.to_bytes(8, "little")
            f.write(pattern[: min(MiB, size - i)])


def bulk(sock: Path, pid: int, src: Path, size: int) -> tuple[Transfer, Transfer]:
    """``ramctl write`` of ``src`` (``size`` bytes) into a fresh block, then ``ramctl read`` of
    it to /dev/null; then a spot check that the last MiB read back equals the file's. The
    block is deleted at the end."""
    c = Conn(sock)
    c.call("ram-block-add", {"id": "bulk", "size": size})
    try:
        base = [*ramctl(), "--socket", str(sock)]
        w = _timed(
            [*base, "write", "bulk", "0", "-i", str(src)], pid, size, stdout=subprocess.DEVNULL
        )
        r = _timed([*base, "read", "bulk", "0", str(size)], pid, size, stdout=subprocess.DEVNULL)
        check = subprocess.run(
            [*base, "read", "bulk", str(size - MiB), str(MiB)], check=True, capture_output=True
        ).stdout
        with open(src, "rb") as f:
            f.seek(size - MiB)
            if f.read() != check:
                raise RuntimeError("ramctl read returned other bytes than ramctl write wrote")
    finally:
        c.call("ram-block-del", {"id": "bulk"})
        c.close()
    return w, r
