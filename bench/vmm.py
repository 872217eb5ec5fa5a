"""Two tables: attach/detach latency, and a QEMU restart that keeps guest RAM.

Attach and detach latency of a ``pc-dimm`` block (``ram-block-attach``/``-detach``) beside
the raw QMP steps a client makes itself (``add-fd``, ``object-add``, ``device_add``,
``query-memory-devices``; ``device_del`` until ``DEVICE_DELETED``, ``object-del``,
``remove-fd``), p50 and p99 over ``--runs`` runs each, in ms, printed as a table.

    .venv/bin/python bench/vmm.py [--runs 50] [--size 64M] [--restart-runs 5] [--ram 1G]
                                  [--only attach|restart]

Starts its own daemon and one QEMU (``-machine pc``, qtest accelerator, as uid ``nobody``; see
``tests/vmm_support.py``). No guest runs: a thread plays the guest's ACPI part through the
qtest socket, polling the memory hot-plug status register of slot 0 and ejecting the DIMM
as soon as QEMU asks (what a guest's ``_EJ0`` does), so both detach paths include the same
guest reaction. Both paths pass a memfd; ramd also gives QEMU's uid an ACL entry on it.

QEMU restart keeping guest RAM (docs/vmm.md): QEMU's main RAM is a ``--ram`` memfd block
(filled with non-zero data) started by ``ramctl exec``; the old QEMU migrates with
``x-ignore-shared`` (device state only) to a file, quits, and a new QEMU on the same block
(``ramctl exec ... -incoming defer``) loads it. Beside it, a plain migration that copies RAM
through a file into a new QEMU with its own RAM. Per path, medians over ``--restart-runs``:
the state's bytes, the save (``migrate`` until completed), and the new QEMU's ready time
(from its launch until ``migrate-incoming`` completed: launch, QMP up, state loaded). No guest
runs (``-S``, TCG); the state lives on tmpfs.
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
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import ramd_client
from qemu.qmp import ConnectError, QMPClient
from ramd_client.fdchannel import FdChannel
from servers import start_ramd, stop

from ramd.sizes import parse_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from vmm_support import MHP_BASE, Qemu


def guest(qemu: Qemu, armed: threading.Event, done: threading.Event) -> None:
    """While ``armed`` (a detach is running), eject the DIMM in slot 0 as soon as QEMU raises
    its remove event. Disarmed it polls nothing, so the attach timings are quiet."""
    while not done.is_set():
        if not armed.wait(0.1):
            continue
        qemu.qtest(f"outl 0x{MHP_BASE:x} 0")
        status = int(qemu.qtest(f"inb 0x{MHP_BASE + 0x14:x}").split()[1], 16)
        if status & 4:
            qemu.eject_dimm(0)
        else:
            time.sleep(0.0002)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


#: Set while a detach runs (the guest thread then watches for the eject request).
ARMED = threading.Event()


async def raw_run(qmp: QMPClient, fd: int, size: int, t: dict[str, list[float]]) -> None:
    """One attach and detach by hand, each step timed."""
    t0 = time.perf_counter()
    qmp.send_fd_scm(fd)
    ans = await qmp.execute("add-fd", {"opaque": "bench"})
    assert isinstance(ans, dict)
    t1 = time.perf_counter()
    await qmp.execute(
        "object-add",
        {
            "qom-type": "memory-backend-file",
            "id": "raw-mem",
            "mem-path": f"/proc/self/fd/{ans['fd']}",
            "share": True,
            "size": size,
        },
    )
    t2 = time.perf_counter()
    await qmp.execute("device_add", {"driver": "pc-dimm", "id": "raw", "memdev": "raw-mem"})
    t3 = time.perf_counter()
    await qmp.execute("query-memory-devices")
    t4 = time.perf_counter()
    for name, a, b in (
        ("add-fd", t0, t1),
        ("object-add", t1, t2),
        ("device_add", t2, t3),
        ("query-memory-devices", t3, t4),
        ("raw attach (all four)", t0, t4),
    ):
        t[name].append(b - a)
    ARMED.set()
    with qmp.listener("DEVICE_DELETED") as deleted:
        t5 = time.perf_counter()
        await qmp.execute("device_del", {"id": "raw"})
        await deleted.get()
    t6 = time.perf_counter()
    ARMED.clear()
    await qmp.execute("object-del", {"id": "raw-mem"})
    t7 = time.perf_counter()
    await qmp.execute("remove-fd", {"fdset-id": ans["fdset-id"], "fd": ans["fd"]})
    t8 = time.perf_counter()
    for name, a, b in (
        ("device_del .. DEVICE_DELETED", t5, t6),
        ("object-del", t6, t7),
        ("remove-fd", t7, t8),
        ("raw detach (all three)", t5, t8),
    ):
        t[name].append(b - a)


async def bench(sock: Path, qemu: Qemu, test_qmp: Path, runs: int, size: int) -> None:
    t: dict[str, list[float]] = {}
    names = [
        "add-fd", "object-add", "device_add", "query-memory-devices", "raw attach (all four)",
        "ram-block-attach",
        "device_del .. DEVICE_DELETED", "object-del", "remove-fd", "raw detach (all three)",
        "ram-block-detach",
    ]  # fmt: skip
    for name in names:
        t[name] = []
    qmp = QMPClient("bench")
    await qmp.connect(str(test_qmp))
    fd = os.memfd_create("bench-raw")
    os.ftruncate(fd, size)
    async with await ramd_client.connect(sock) as c:
        await c.ram_block_add("vm1", size, backend="memfd")
        path = str(qemu.ramd_qmp)
        for _ in range(3):  # warm-up: connections, first object of each kind
            await c.ram_block_attach("vm1", path, "pc-dimm")
            ARMED.set()
            await c.ram_block_detach("vm1", timeout=10)
            ARMED.clear()
            await raw_run(qmp, fd, size, {k: [] for k in names})
        for _ in range(runs):
            await raw_run(qmp, fd, size, t)
            t["ram-block-attach"].append(
                await timed(lambda: c.ram_block_attach("vm1", path, "pc-dimm"))
            )
            ARMED.set()
            t["ram-block-detach"].append(await timed(lambda: c.ram_block_detach("vm1", timeout=10)))
            ARMED.clear()
    await qmp.disconnect()
    os.close(fd)
    print(f"pc-dimm of {size >> 20} MiB, QEMU 7.2 as uid nobody, {runs} runs (ms)")
    print(f"{'step':34} {'p50':>8} {'p99':>8}")
    for name in names:
        print(f"{name:34} {pct(t[name], 50):8.2f} {pct(t[name], 99):8.2f}")
    print(f"(mean ram-block-attach {statistics.mean(t['ram-block-attach']) * 1000:.2f} ms)")


#: The block the restarted QEMU's main RAM is (the attach table uses ``vm1``).
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
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--size", type=parse_size, default=64 << 20)
    parser.add_argument("--restart-runs", type=int, default=5)
    parser.add_argument("--ram", type=parse_size, default=1 << 30)
    parser.add_argument("--only", choices=["attach", "restart"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ramd-bench-", dir="/dev/shm"))
    proc = start_ramd(tmp)
    if args.only == "restart":
        try:
            asyncio.run(bench_restart(tmp / "ramd.sock", tmp, args.restart_runs, args.ram))
        finally:
            stop([proc])
            shutil.rmtree(tmp, ignore_errors=True)
        return 0
    qemu = Qemu()
    qemu.qmp.close()  # the monitor serves one client: the bench's own QMPClient takes it
    done = threading.Event()
    player = threading.Thread(target=guest, args=(qemu, ARMED, done), daemon=True)
    player.start()
    try:
        asyncio.run(bench(tmp / "ramd.sock", qemu, qemu.dir / "test.qmp", args.runs, args.size))
        if args.only is None:
            asyncio.run(bench_restart(tmp / "ramd.sock", tmp, args.restart_runs, args.ram))
    finally:
        done.set()
        player.join()
        qemu.stop()
        stop([proc])
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
