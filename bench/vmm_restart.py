"""A QEMU restart that keeps guest RAM (docs/vmm.md) beside a plain migration that copies it.

QEMU's main RAM is a ``--ram`` memfd block (filled with non-zero data) started by ``ramctl
exec``; the old QEMU migrates with ``x-ignore-shared`` (device state only) to a file, quits, and
a new QEMU on the same block (``ramctl exec ... -incoming defer``) loads it. Beside it, a plain
migration that copies RAM through a file into a new QEMU with its own RAM. Per path, medians
over ``--restart-runs``: the state's bytes, the save (``migrate`` until completed), and the new
QEMU's ready time (from its launch until ``migrate-incoming`` completed: launch, QMP up, state
loaded). No guest runs (``-S``, TCG); the state lives on tmpfs.

    .venv/bin/python bench/vmm_restart.py [--restart-runs 5] [--ram 1G]

Attach, detach and virtio-mem latency: ``bench/vmm.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ramd_client
from qemu.qmp import ConnectError, QMPClient
from ramd_client.fdchannel import FdChannel
from servers import start_ramd, stop

from ramd.sizes import parse_size

RESTART_BLOCK = "guest"
RAMCTL = [sys.executable, "-m", "ramd_client.cli"]
QEMU_EXE = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"


def qemu_argv(sock: Path, qmp: Path, ram: int, how: str, incoming: bool) -> list[str]:
    """The command line of a guest-less QEMU whose main RAM is :data:`RESTART_BLOCK`, started
    by ``ramctl exec`` as docs/vmm.md does (``how`` "ramctl") or given the fd by the caller
    ("fd": ``{fd}`` left to replace), or (``how`` "anon") its own anonymous RAM."""
    mib = ram >> 20
    if how != "anon":
        backend = f"memory-backend-file,id=ram0,mem-path=/proc/self/fd/{{fd}},size={mib}M,share=on"
    else:
        backend = f"memory-backend-ram,id=ram0,size={mib}M"
    argv = [
        QEMU_EXE, "-machine", "pc,accel=tcg,memory-backend=ram0", "-m", f"{mib}M",
        "-object", backend, "-nodefaults", "-no-user-config", "-display", "none", "-S",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip
    if incoming:
        argv += ["-incoming", "defer"]
    if how == "ramctl":
        return [*RAMCTL, "--socket", str(sock), "exec", "--block", RESTART_BLOCK, "--", *argv]
    return argv


async def qmp_of(qmp: Path, proc: subprocess.Popen[bytes]) -> QMPClient:
    """A QMP session with the QEMU that is starting on ``qmp`` (polled every 0.5 ms)."""
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"QEMU exited {proc.returncode}")
        if qmp.exists():
            client = QMPClient("bench-restart")
            try:
                await client.connect(str(qmp))
                return client
            except ConnectError:
                pass
        await asyncio.sleep(0.0005)


async def migrated(client: QMPClient) -> None:
    """Until ``query-migrate`` says completed (polled every 0.5 ms)."""
    while True:
        info = await client.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration {status}: {info}")
        await asyncio.sleep(0.0005)


def launch(argv: list[str], channel: FdChannel | None) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv``; with a ``channel``, first lease :data:`RESTART_BLOCK` on it and pass
    the fd in place of ``{fd}``. The fd to close once the process exited (-1: none)."""
    if channel is None:
        return subprocess.Popen(argv, stderr=subprocess.DEVNULL), -1
    _, fd = channel.call("ram-block-get-fd", {"id": RESTART_BLOCK, "lease": True}, take_fd=True)
    assert fd is not None
    argv = [a.replace("{fd}", str(fd)) for a in argv]
    return subprocess.Popen(argv, pass_fds=(fd,), stderr=subprocess.DEVNULL), fd


async def quit_qemu(client: QMPClient, proc: subprocess.Popen[bytes], fd: int) -> None:
    """End a QEMU (SIGTERM after the session ends: a ``quit`` would drop the session under
    the client) and close the fd its launcher passed."""
    await client.disconnect()
    proc.terminate()
    await asyncio.to_thread(proc.wait)
    if fd >= 0:
        os.close(fd)


async def restart_once(sock: Path, tmp: Path, ram: int, how: str) -> dict[str, float]:
    """One QEMU restart: save, quit, new QEMU ready. ``how``: how the new QEMU gets its RAM
    (:func:`qemu_argv`); on the block, only device state is migrated (x-ignore-shared),
    otherwise a plain migration copies the RAM."""
    keep = how != "anon"
    channel = FdChannel(str(sock), 10.0) if how == "fd" else None
    caps = {"capabilities": [{"capability": "x-ignore-shared", "state": keep}]}
    state = tmp / "state"
    src_qmp, dst_qmp = tmp / "src.qmp", tmp / "dst.qmp"
    src, src_fd = launch(
        qemu_argv(sock, src_qmp, ram, "fd" if channel else "ramctl", False), channel
    )
    client = await qmp_of(src_qmp, src)
    await client.execute("migrate-set-capabilities", caps)
    t0 = time.perf_counter()
    await client.execute("migrate", {"uri": f"exec:cat > {state}"})
    await migrated(client)
    t1 = time.perf_counter()
    await quit_qemu(client, src, src_fd)
    t2 = time.perf_counter()
    dst, dst_fd = launch(qemu_argv(sock, dst_qmp, ram, how, True), channel)
    client = await qmp_of(dst_qmp, dst)
    t3 = time.perf_counter()
    await client.execute("migrate-set-capabilities", caps)
    await client.execute("migrate-incoming", {"uri": f"exec:cat {state}"})
    await migrated(client)
    t4 = time.perf_counter()
    size = state.stat().st_size
    await quit_qemu(client, dst, dst_fd)
    if channel is not None:
        channel.close()
    state.unlink()
    return {"state": size, "save": t1 - t0, "launch": t3 - t2, "load": t4 - t3, "ready": t4 - t2}


async def bench_restart(sock: Path, tmp: Path, runs: int, ram: int) -> None:
    async with await ramd_client.connect(sock) as c:
        await c.ram_block_add(RESTART_BLOCK, ram, backend="memfd")
    fill = (
        "import os, sys\n"
        "fd, size, chunk = int(sys.argv[1]), int(sys.argv[2]), os.urandom(1 << 20)\n"
        "for off in range(0, size, 1 << 20):\n"
        "    os.pwrite(fd, chunk, off)\n"
    )
    subprocess.run(
        [*RAMCTL, "--socket", str(sock), "exec", "--block", RESTART_BLOCK, "--",
         sys.executable, "-c", fill, "{fd}", str(ram)],
        check=True,
    )  # fmt: skip
    rows: dict[str, list[dict[str, float]]] = {"ramctl": [], "fd": [], "anon": []}
    for _ in range(runs):
        for how in rows:
            rows[how].append(await restart_once(sock, tmp, ram, how))
    labels = {
        "ramctl": "keep RAM, new QEMU by ramctl exec",
        "fd": "keep RAM, launcher passes the fd itself",
        "anon": "copy RAM (plain migration)",
    }
    med = {
        name: {k: statistics.median(r[k] for r in rows[name]) for k in rows[name][0]}
        for name in rows
    }
    print(f"\nQEMU restart, {ram >> 20} MiB guest RAM (random data), QEMU 7.2 TCG, no guest,")
    print(f"state on tmpfs, median of {runs} runs (ms; ready = launch + QMP up + state loaded)")
    print(f"{'path':40} {'state bytes':>12} {'save':>8} {'launch':>8} {'load':>8} {'ready':>8}")
    for name, label in labels.items():
        m = med[name]
        print(
            f"{label:40} {int(m['state']):12d} {m['save'] * 1000:8.1f} {m['launch'] * 1000:8.1f}"
            f" {m['load'] * 1000:8.1f} {m['ready'] * 1000:8.1f}"
        )
    print(
        f"keeping RAM (ramctl exec): ready {med['anon']['ready'] / med['ramctl']['ready']:.1f}x,"
        f" save {med['anon']['save'] / med['ramctl']['save']:.1f}x faster than copying"
    )
    async with await ramd_client.connect(sock) as c:
        await c.ram_block_del(RESTART_BLOCK)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restart-runs", type=int, default=5)
    parser.add_argument("--ram", type=parse_size, default=1 << 30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ramd-bench-", dir="/dev/shm"))
    proc = start_ramd(tmp)
    try:
        asyncio.run(bench_restart(tmp / "ramd.sock", tmp, args.restart_runs, args.ram))
    finally:
        stop([proc])
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
