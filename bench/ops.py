"""Block operations of a running ramd (the "ops" part of bench/run): resize, event fan-out,
add/del by reservation size, prealloc bandwidth beside C, syscalls per request, and RSS with
10,000 blocks. Every function takes the socket (and pid) of a daemon the caller started and
leaves no block behind.
"""

from __future__ import annotations

import json
import selectors
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from servers import rss
from wire import Conn

MiB = 1 << 20
GiB = 1 << 30


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
        c.call("ram-block-add", args)
        times.append(time.perf_counter() - t0)
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
