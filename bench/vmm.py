"""Attach and detach latency of a ``pc-dimm`` block (``ram-block-attach``/``-detach``) beside
the raw QMP steps a client makes itself (``add-fd``, ``object-add``, ``device_add``,
``query-memory-devices``; ``device_del`` until ``DEVICE_DELETED``, ``object-del``,
``remove-fd``), p50 and p99 over ``--runs`` runs each, in ms, printed as a table.

    .venv/bin/python bench/vmm.py [--runs 50] [--size 64M] [--virtio-mem-runs 5]

Starts its own daemon and one QEMU (``-machine pc``, qtest accelerator, as uid ``nobody``; see
``tests/vmm_support.py``). No guest runs: a thread plays the guest's ACPI part through the
qtest socket, polling the memory hot-plug status register of slot 0 and ejecting the DIMM
as soon as QEMU asks (what a guest's ``_EJ0`` does), so both detach paths include the same
guest reaction. Both paths pass a memfd; ramd also gives QEMU's uid an ACL entry on it.

virtio-mem (``--virtio-mem-runs``, 0 to skip): the test guest (``tests/qemu_support.py``: a
real Linux kernel, KVM when usable, else TCG) with a ``memfd`` block attached as virtio-mem;
each run times ``ram-block-resize`` to 256 MiB until the ``RAM_BLOCK_RESIZED`` that reports
all of it plugged, and back to 0 until nothing is, beside the same by hand (``qom-set`` of
``requested-size`` until QEMU's ``MEMORY_DEVICE_SIZE_CHANGE``), in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import ramd_client
from qemu.qmp import QMPClient
from servers import start_ramd, stop

from ramd.sizes import parse_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qemu_support import Qemu as GuestQemu
from vmm_support import MHP_BASE, Qemu

#: What the guest plugs in the virtio-mem runs, and the device's max-size.
PLUG = 256 << 20
VMEM_MAX = 512 << 20


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


async def plug_by_hand(qmp: QMPClient, size: int) -> float:
    """``qom-set`` of a device's ``requested-size`` until QEMU reports ``size`` plugged."""
    t0 = time.perf_counter()
    with qmp.listener("MEMORY_DEVICE_SIZE_CHANGE") as changes:
        await qmp.execute(
            "qom-set",
            {"path": "/machine/peripheral/raw", "property": "requested-size", "value": size},
        )
        while (await changes.get()).get("data", {}).get("size") != size:
            pass
    return time.perf_counter() - t0


async def plug_by_ramd(
    c: ramd_client.AsyncClient, events: ramd_client.EventStream, size: int
) -> float:
    """``ram-block-resize`` until the ``RAM_BLOCK_RESIZED`` to ``size``."""
    t0 = time.perf_counter()
    await c.ram_block_resize("vmem", size)
    while (await anext(events)).data.model_dump(by_alias=True)["new-size"] != size:
        pass
    return time.perf_counter() - t0


async def bench_virtio_mem(sock: Path, runs: int) -> None:
    """Plug and unplug 256 MiB in a real guest, through ramd and by hand."""
    t: dict[str, list[float]] = {
        k: [] for k in ("ramd plug", "ramd unplug", "raw plug", "raw unplug")
    }
    vm_max = VMEM_MAX >> 20
    args = [
        "-object", f"memory-backend-ram,id=raw-mem,size={vm_max}M",
        "-device", "virtio-mem-pci,id=raw,memdev=raw-mem,requested-size=0",
    ]  # fmt: skip
    with GuestQemu(memory=256, maxmem=256 + 2 * vm_max, args=args) as vm:
        async with vm.qmp(second=True) as qmp, await ramd_client.connect(sock) as c:
            await c.ram_block_add("vmem", 2 << 20, max_size=VMEM_MAX, backend="memfd")
            await c.ram_block_attach("vmem", str(vm.qmp_path), "virtio-mem", requested_size=0)
            async with c.events(["RAM_BLOCK_RESIZED"], replay=False) as events:
                for _ in range(runs):
                    t["ramd plug"].append(await plug_by_ramd(c, events, PLUG))
                    t["ramd unplug"].append(await plug_by_ramd(c, events, 0))
                    t["raw plug"].append(await plug_by_hand(qmp, PLUG))
                    t["raw unplug"].append(await plug_by_hand(qmp, 0))
        accel = vm.accel
    print(
        f"\nvirtio-mem: {PLUG >> 20} MiB from request to plugged (and back to 0),"
        f" guest under {accel}, {runs} runs (ms)"
    )
    print(f"{'step':34} {'p50':>8} {'p99':>8}")
    for name, values in t.items():
        print(f"{name:34} {pct(values, 50):8.2f} {pct(values, 99):8.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--size", type=parse_size, default=64 << 20)
    parser.add_argument("--virtio-mem-runs", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ramd-bench-", dir="/dev/shm"))
    proc = start_ramd(tmp)
    qemu = Qemu()
    qemu.qmp.close()  # the monitor serves one client: the bench's own QMPClient takes it
    done = threading.Event()
    player = threading.Thread(target=guest, args=(qemu, ARMED, done), daemon=True)
    player.start()
    try:
        asyncio.run(bench(tmp / "ramd.sock", qemu, qemu.dir / "test.qmp", args.runs, args.size))
    finally:
        done.set()
        player.join()
        qemu.stop()
    try:
        if args.virtio_mem_runs > 0:
            asyncio.run(bench_virtio_mem(tmp / "ramd.sock", args.virtio_mem_runs))
    finally:
        stop([proc])
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
