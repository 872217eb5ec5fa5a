"""ramd beside QEMU's own QMP server and a bare asyncio server, in one run, as one table.

Rows (medians over repeats; clients are blocking Python sockets, like the issue's reference):
- round trip p50/p99 on one connection: `query-ram-blocks` (empty daemon) and `query-version`
  over ramd JSON-RPC and ramd QMP, `query-version` over QEMU QMP, and the asyncio echo floor;
- requests/s over 8 connections (8 client processes), same servers;
- `ram-block-resize` grow + shrink by 64 MiB, one round trip each;
- one event's delivery to 1, 100 and 1,000 subscribers, measured from the moment the command's
  response reached its sender until the last subscriber has read the event;
- `ram-block-add` (+ del) with `max-size` 1 GiB, 64 GiB and 1 TiB;
- prealloc bandwidth of `ram-block-add prealloc=true` vs `MADV_POPULATE_WRITE` from C;
- daemon RSS idle and with 10,000 one-page blocks.

Usage: python bench/compare.py [--quick] [--out bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
GiB = 1 << 30


# -- servers ------------------------------------------------------------------------------------


def wait_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{path} never accepted")


def start_ramd(tmp: Path, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    tmp.mkdir(exist_ok=True)
    cfg = tmp / "bench.toml"
    cfg.write_text(
        'log-level = "warning"\n[limits]\nmax-connections = 4000\nmax-blocks = 20000\n'
        "subscriber-queue = 4096\n"
    )
    cmd = [sys.executable, "-m", "ramd", "--socket", str(tmp / "ramd.sock")]
    cmd += ["--qmp-socket", str(tmp / "qmp.sock"), "--config", str(cfg), *(extra or [])]
    proc = subprocess.Popen(cmd)
    wait_socket(tmp / "ramd.sock", proc)
    return proc


def start_qemu(tmp: Path) -> subprocess.Popen[bytes] | None:
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return None
    path = tmp / "qemu.sock"
    cmd = [exe, "-machine", "none", "-nodefaults", "-display", "none"]
    cmd += ["-qmp", f"unix:{path},server=on,wait=off"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_socket(path, proc)
    return proc


def start_echo(tmp: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(HERE / "echo_server.py"), str(tmp / "echo.sock")])
    wait_socket(tmp / "echo.sock", proc)
    return proc


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- clients ------------------------------------------------------------------------------------


class Conn:
    """A blocking line-oriented connection speaking JSON-RPC or QMP."""

    def __init__(self, path: Path, qmp: bool = False) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.f = self.s.makefile("rb")
        self.qmp = qmp
        self.n = 0
        if qmp:
            self.f.readline()
            self.send_raw(b'{"execute":"qmp_capabilities"}\n')
            self.f.readline()

    def send_raw(self, data: bytes) -> None:
        self.s.sendall(data)

    def request_bytes(self, method: str, params: dict[str, object] | None = None) -> bytes:
        self.n += 1
        if self.qmp:
            msg: dict[str, object] = {"execute": method, "id": self.n}
            if params:
                msg["arguments"] = params
        else:
            msg = {"jsonrpc": "2.0", "method": method, "id": self.n}
            if params:
                msg["params"] = params
        return json.dumps(msg).encode() + b"\n"

    def reply(self) -> dict[str, object]:
        while True:
            msg = json.loads(self.f.readline())
            if "id" in msg:
                return msg  # type: ignore[no-any-return]

    def call(self, method: str, params: dict[str, object] | None = None) -> dict[str, object]:
        self.send_raw(self.request_bytes(method, params))
        return self.reply()

    def close(self) -> None:
        self.f.close()
        self.s.close()


Target = tuple[Path, bool, str]  # socket, speaks QMP, method


def round_trips(
    targets: dict[str, Target], n: int, rounds: int = 10
) -> dict[str, tuple[float, float]]:
    """p50/p99 µs of one request at a time on one connection per target. The targets take
    turns in ``rounds`` slices, so a burst of noise on this shared machine hits them all."""
    conns = {}
    for label, (path, qmp, method) in targets.items():
        c = Conn(path, qmp)
        req = c.request_bytes(method)
        for _ in range(200):
            c.send_raw(req)
            c.f.readline()
        conns[label] = (c, req)
    times: dict[str, list[float]] = {label: [] for label in targets}
    for _ in range(rounds):
        for label, (c, req) in conns.items():
            for _ in range(n // rounds):
                t0 = time.perf_counter()
                c.send_raw(req)
                c.f.readline()
                times[label].append(time.perf_counter() - t0)
    out = {}
    for label, ts in times.items():
        conns[label][0].close()
        ts.sort()
        out[label] = (ts[len(ts) // 2] * 1e6, ts[int(len(ts) * 0.99)] * 1e6)
    return out


def _worker(path: str, qmp: bool, method: str, seconds: float, start: float, q: mp.Queue) -> None:  # type: ignore[type-arg]
    c = Conn(Path(path), qmp)
    req = c.request_bytes(method)
    while time.time() < start:
        time.sleep(0.001)
    end = start + seconds
    count = 0
    while time.time() < end:
        c.send_raw(req)
        c.f.readline()
        count += 1
    c.close()
    q.put(count)


def _throughput(path: Path, qmp: bool, method: str, conns: int, seconds: float) -> int:
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start = time.time() + 0.3
    procs = [
        ctx.Process(target=_worker, args=(str(path), qmp, method, seconds, start, q))
        for _ in range(conns)
    ]
    for p in procs:
        p.start()
    total = sum(q.get() for _ in procs)
    for p in procs:
        p.join()
    return total


def throughput(
    targets: dict[str, Target], seconds: float, conns: int = 8, rounds: int = 3
) -> dict[str, float]:
    """Requests/s over ``conns`` connections (one client process each), targets in turns."""
    counts = dict.fromkeys(targets, 0)
    for _ in range(rounds):
        for label, (path, qmp, method) in targets.items():
            counts[label] += _throughput(path, qmp, method, conns, seconds / rounds)
    return {label: count / seconds for label, count in counts.items()}


def median_time(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fanout(path: Path, subscribers: int, repeat: int) -> float:
    """Median ms from the command's response to the last subscriber's event."""
    subs = []
    sel = selectors.DefaultSelector()
    for _ in range(subscribers):
        c = Conn(path)
        c.call("subscribe", {"replay": False})
        c.s.setblocking(False)
        sel.register(c.s, selectors.EVENT_READ, c)
        subs.append(c)
    trig = Conn(path)
    trig.call("ram-block-add", {"id": "fan", "size": 4096, "max-size": MiB})
    for c in subs:  # drain the ADDED event
        _read_event(c)
    results = []
    for i in range(repeat):
        trig.send_raw(
            trig.request_bytes("ram-block-resize", {"id": "fan", "size": 8192 * (1 + i % 2)})
        )
        trig.reply()
        t_resp = time.perf_counter()
        pending = set(subs)
        while pending:
            for key, _ in sel.select(5):
                c = key.data
                if c in pending and _read_event(c):
                    pending.discard(c)
        results.append((time.perf_counter() - t_resp) * 1e3)
    trig.call("ram-block-del", {"id": "fan"})
    for c in subs:
        sel.unregister(c.s)
        c.s.close()
    trig.close()
    return statistics.median(results)


def _read_event(c: Conn) -> bool:
    c.s.setblocking(True)
    line = c.f.readline()
    c.s.setblocking(False)
    return b"RAM_BLOCK" in line


def add_time(path: Path, max_size: int, repeat: int) -> float:
    c = Conn(path)

    def once() -> None:
        c.call("ram-block-add", {"id": "t", "size": 64 * MiB, "max-size": max_size})
        c.call("ram-block-del", {"id": "t"})

    t = median_time(once, repeat)
    c.close()
    return t * 1e6


def resize_time(path: Path, repeat: int) -> tuple[float, float]:
    c = Conn(path)
    c.call("ram-block-add", {"id": "rs", "size": 64 * MiB, "max-size": GiB})
    grow, shrink = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        c.call("ram-block-resize", {"id": "rs", "size": 128 * MiB})
        t1 = time.perf_counter()
        c.call("ram-block-resize", {"id": "rs", "size": 64 * MiB})
        t2 = time.perf_counter()
        grow.append(t1 - t0)
        shrink.append(t2 - t1)
    c.call("ram-block-del", {"id": "rs"})
    c.close()
    return statistics.median(grow) * 1e6, statistics.median(shrink) * 1e6


def prealloc_bw(path: Path, size: int, hugepages: bool, repeat: int) -> tuple[float, float]:
    """GiB/s of ``ram-block-add prealloc=true``. Each timed add follows an untimed one of the
    same size: this VM hands freed memory back to its host, and faulting such memory in is
    many times slower, so only back-to-back runs compare fairly (see bench/blocks.py)."""
    c = Conn(path)
    times = []
    for _ in range(repeat):
        args = {"id": "pa", "size": size, "prealloc": True, "hugepages": hugepages}
        c.call("ram-block-add", args)
        c.call("ram-block-del", {"id": "pa"})
        t0 = time.perf_counter()
        r = c.call(
            "ram-block-add", {"id": "pa", "size": size, "prealloc": True, "hugepages": hugepages}
        )
        times.append(time.perf_counter() - t0)
        assert "result" in r, r
        c.call("ram-block-del", {"id": "pa"})
    c.close()
    return size / statistics.median(times) / GiB, size / min(times) / GiB


def c_populate_bw(size: int, hugepages: bool, repeat: int) -> tuple[float, float] | None:
    """GiB/s of MADV_POPULATE_WRITE from C (compiled now), or None without gcc; like
    :func:`prealloc_bw`, the timed populate follows an untimed one."""
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    src = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>
int main(int argc, char **argv) {
    size_t size = strtoull(argv[1], 0, 10); int huge = atoi(argv[2]);
    size_t align = 2 << 20;
    struct timespec a, b;
    for (int run = 0; run < 2; run++) {
        char *raw = mmap(0, size + align, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
        char *p = (char *)(((uintptr_t)raw + align - 1) & ~(align - 1));
        clock_gettime(CLOCK_MONOTONIC, &a);
        if (huge) madvise(p, size, 14);
        if (madvise(p, size, 23)) { perror("madvise"); return 1; }
        clock_gettime(CLOCK_MONOTONIC, &b);
        munmap(raw, size + align);
    }
    printf("%.9f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "p.c").write_text(src)
        exe = Path(d) / "p"
        subprocess.run([gcc, "-O2", "-o", str(exe), str(Path(d) / "p.c")], check=True)
        times = [
            float(
                subprocess.run(
                    [str(exe), str(size), str(int(hugepages))],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for _ in range(repeat)
        ]
    return size / statistics.median(times) / GiB, size / min(times) / GiB


def syscalls_per_request(path: Path, pid: int, qmp: bool, n: int = 2000) -> str:
    """Daemon syscalls per ``query-version`` round trip, by ``strace -c`` (if installed)."""
    strace = shutil.which("strace")
    if strace is None:
        return "n/a (no strace)"
    c = Conn(path, qmp)
    req = c.request_bytes("query-version")
    st = subprocess.Popen([strace, "-c", "-f", "-p", str(pid)], stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    for _ in range(n):
        c.send_raw(req)
        c.f.readline()
    st.send_signal(2)
    report = st.communicate()[1]
    c.close()
    calls = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    per = {name: round(count / n, 2) for name, count in calls.items() if count >= n // 2}
    return f"{sum(per.values()):.1f} (" + ", ".join(f"{k} {v:g}" for k, v in per.items()) + ")"


def rss_with_blocks(path: Path, pid: int, count: int) -> tuple[int, int]:
    """(idle RSS, RSS with ``count`` one-page blocks)."""
    idle = rss(pid)
    c = Conn(path)
    batch = 500
    for start in range(0, count, batch):
        reqs = [
            {
                "jsonrpc": "2.0",
                "method": "ram-block-add",
                "params": {"id": f"b{i}", "size": 4096},
                "id": i,
            }
            for i in range(start, min(count, start + batch))
        ]
        c.send_raw(json.dumps(reqs).encode() + b"\n")
        c.f.readline()
    full = rss(pid)
    for start in range(0, count, batch):
        reqs = [
            {"jsonrpc": "2.0", "method": "ram-block-del", "params": {"id": f"b{i}"}, "id": i}
            for i in range(start, min(count, start + batch))
        ]
        c.send_raw(json.dumps(reqs).encode() + b"\n")
        c.f.readline()
    c.close()
    return idle, full


# -- report -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument(
        "--loops",
        default="asyncio,uvloop",
        help="event loops to run ramd on (comma-separated; uvloop needs the 'fast' extra)",
    )
    ns = ap.parse_args()
    n_rt = 500 if ns.quick else 5000
    secs = 1.0 if ns.quick else 3.0
    rep = 5 if ns.quick else 30
    rows: list[tuple[str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="ramd-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ramd = start_ramd(tmp)
        procs.append(ramd)
        idle_rss = rss(ramd.pid)
        qemu = start_qemu(tmp)
        if qemu is not None:
            procs.append(qemu)
        procs.append(start_echo(tmp))
        qmp_ok = (tmp / "qmp.sock").exists()
        uv = tmp / "uv"
        try:
            if "uvloop" not in ns.loops.split(","):
                raise ImportError("not asked for")
            import uvloop  # noqa: F401

            procs.append(start_ramd(uv, ["--event-loop", "uvloop"]))
        except ImportError as e:
            rows.append(("ramd on uvloop", f"n/a: {e}"))
            uv = None  # type: ignore[assignment]

        def fmt_rt(v: tuple[float, float]) -> str:
            return f"{v[0]:.0f} / {v[1]:.0f} µs"

        targets: dict[str, Target] = {
            "ramd JSON-RPC query-ram-blocks": (tmp / "ramd.sock", False, "query-ram-blocks"),
            "ramd JSON-RPC query-version": (tmp / "ramd.sock", False, "query-version"),
        }
        if qmp_ok:
            targets["ramd QMP query-ram-blocks"] = (tmp / "qmp.sock", True, "query-ram-blocks")
            targets["ramd QMP query-version"] = (tmp / "qmp.sock", True, "query-version")
        if uv is not None:
            targets["ramd JSON-RPC query-version, uvloop"] = (
                uv / "ramd.sock",
                False,
                "query-version",
            )
            targets["ramd QMP query-version, uvloop"] = (uv / "qmp.sock", True, "query-version")
        if qemu is not None:
            targets["QEMU QMP query-version"] = (tmp / "qemu.sock", True, "query-version")
        targets["asyncio echo floor"] = (tmp / "echo.sock", False, "echo")
        rt = round_trips(targets, n_rt)
        qemu_rt = rt.get("QEMU QMP query-version", (0.0, 0.0))[0]
        for name, v in rt.items():
            ratio = f" ({v[0] / qemu_rt:.2f}x QEMU)" if qemu_rt and "QEMU" not in name else ""
            rows.append((f"round trip p50 / p99: {name}", fmt_rt(v) + ratio))

        tp = throughput({k: v for k, v in targets.items() if "query-ram-blocks" not in k}, 3 * secs)
        qemu_tp = tp.get("QEMU QMP query-version", 0.0)
        for name, v in tp.items():
            ratio = f" ({v / qemu_tp:.2f}x QEMU)" if qemu_tp and "QEMU" not in name else ""
            rows.append((f"requests/s over 8 connections: {name}", f"{v:,.0f}{ratio}"))
        if qemu is None:
            rows.append(("QEMU QMP", "n/a: qemu-system-x86_64 not installed"))

        rows.append(
            (
                "daemon syscalls per JSON-RPC round trip (strace -c)",
                syscalls_per_request(tmp / "ramd.sock", ramd.pid, False),
            )
        )
        g, s = resize_time(tmp / "ramd.sock", rep)
        rows.append(("ram-block-resize +64 MiB / -64 MiB round trip", f"{g:.0f} / {s:.0f} µs"))
        for k in (1, 100, 1000):
            ms = fanout(tmp / "ramd.sock", k, max(3, rep // 3))
            rows.append((f"event delivery to {k} subscriber(s) after the response", f"{ms:.2f} ms"))
        adds = {
            label: add_time(tmp / "ramd.sock", size, rep)
            for label, size in (("1 GiB", GiB), ("64 GiB", 64 * GiB), ("1 TiB", 1 << 40))
        }
        for label, v in adds.items():
            rows.append((f"ram-block-add + del, max-size {label}", f"{v:.0f} µs"))
        rows.append(("add time ratio 1 TiB / 1 GiB", f"{adds['1 TiB'] / adds['1 GiB']:.2f}"))
        size = (256 * MiB) if ns.quick else GiB
        prep = 3 if ns.quick else 9
        for huge in (False, True):
            ours = prealloc_bw(tmp / "ramd.sock", size, huge, prep)
            theirs = c_populate_bw(size, huge, prep)
            label = "THP" if huge else "4 KiB pages"
            if theirs is None:
                ref = "n/a (no gcc)"
            else:
                ref = (
                    f"{theirs[0]:.2f} GiB/s; ratio {ours[0] / theirs[0]:.2f}"
                    f" (best runs: {ours[1]:.2f} vs {theirs[1]:.2f}, {ours[1] / theirs[1]:.2f})"
                )
            rows.append(
                (
                    f"prealloc {size // MiB} MiB ({label}), median: ramd vs C MADV_POPULATE_WRITE",
                    f"{ours[0]:.2f} GiB/s vs {ref}",
                )
            )
        fresh = start_ramd(tmp / "rss")
        procs.append(fresh)
        idle2, full = rss_with_blocks(tmp / "rss" / "ramd.sock", fresh.pid, 10_000)
        rows.append(("daemon RSS idle (at start)", f"{idle_rss / MiB:.1f} MiB"))
        rows.append(
            (
                "daemon RSS with 10,000 blocks (a fresh daemon)",
                f"{full / MiB:.1f} MiB ({(full - idle2) / 10_000:.0f} B per block)",
            )
        )
    finally:
        for p in procs:
            p.terminate()
            p.wait(20)
        shutil.rmtree(tmp, ignore_errors=True)

    header = (
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; Linux {platform.release()}; "
        f"{os.cpu_count()} CPUs; Python {platform.python_version()}; command: bench/run"
        + (" --quick" if ns.quick else "")
    )
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {a:<{width}} | {b} |" for a, b in rows]
    table = "\n".join(lines)
    print(header)
    print(table)
    ns.out.write_text(f"# ramd benchmark results\n\n{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
