"""ramd beside QEMU's own QMP server and a bare asyncio server, in one run, as tables.

Parts (``--only`` / ``--skip`` take a comma-separated list of them; all run by default):

- ``rpc``: ``query-version`` over QEMU QMP (one ``-qmp`` socket per client: a QMP chardev
  serves one client at a time), ramd JSON-RPC and ramd QMP (each on ``--event-loop asyncio``
  and ``uvloop``) and the bare asyncio echo floor (bench/echo_server.py): p50 and p99 of one
  request at a time on one connection, calls/s over 8 connections (one client process
  each), and server CPU µs per call (utime + stime of the server process over the measured
  interval, from /proc/PID/stat, divided by the calls), with the ratios to QEMU. The targets
  take turns in slices (see bench/rpc.py), because noise here comes in bursts;
- ``blocks``: the same for ``query-ram-blocks`` with 4 blocks, ramd only;
- ``rss``: RSS of a fresh daemon (each event loop) and of QEMU, idle after start;
- ``cli``: ``ramctl version`` wall time (median of 20 runs) beside ``python -c pass``;
- ``transfer``: ``ramctl write`` and ``ramctl read`` of 1 GiB through JSON-RPC, and the same
  through the client library (``write_range`` / ``read_range``), MiB/s and CPU seconds;
- ``ops``: block operations (resize, event fan-out, add by reservation size, prealloc
  bandwidth beside C, syscalls per request, RSS with 10,000 blocks).

``--quick`` shrinks every part (a smoke run, under a minute). RESULTS.md is written only by a
full run of all parts, or wherever ``--out`` says.

Usage: python bench/compare.py [--quick] [--only PARTS] [--skip PARTS] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import clitools
import ops
import rpc
import servers
from wire import Conn

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
GiB = 1 << 30
PARTS = ("rpc", "blocks", "rss", "cli", "transfer", "ops")
QEMU = "QEMU QMP"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much of everything to do: the full run, or the ``--quick`` smoke run."""

    rounds: int
    calls: int  # single-connection calls per target per round
    slice: float  # seconds of each 8-connection slice
    startup_runs: int
    transfer: int
    repeat: int  # ops repeats
    prealloc: int

    @staticmethod
    def pick(quick: bool) -> Sizes:
        if quick:
            return Sizes(2, 300, 0.4, 5, 64 * MiB, 3, 256 * MiB)
        return Sizes(6, 1000, 1.0, 20, GiB, 30, GiB)


class Servers:
    """The servers a run needs, started on first use and stopped by :meth:`stop`."""

    def __init__(self, tmp: Path, loops: Sequence[str], conns: int) -> None:
        self.tmp = tmp
        self.loops = loops
        self.conns = conns
        self.procs: list[subprocess.Popen[bytes]] = []
        self._ramd: dict[str, subprocess.Popen[bytes]] = {}
        self._qemu: tuple[int, list[Path], int, Path] | None = None
        self._qemu_tried = False
        self._echo: subprocess.Popen[bytes] | None = None

    def ramd(self, loop: str) -> tuple[int, Path]:
        """(pid, directory with ramd.sock and qmp.sock) of the daemon on ``loop``."""
        if loop not in self._ramd:
            proc = servers.start_ramd(self.tmp / f"ramd-{loop}", loop)
            self.procs.append(proc)
            self._ramd[loop] = proc
        return self._ramd[loop].pid, self.tmp / f"ramd-{loop}"

    def qemu(self) -> tuple[int, list[Path], int, Path] | None:
        """(pid, one QMP socket per client, pid and socket of a second QEMU with one monitor),
        or None when QEMU is not installed. Every monitor adds sources to QEMU's main loop
        (a single client's round trip was about 30% slower with 8 than with 1 here), so
        the one-connection slices use the single-monitor QEMU, QEMU's usual set-up."""
        if not self._qemu_tried:
            self._qemu_tried = True
            many = servers.start_qemu(self.tmp / "qemu", self.conns)
            one = servers.start_qemu(self.tmp / "qemu1", 1)
            self.procs += [q[0] for q in (many, one) if q is not None]
            if many is not None and one is not None:
                self._qemu = (many[0].pid, many[1], one[0].pid, one[1][0])
        return self._qemu

    def echo(self) -> tuple[int, Path]:
        if self._echo is None:
            self._echo = servers.start_echo(self.tmp / "echo")
            self.procs.append(self._echo)
        return self._echo.pid, self.tmp / "echo" / "echo.sock"

    def stop(self) -> None:
        servers.stop(self.procs)


# -- tables -------------------------------------------------------------------------------------


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
    """A Markdown table; with ``numeric``, every column but the first is right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|"
        + "|".join(
            "-" * (w + 2) if i == 0 or not numeric else "-" * (w + 1) + ":"
            for i, w in enumerate(widths)
        )
        + "|",
    ]
    for r in rows:
        cells = [
            c.ljust(w) if i == 0 or not numeric else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratio(x: float, ref: float | None) -> str:
    return f"{x / ref:.2f}x" if ref else "n/a"


def rpc_table(tallies: dict[str, rpc.Tally], conns: int, with_ratios: bool) -> str:
    ref = tallies.get(QEMU)
    headers = [
        "subject",
        "p50 µs",
        "p99 µs",
        f"calls/s, {conns} conn",
        "(slices min-max)",
        f"server CPU µs/call, {conns} conn",
        "server CPU µs/call, 1 conn",
    ]
    if with_ratios:
        headers += ["p50 vs QEMU", "calls/s vs QEMU", "CPU/call vs QEMU"]
    rows = []
    for label, t in tallies.items():
        row = [
            label,
            f"{t.p(0.5):.0f}",
            f"{t.p(0.99):.0f}",
            f"{t.rate:,.0f}",
            f"{min(t.slice_rates):,.0f}-{max(t.slice_rates):,.0f}",
            f"{t.cpu_per_call:.1f}",
            f"{t.lat_cpu_per_call:.1f}",
        ]
        if with_ratios:
            if label == QEMU:
                row += ["1", "1", "1"]
            else:
                row += [
                    ratio(t.p(0.5), ref.p(0.5) if ref else None),
                    ratio(t.rate, ref.rate if ref else None),
                    ratio(t.cpu_per_call, ref.cpu_per_call if ref else None),
                ]
        rows.append(row)
    return md_table(headers, rows)


# -- parts --------------------------------------------------------------------------------------


def ramd_targets(srv: Servers, method: str) -> list[rpc.Target]:
    out = []
    for loop in srv.loops:
        pid, d = srv.ramd(loop)
        out.append(rpc.Target(f"ramd JSON-RPC, {loop}", pid, (d / "ramd.sock",), False, method))
        out.append(rpc.Target(f"ramd QMP, {loop}", pid, (d / "qmp.sock",), True, method))
    return out


def part_rpc(srv: Servers, sz: Sizes) -> tuple[str, str]:
    targets = []
    q = srv.qemu()
    if q is not None:
        targets.append(
            rpc.Target(QEMU, q[0], tuple(q[1]), True, "query-version", single=(q[2], q[3]))
        )
    targets += ramd_targets(srv, "query-version")
    pid, sock = srv.echo()
    targets.append(rpc.Target("bare asyncio echo", pid, (sock,), False, "echo"))
    tallies = rpc.measure(targets, sz.rounds, sz.calls, sz.slice, srv.conns)
    title = "query-version"
    if q is None:
        title += " (QEMU not installed: no QEMU row and no ratios)"
    return title, rpc_table(tallies, srv.conns, q is not None)


def part_blocks(srv: Servers, sz: Sizes) -> tuple[str, str]:
    for loop in srv.loops:
        c = Conn(srv.ramd(loop)[1] / "ramd.sock")
        for i in range(4):
            c.call("ram-block-add", {"id": f"q{i}", "size": MiB, "max-size": 64 * MiB})
        c.close()
    tallies = rpc.measure(
        ramd_targets(srv, "query-ram-blocks"), sz.rounds, sz.calls, sz.slice, srv.conns
    )
    for loop in srv.loops:
        c = Conn(srv.ramd(loop)[1] / "ramd.sock")
        for i in range(4):
            c.call("ram-block-del", {"id": f"q{i}"})
        c.close()
    return "query-ram-blocks with 4 blocks (ramd only)", rpc_table(tallies, srv.conns, False)


def part_rss(srv: Servers, sz: Sizes) -> tuple[str, str]:
    rows = []
    for loop in srv.loops:
        proc = servers.start_ramd(srv.tmp / f"rss-{loop}", loop)
        try:
            time.sleep(1.0)
            rows.append([f"ramd, {loop}", f"{servers.rss(proc.pid) / MiB:.1f}"])
        finally:
            servers.stop([proc])
    q = servers.start_qemu(srv.tmp / "rss-qemu", 1)
    if q is not None:
        try:
            time.sleep(1.0)
            rows.append(["QEMU -machine none, 1 QMP socket", f"{servers.rss(q[0].pid) / MiB:.1f}"])
        finally:
            servers.stop([q[0]])
    return "idle RSS, 1 s after start (fresh processes)", md_table(["server", "RSS MiB"], rows)


def part_cli(srv: Servers, sz: Sizes) -> tuple[str, str]:
    s = clitools.startup(srv.ramd(srv.loops[0])[1] / "ramd.sock", sz.startup_runs)
    rows = [
        ["ramctl version", *(f"{v * 1e3:.0f}" for v in s.ramctl)],
        [f"{Path(sys.executable).name} -c pass (floor)", *(f"{v * 1e3:.0f}" for v in s.python)],
    ]
    return (
        f"command wall time, {sz.startup_runs} runs (ramd on {srv.loops[0]})",
        md_table(["command", "median ms", "min ms", "max ms"], rows),
    )


def part_transfer(srv: Servers, sz: Sizes) -> tuple[str, str]:
    pid, d = srv.ramd(srv.loops[0])
    src = srv.tmp / "bulk.bin"
    clitools.make_file(src, sz.transfer)
    try:
        runs = clitools.bulk(d / "ramd.sock", pid, src, sz.transfer)
    finally:
        src.unlink()
    size = f"{sz.transfer // MiB} MiB"
    rows = [
        [
            name,
            size,
            f"{t.mib_s:.1f}",
            f"{t.wall:.2f}",
            f"{t.client_cpu:.2f}",
            f"{t.server_cpu:.2f}",
        ]
        for name, t in runs.items()
    ]
    headers = ["command", "size", "MiB/s", "wall s", "client CPU s", "daemon CPU s"]
    return f"bulk transfer over JSON-RPC (ramd on {srv.loops[0]})", md_table(headers, rows)


def part_ops(srv: Servers, sz: Sizes) -> tuple[str, str]:
    pid, d = srv.ramd(srv.loops[0])
    sock = d / "ramd.sock"
    rows: list[list[str]] = []
    rows.append(
        [
            "daemon syscalls per JSON-RPC round trip (strace -c)",
            ops.syscalls_per_request(sock, pid, False),
        ]
    )
    g, s = ops.resize_time(sock, sz.repeat)
    rows.append(["ram-block-resize +64 MiB / -64 MiB round trip", f"{g:.0f} / {s:.0f} µs"])
    for k in (1, 100, 1000):
        ms = ops.fanout(sock, k, max(3, sz.repeat // 3))
        rows.append([f"event delivery to {k} subscriber(s) after the response", f"{ms:.2f} ms"])
    adds = {
        label: ops.add_time(sock, size, sz.repeat)
        for label, size in (("1 GiB", GiB), ("64 GiB", 64 * GiB), ("1 TiB", 1 << 40))
    }
    for label, v in adds.items():
        rows.append([f"ram-block-add + del, max-size {label}", f"{v:.0f} µs"])
    rows.append(["add time ratio 1 TiB / 1 GiB", f"{adds['1 TiB'] / adds['1 GiB']:.2f}"])
    prep = 3 if sz.prealloc < GiB else 9
    for huge in (False, True):
        ours = ops.prealloc_bw(sock, sz.prealloc, huge, prep)
        theirs = ops.c_populate_bw(sz.prealloc, huge, prep)
        ref = (
            "n/a (no gcc)"
            if theirs is None
            else f"{theirs[0]:.2f} GiB/s; ratio {ours[0] / theirs[0]:.2f}"
            f" (best runs: {ours[1]:.2f} vs {theirs[1]:.2f}, {ours[1] / theirs[1]:.2f})"
        )
        label = "THP" if huge else "4 KiB pages"
        rows.append(
            [
                f"prealloc {sz.prealloc // MiB} MiB ({label}), median: ramd vs C",
                f"{ours[0]:.2f} GiB/s vs {ref}",
            ]
        )
    fresh = servers.start_ramd(srv.tmp / "ops-rss", srv.loops[0])
    try:
        idle, full = ops.rss_with_blocks(srv.tmp / "ops-rss" / "ramd.sock", fresh.pid, 10_000)
    finally:
        servers.stop([fresh])
    rows.append(
        [
            "daemon RSS with 10,000 one-page blocks (a fresh daemon)",
            f"{full / MiB:.1f} MiB ({(full - idle) / 10_000:.0f} B per block over idle)",
        ]
    )
    return f"block operations (ramd on {srv.loops[0]})", md_table(
        ["measure", "value"], rows, numeric=False
    )


PART_FUNCS: dict[str, Callable[[Servers, Sizes], tuple[str, str]]] = {
    "rpc": part_rpc,
    "blocks": part_blocks,
    "rss": part_rss,
    "cli": part_cli,
    "transfer": part_transfer,
    "ops": part_ops,
}


# -- report -------------------------------------------------------------------------------------


def git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(HERE), *args], capture_output=True, text=True)
    return r.stdout.strip()


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    try:
        uv = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uv = "not installed"
    return (
        f"{os.cpu_count()} CPUs ({model}), {mem_kib / (1 << 20):.0f} GiB RAM, "
        f"Linux {platform.release()}, Python {platform.python_version()}, "
        f"QEMU {servers.qemu_version()}, uvloop {uv}"
    )


def parse_parts(text: str) -> list[str]:
    parts = [p for p in text.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: everything smaller")
    ap.add_argument(
        "--only", type=parse_parts, metavar="PARTS", help=f"run only these ({','.join(PARTS)})"
    )
    ap.add_argument(
        "--skip", type=parse_parts, metavar="PARTS", default=[], help="skip these parts"
    )
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    ap.add_argument("--loops", default="asyncio,uvloop", help="ramd event loops (comma-separated)")
    ap.add_argument("--conns", type=int, default=8, help="clients (and QEMU sockets) for calls/s")
    ap.add_argument("--rounds", type=int, help="interleaving rounds for rpc/blocks")
    ap.add_argument("--slice", type=float, help="seconds of each N-connection slice")
    ns = ap.parse_args()
    sz = Sizes.pick(ns.quick)
    if ns.rounds:
        sz = dataclasses.replace(sz, rounds=ns.rounds)
    if ns.slice:
        sz = dataclasses.replace(sz, slice=ns.slice)
    parts = [p for p in (ns.only or PARTS) if p not in ns.skip]
    loops = [loop for loop in ns.loops.split(",") if loop]
    out = ns.out
    if out is None and not ns.quick and parts == list(PARTS):
        out = HERE / "RESULTS.md"

    started = time.monotonic()
    date = datetime.datetime.now(datetime.UTC)
    load0 = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="ramd-bench-"))
    srv = Servers(tmp, loops, ns.conns)
    sections: list[tuple[str, str]] = []
    try:
        for part in parts:
            t0 = time.monotonic()
            title, table = PART_FUNCS[part](srv, sz)
            title += f" [{part}, {time.monotonic() - t0:.0f} s]"
            print(f"\n## {title}\n\n{table}", flush=True)
            sections.append((title, table))
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    dirty = (
        " (with uncommitted changes)"
        if git("status", "--porcelain", "--untracked-files=no")
        else ""
    )
    cmd = "bench/run " + " ".join(sys.argv[1:])
    header = "\n".join(
        [
            f"- date: {date:%Y-%m-%d %H:%M} UTC (start)",
            f"- commit: {git('rev-parse', '--short', 'HEAD')} {git('log', '-1', '--format=%s')}"
            + dirty,
            f"- machine: {machine()}",
            f"- load average (1 min) at start / end: {load0[0]:.1f} / {load1[0]:.1f}",
            f"- command: `{cmd.strip()}`, {time.monotonic() - started:.0f} s",
        ]
    )
    print(f"\n{header}")
    if out is not None:
        body = "\n\n".join(f"## {title}\n\n{table}" for title, table in sections)
        out.write_text(f"# ramd benchmark results\n\n{header}\n\n{METHOD}\n\n{body}\n")
        print(f"wrote {out}")


METHOD = """\
Method: every server is a separate process on this machine; clients are blocking Python
sockets using the same code for every server. p50/p99: one connection, one request at a time.
calls/s: N client processes, each with its own connection (QEMU gets one `-qmp` socket per
client, since a QMP monitor serves one client at a time; its p50/p99 and 1-connection CPU come
from a second QEMU with a single `-qmp` socket, because every extra monitor slows each of its
round trips, by about 30% with 8 on this machine). Server CPU µs/call: utime + stime of
the server process (all threads) over the measured interval, divided by the calls. The targets
take turns in slices (latency slice, then throughput slice, per target per round), so a burst
of noise from other load hits them all. On a 2-core machine the client processes compete with
the server for CPU, so calls/s is the noisiest figure and CPU per call the steadiest. The
kernel counts CPU time in 10 ms ticks, summed over all slices: the 1-connection CPU column
(fewer calls) is the coarser one."""


if __name__ == "__main__":
    main()
