"""Start the servers the benchmark compares, and read their memory and CPU time from /proc.

Every server is a direct child (``Popen`` of the real executable, no shell), so ``proc.pid`` is
the process whose CPU time and RSS are measured. The caller owns the returned processes and
stops them with :func:`stop`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Return once ``path`` accepts a connection; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{path} never accepted")


def start_ramd(tmp: Path, loop: str = "asyncio") -> subprocess.Popen[bytes]:
    """A ramd on ``tmp/ramd.sock`` (JSON-RPC) and ``tmp/qmp.sock`` (QMP), on event loop
    ``loop``, with limits high enough for the benchmark's connection and block counts."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "bench.toml"
    cfg.write_text(
        'log-level = "warning"\n[limits]\nmax-connections = 4000\nmax-blocks = 20000\n'
        "subscriber-queue = 4096\n"
    )
    cmd = [sys.executable, "-m", "ramd", "--socket", str(tmp / "ramd.sock")]
    cmd += ["--qmp-socket", str(tmp / "qmp.sock"), "--config", str(cfg), "--event-loop", loop]
    proc = subprocess.Popen(cmd)
    wait_socket(tmp / "ramd.sock", proc)
    wait_socket(tmp / "qmp.sock", proc)
    return proc


def qemu_exe() -> str | None:
    return shutil.which("qemu-system-x86_64")


def qemu_version() -> str:
    exe = qemu_exe()
    if exe is None:
        return "not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0].removeprefix("QEMU emulator version ") if out else "?"


def start_qemu(tmp: Path, sockets: int) -> tuple[subprocess.Popen[bytes], list[Path]] | None:
    """QEMU with no machine and ``sockets`` QMP monitors, one Unix socket each (a QMP
    chardev serves one client at a time, so each concurrent client needs its own), or None
    when QEMU is not installed."""
    exe = qemu_exe()
    if exe is None:
        return None
    tmp.mkdir(parents=True, exist_ok=True)
    paths = [tmp / f"qemu{i}.sock" for i in range(sockets)]
    cmd = [exe, "-machine", "none", "-nodefaults", "-display", "none"]
    for p in paths:
        cmd += ["-qmp", f"unix:{p},server=on,wait=off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for p in paths:
        wait_socket(p, proc)
    # wait_socket's probe connections occupy the monitors until QEMU sees them hang up.
    time.sleep(0.2)
    return proc, paths


def start_echo(tmp: Path) -> subprocess.Popen[bytes]:
    """The bare asyncio floor (bench/echo_server.py) on ``tmp/echo.sock``."""
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(HERE / "echo_server.py"), str(tmp / "echo.sock")])
    wait_socket(tmp / "echo.sock", proc)
    return proc


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process, then SIGKILL any still running after 20 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def rss(pid: int) -> int:
    """VmRSS of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process ``pid`` (all its threads), in seconds. The kernel
    reports it in clock ticks (1/CLK_TCK s), so callers sum it over many calls."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
