"""Fleet start (docs/protocol.md §14): clones of a sealed template beside full copies, QEMU
``prealloc=on`` on a pooled block beside a fresh one, and the daemon's latency while a pool
refills. Printed tables, nothing asserted.

    .venv/bin/python bench/fleet.py [--size 1G] [--clones 1,4,8] [--refill 2G] [--runs 5]
        [--parts fleet,prealloc,latency]

Starts its own daemons and QEMUs (``qemu-system-x86_64``, TCG, stopped with ``-S``).

- **clones vs copies**: N QEMUs started at once, each by ``ramctl exec --block B -- qemu
  ... memory-backend-file,mem-path=/proc/self/fd/{fd},share=...``. A clone maps the sealed
  template privately (``share=off``); a copy gets a block of its own, filled from the
  template with ``copy_file_range`` (copy time included), mapped shared. "ready" is the time
  from a VM's start until its QEMU's QMP answers ``query-status`` (mean of the N); "all
  ready" from the first start until the last one answered, and "per VM" that over N;
  "memory" is the host memory the N VMs hold beyond the template, once each has read all its
  RAM (HMP ``pmemsave`` to /dev/null): the sum over the QEMUs of their ``Pss``
  (``smaps_rollup``) minus their ``Pss`` of the template's mapping, so a clone is charged
  its own pages and its QEMU, and a copy its whole block.
- **prealloc**: one QEMU with ``prealloc=on,share=on`` on a block taken from a ``[[pool]]``
  (pages already allocated, of transparent huge pages where the kernel allows) and on a fresh
  ``memfd`` block, each with and without ``align=2M`` (QEMU's mapping 2 MiB-aligned, so a
  huge page is one page table entry): time until QMP answers (best of ``--runs``, alternating).
- **latency**: ``query-version`` round trips on one connection (p50, p99, max) while a pool
  of ``--refill`` bytes (two blocks) refills after both were taken, beside the same with
  nothing refilling.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ramd_client
from ramd_client.shared import get_fd
from servers import stop, wait_socket

from ramd.sizes import parse_size

MiB = 1 << 20
GiB = 1 << 30
RAMCTL = [sys.executable, "-m", "ramd_client.cli"]


@contextmanager
def daemon(tmp: Path, config: str = "") -> Iterator[Path]:
    """A ramd on ``tmp/ramd.sock`` with ``config``; stopped at the end."""
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "ramd.toml"
    cfg.write_text('log-level = "warning"\n' + config)
    sock = tmp / "ramd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ramd", "--socket", str(sock), "--config", str(cfg)]
    )
    try:
        wait_socket(sock, proc)
        yield sock
    finally:
        stop([proc])


def qmp_call(sock: socket.socket, name: str, **args: object) -> object:
    sock.sendall(json.dumps({"execute": name, "arguments": args}).encode())
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("QEMU closed QMP")
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if "error" in msg:
                raise RuntimeError(msg)
            if "return" in msg:
                return msg["return"]


class Vm:
    """One QEMU started by ``ramctl exec`` on block ``block``."""

    def __init__(self, qemu: str, rpc: Path, block: str, qmp: Path, size: int, backend: str):
        self.qmp = qmp
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [
                *RAMCTL, "--socket", str(rpc), "exec", "--block", block, "--",
                qemu, "-machine", "pc,accel=tcg,memory-backend=ram0", "-m", f"{size >> 20}M",
                "-object",
                f"memory-backend-file,id=ram0,mem-path=/proc/self/fd/{{fd}},size={size >> 20}M,"
                + backend,
                "-S", "-display", "none", "-nodefaults", "-qmp", f"unix:{qmp},server=on,wait=off",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.sock = socket.socket(socket.AF_UNIX)
        self.ready = 0.0

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from the start until QMP answered ``query-status``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(self.qmp))
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU did not start ({self.proc.returncode})") from None
                time.sleep(0.002)
        self.sock.recv(65536)  # greeting
        qmp_call(self.sock, "qmp_capabilities")
        qmp_call(self.sock, "query-status")
        self.ready = time.perf_counter() - self.started
        return self.ready

    def read_all(self, size: int) -> None:
        out = qmp_call(
            self.sock,
            "human-monitor-command",
            **{"command-line": f'pmemsave 0 {size:#x} "/dev/null"'},
        )
        if out:
            raise RuntimeError(f"pmemsave: {out}")

    def memory(self, mapping: str) -> tuple[int, int]:
        """(Pss of the whole process, Pss of its mapping of ``mapping``) in bytes."""
        total = 0
        for line in Path(f"/proc/{self.proc.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total = int(line.split()[1]) * 1024
        mapped = 0
        inside = False
        for line in Path(f"/proc/{self.proc.pid}/smaps").read_text().splitlines():
            head = line.split()
            if not head[0].endswith(":"):
                inside = mapping in line
            elif inside and head[0] == "Pss:":
                mapped += int(head[1]) * 1024
        return total, mapped

    def close(self) -> None:
        self.sock.close()
        stop([self.proc])


def delete(c: ramd_client.Client, block: str) -> None:
    """Delete ``block`` once the lease of the QEMU that exited is gone."""
    while c.query_ram_blocks(block)[0].leases:
        time.sleep(0.01)
    c.ram_block_del(block)


def fill_template(rpc: Path, block: str, size: int) -> None:
    """Non-zero bytes in every page of ``block``, written through a mapping fd."""
    fd, _, conn = get_fd(rpc, block)
    try:
        pattern = bytes(range(256)) * (64 * MiB // 256)
        for off in range(0, size, len(pattern)):
            os.pwrite(fd, pattern[: size - off], off)
    finally:
        os.close(fd)
        conn.close()


def copy_block(rpc: Path, src: str, dst: str, size: int) -> None:
    sfd, _, sconn = get_fd(rpc, src, readonly=True)
    dfd, _, dconn = get_fd(rpc, dst)
    try:
        done = 0
        while done < size:
            done += os.copy_file_range(sfd, dfd, size - done, done, done)
    finally:
        os.close(sfd)
        os.close(dfd)
        sconn.close()
        dconn.close()


def fleet_row(qemu: str, tmp: Path, rpc: Path, n: int, size: int, clones: bool) -> str:
    vms: list[Vm] = []
    try:
        with ramd_client.Client(rpc, timeout=600) as c:
            first = time.perf_counter()
            for i in range(n):
                t0 = time.perf_counter()
                if clones:
                    block, backend = "tpl", "share=off"
                else:
                    block, backend = f"copy{i}", "share=on"
                    c.ram_block_add(block, size, backend="memfd")
                    copy_block(rpc, "tpl", block, size)
                vm = Vm(qemu, rpc, block, tmp / f"vm{i}.qmp", size, backend)
                vm.started = t0
                vms.append(vm)
            ready = [vm.wait_ready() for vm in vms]
            all_ready = max(vm.started + vm.ready for vm in vms) - first
            for vm in vms:
                vm.read_all(size)
            used = 0
            for vm in vms:
                total, template = vm.memory("memfd:ramd:tpl")
                used += total - template
            for vm in vms:
                vm.close()
            vms.clear()
            if not clones:
                for i in range(n):
                    delete(c, f"copy{i}")
    finally:
        for vm in vms:
            vm.close()
    kind = "clones" if clones else "copies"
    return (
        f"| {n} {kind:<6} | {statistics.mean(ready) * 1000:8.0f} | {all_ready * 1000:9.0f}"
        f" | {all_ready * 1000 / n:7.0f} | {used / MiB:10.0f} |"
    )


def part_fleet(qemu: str, tmp: Path, size: int, counts: list[int]) -> None:
    print(f"\n## {size >> 20} MiB template: clones (share=off) vs full copies\n")
    print("| N VMs      | ready ms | all ready | per VM | memory MiB |")
    print("|------------|---------:|----------:|-------:|-----------:|")
    with daemon(tmp / "fleet") as rpc, ramd_client.Client(rpc, timeout=600) as c:
        c.ram_block_add("tpl", size, backend="memfd", prealloc=True)
        fill_template(rpc, "tpl", size)
        c.ram_block_seal("tpl")
        for n in counts:
            print(fleet_row(qemu, tmp / "fleet", rpc, n, size, clones=True), flush=True)
            print(fleet_row(qemu, tmp / "fleet", rpc, n, size, clones=False), flush=True)


def part_prealloc(qemu: str, tmp: Path, size: int, runs: int) -> None:
    print(f"\n## QEMU prealloc=on start, {size >> 20} MiB\n")
    print(f"| block       | QEMU options                  | best of {runs}, ms | median ms |")
    print("|-------------|-------------------------------|--------------:|----------:|")
    config = f'[[pool]]\nname = "vm"\nsize = {size}\ncount = 1\n'
    cases = [  # (block, options): the same options for the pooled block and the fresh one
        ("pooled", "share=on,prealloc=on,align=2M"),
        ("fresh memfd", "share=on,prealloc=on,align=2M"),
        ("pooled", "share=on,prealloc=on"),
        ("fresh memfd", "share=on,prealloc=on"),
    ]
    with daemon(tmp / "prealloc", config) as rpc, ramd_client.Client(rpc, timeout=600) as c:
        rows: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
        for _ in range(runs):
            for kind, options in cases:
                if kind == "pooled":
                    while c.query_pools()[0].ready < 1:
                        time.sleep(0.05)
                    c.ram_block_add_from_pool("vm0", "vm")
                else:
                    c.ram_block_add("vm0", size, backend="memfd")
                vm = Vm(qemu, rpc, "vm0", tmp / "prealloc" / "vm.qmp", size, options)
                try:
                    rows[kind, options].append(vm.wait_ready())
                finally:
                    vm.close()
                delete(c, "vm0")
        for (kind, options), times in rows.items():
            best, median = min(times) * 1000, statistics.median(times) * 1000
            print(f"| {kind:<11} | {options:<29} | {best:13.0f} | {median:9.0f} |")
        for options in dict.fromkeys(o for _, o in cases):
            ratio = min(rows["pooled", options]) / min(rows["fresh memfd", options])
            print(f"\npooled / fresh with {options}: {ratio:.2f}")


def latencies(
    c: ramd_client.Client, until: float, done: Callable[[], bool] | None = None
) -> list[float]:
    """Round trips of ``query-version`` (seconds) until ``until`` or ``done()``."""
    out = []
    while time.monotonic() < until:
        t0 = time.perf_counter()
        c.query_version()
        out.append(time.perf_counter() - t0)
        if done is not None and len(out) % 20 == 0 and done():
            break
    return out


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000


def part_latency(tmp: Path, refill: int) -> None:
    print(f"\n## query-version while a pool refills {refill >> 20} MiB (two blocks)\n")
    print("| while            | calls | p50 ms | p99 ms | max ms | refill s |")
    print("|------------------|------:|-------:|-------:|-------:|---------:|")
    config = f'[[pool]]\nname = "big"\nsize = {refill // 2}\ncount = 2\n'
    with (
        daemon(tmp / "latency", config) as rpc,
        ramd_client.Client(rpc, timeout=600) as c,
        ramd_client.Client(rpc, timeout=600) as probe,
    ):
        while c.query_pools()[0].ready < 2:
            time.sleep(0.05)
        idle = latencies(probe, time.monotonic() + 3)
        c.ram_block_add_from_pool("a", "big")
        c.ram_block_add_from_pool("b", "big")
        t0 = time.perf_counter()
        busy = latencies(probe, time.monotonic() + 120, lambda: c.query_pools()[0].ready == 2)
        took = time.perf_counter() - t0
        for name, xs, secs in (("nothing", idle, ""), ("pool refilling", busy, f"{took:.2f}")):
            print(
                f"| {name:<16} | {len(xs):5d} | {_pct(xs, 0.5):6.2f} | {_pct(xs, 0.99):6.2f}"
                f" | {max(xs) * 1000:6.2f} | {secs:>8} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=GiB)
    parser.add_argument("--clones", default="1,4,8")
    parser.add_argument("--refill", type=parse_size, default=2 * GiB)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--parts", default="fleet,prealloc,latency", help="tables to print")
    args = parser.parse_args()
    parts = args.parts.split(",")
    qemu = shutil.which("qemu-system-x86_64")
    tmp = Path(tempfile.mkdtemp(prefix="ramd-fleet-"))
    try:
        if qemu is None:
            print("qemu-system-x86_64 missing: clone and prealloc tables skipped")
        else:
            if "fleet" in parts:
                part_fleet(qemu, tmp, args.size, [int(n) for n in args.clones.split(",")])
            if "prealloc" in parts:
                part_prealloc(qemu, tmp, args.size, args.runs)
        if "latency" in parts:
            part_latency(tmp, args.refill)
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
