"""What a shell user waits for: ``ramctl`` start-up and bulk ``ramctl write`` / ``read``, and
the same transfers through the client library (bench/libtransfer.py).

``ramctl`` is the console script installed next to the interpreter running the benchmark (the
worktree's venv); every run is a fresh process, timed from spawn to exit (the library's runs:
the transfer itself, as the process reports it; CPU seconds are the whole process's).
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


def _timed(cmd: list[str], pid: int, size: int, reported: bool = False, **kw: object) -> Transfer:
    """Run ``cmd``; with ``reported``, its wall time is the number it prints."""
    c0, s0 = _children_cpu(), cpu_seconds(pid)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]
    wall = float(out.stdout) if reported else time.perf_counter() - t0
    return Transfer(size, wall, _children_cpu() - c0, cpu_seconds(pid) - s0)


def make_file(path: Path, size: int) -> None:
    """``size`` bytes of incompressible data (one random MiB repeated, each copy stamped with
    its index so no two MiB are equal)."""
    pattern = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for i in range(0, size, MiB):
            pattern[:8] = i.to_bytes(8, "little")
            f.write(pattern[: min(MiB, size - i)])


LIBRARY = str(Path(__file__).resolve().parent / "libtransfer.py")


def bulk(sock: Path, pid: int, src: Path, size: int) -> dict[str, Transfer]:
    """``ramctl write`` of ``src`` (``size`` bytes) into a fresh block, ``ramctl read`` of it
    to /dev/null, then the same through the library (bench/libtransfer.py: ``write_range`` of
    the file's bytes into a second fresh block, ``read_range`` of it); then a spot check that
    the last MiB of each block equals the file's. The blocks are deleted at the end."""
    c = Conn(sock)
    c.call("ram-block-add", {"id": "bulk", "size": size})
    c.call("ram-block-add", {"id": "bulk-lib", "size": size})
    try:
        base = [*ramctl(), "--socket", str(sock)]
        lib = [sys.executable, LIBRARY, str(sock)]
        quiet = {"stdout": subprocess.DEVNULL}
        got = {
            "ramctl write -i FILE": _timed(
                [*base, "write", "bulk", "0", "-i", str(src)], pid, size, **quiet
            ),
            "ramctl read > /dev/null": _timed(
                [*base, "read", "bulk", "0", str(size)], pid, size, **quiet
            ),
            "library write_range (bytes)": _timed(
                [*lib, "write", "bulk-lib", str(src)], pid, size, True, capture_output=True
            ),
            "library read_range": _timed(
                [*lib, "read", "bulk-lib", str(size)], pid, size, True, capture_output=True
            ),
        }
        with open(src, "rb") as f:
            f.seek(size - MiB)
            want = f.read()
        for block in ("bulk", "bulk-lib"):
            check = subprocess.run(
                [*base, "read", block, str(size - MiB), str(MiB)], check=True, capture_output=True
            ).stdout
            if check != want:
                raise RuntimeError(f"block {block} holds other bytes than were written")
    finally:
        c.call("ram-block-del", {"id": "bulk"})
        c.call("ram-block-del", {"id": "bulk-lib"})
        c.close()
    return got
