"""Benchmark of the RAM block library: prints one Markdown table of medians (and p90).

Run as ``python bench/blocks.py [--repeat N] [--prealloc-size SIZE]``. Rows:

1. ``RAMList.add`` + ``remove`` of a 64 MiB block with ``max_size`` 1 GiB, 64 GiB and 1 TiB
   (nothing touched, so this is the mmap/munmap and bookkeeping cost). Reservation is one
   ``PROT_NONE``/``MAP_NORESERVE`` mmap, so the 1 TiB / 1 GiB ratio should be ~1.
2. ``resize`` of a block with max 1 GiB: grow 64 -> 128 MiB and shrink back, timed apart.
   Rows 1-2 pool every single operation (``--repeat`` runs of 100 each) for median and p90.
3. Preallocation bandwidth (GiB/s) of ``--prealloc-size`` bytes: ``RAMList.add(prealloc=True)``
   with and without ``hugepages``, ``MADV_POPULATE_WRITE`` through ctypes on a plain mapping,
   and a small C program built at run time with ``gcc -O2`` doing (a) ``MADV_POPULATE_WRITE``,
   (b) a write to each page, (c) ``MADV_HUGEPAGE`` on a 2 MiB aligned mapping then
   ``MADV_POPULATE_WRITE``. Each time covers mmap + populate (not the munmap). The ratio is
   median time of the Python path / median time of its C counterpart (>1: Python slower).
   p90 is the slow tail (the 90th percentile of time, shown as bandwidth); the note also gives
   the ratio of the best times. Each timed run directly follows an untimed run of the same
   variant, so it reuses guest pages the host still backs: in a VM with free page reporting
   (Firecracker, ``page_reporting``) freed memory goes back to the host and touching it again
   costs a host fault per page (up to 30x slower), which would otherwise swamp the result.
4. Per-block overhead of 10,000 non-resizable one-page blocks, each run in a fresh child
   process so allocator arenas from an earlier run do not hide the cost: Python heap
   (tracemalloc), VmRSS delta minus the blocks' own resident pages (0: they are untouched),
   VmPTE delta (page tables are not part of VmRSS), VMAs per block, and time per add.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from ramd.hostmem import libc, linux
from ramd.ramblock import RAMList
from ramd.sizes import format_size, parse_size

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
INNER = 100  # operations per run for rows 1-2
N_BLOCKS = 10_000

C_SOURCE = r"""
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#define POPULATE_WRITE 23
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(int argc, char **argv) {  /* usage: populate a|b|c SIZE; prints seconds */
    char mode = argv[1][0];
    size_t size = strtoull(argv[2], NULL, 0), huge = 2 << 20, page = sysconf(_SC_PAGESIZE);
    size_t len = mode == 'c' ? size + huge : size;
    double t0 = now();
    char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) { perror("mmap"); return 1; }
    char *p = mode == 'c' ? (char *)(((uintptr_t)base + huge - 1) & ~(huge - 1)) : base;
    if (mode == 'c' && madvise(p, size, MADV_HUGEPAGE)) { perror("madvise"); return 1; }
    if (mode == 'b') {
        for (size_t i = 0; i < size; i += page) ((volatile char *)p)[i] = 1;
    } else if (madvise(p, size, POPULATE_WRITE)) { perror("madvise"); return 1; }
    printf("%.9f\n", now() - t0);
    munmap(base, len);
    return 0;
}
"""


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def us(x: float) -> str:
    return f"{x * 1e6:.1f} us"


def proc_status(*keys: str) -> list[int]:
    """Values in bytes of ``/proc/self/status`` fields given in kB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return [int(fields[k].split()[0]) * 1024 for k in keys]


# -- rows 1-2 ------------------------------------------------------------------------------


def bench_reserve(repeat: int, max_sizes: list[int]) -> dict[int, list[float]]:
    ram, out = RAMList(), {m: [] for m in max_sizes}
    ram.remove(ram.add("warmup", 64 * MiB, TiB).id)
    for _ in range(repeat):
        for m in max_sizes:  # interleaved, so noise spreads evenly over the sizes
            for _ in range(INNER):
                t0 = time.perf_counter()
                ram.add("b", 64 * MiB, m)
                ram.remove("b")
                out[m].append(time.perf_counter() - t0)
    return out


def bench_resize(repeat: int) -> tuple[list[float], list[float]]:
    ram, grow, shrink = RAMList(), [], []
    ram.add("r", 64 * MiB, GiB)
    for _ in range(repeat * INNER):
        t0 = time.perf_counter()
        ram.resize("r", 128 * MiB)
        t1 = time.perf_counter()
        ram.resize("r", 64 * MiB)
        grow.append(t1 - t0)
        shrink.append(time.perf_counter() - t1)
    ram.close()
    return grow, shrink


# -- row 3 ---------------------------------------------------------------------------------


def ramd_prealloc(size: int, hugepages: bool) -> float:
    ram = RAMList()
    t0 = time.perf_counter()
    block = ram.add("p", size, prealloc=True, hugepages=hugepages)
    elapsed = time.perf_counter() - t0
    assert block.resident() == block.size
    ram.close()
    return elapsed


def ctypes_populate(size: int) -> float:
    prot, flags = libc.PROT_READ | libc.PROT_WRITE, libc.MAP_PRIVATE | libc.MAP_ANONYMOUS
    t0 = time.perf_counter()
    addr = libc.mmap(0, size, prot, flags)
    libc.madvise(addr, size, linux.MADV_POPULATE_WRITE)
    elapsed = time.perf_counter() - t0
    libc.munmap(addr, size)
    return elapsed


def build_c(tmp: str) -> str | None:
    if shutil.which("gcc") is None:
        return None
    src, exe = Path(tmp, "populate.c"), str(Path(tmp, "populate"))
    src.write_text(C_SOURCE)
    subprocess.run(["gcc", "-O2", "-o", exe, str(src)], check=True)
    return exe


def bench_prealloc(repeat: int, size: int, exe: str | None) -> dict[str, list[float]]:
    def c_run(mode: str) -> Callable[[], float]:
        return lambda: float(subprocess.run([exe or "", mode, str(size)], check=True,
                                            capture_output=True, text=True).stdout)  # fmt: skip

    variants: dict[str, Callable[[], float]] = {
        "ramd": lambda: ramd_prealloc(size, False),
        "ramd_huge": lambda: ramd_prealloc(size, True),
        "ctypes": lambda: ctypes_populate(size),
    }
    if exe:
        variants |= {"c_populate": c_run("a"), "c_touch": c_run("b"), "c_huge": c_run("c")}
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            fn()  # untimed warm-up run: see the module docstring, row 3
            out[name].append(fn())
    return out


# -- row 4 ---------------------------------------------------------------------------------


def overhead_child() -> None:
    """Runs in a fresh interpreter: prints the per-block costs as JSON."""
    page, ram = libc.host_page_size(), RAMList()
    gc.collect()
    rss0, pte0 = proc_status("VmRSS", "VmPTE")
    vmas0 = len(Path("/proc/self/maps").read_text().splitlines())
    t0 = time.perf_counter()
    for i in range(N_BLOCKS):
        ram.add(f"b{i}", page)
    add = (time.perf_counter() - t0) / N_BLOCKS
    rss1, pte1 = proc_status("VmRSS", "VmPTE")
    vmas1 = len(Path("/proc/self/maps").read_text().splitlines())
    own = sum(b.resident() for b in ram)
    ram.close()
    tracemalloc.start()
    heap0 = tracemalloc.get_traced_memory()[0]
    for i in range(N_BLOCKS):
        ram.add(f"b{i}", page)
    heap = tracemalloc.get_traced_memory()[0] - heap0
    tracemalloc.stop()
    ram.close()
    n = N_BLOCKS
    print(json.dumps({"add": add, "heap": heap / n, "rss": (rss1 - rss0 - own) / n,
                      "pte": (pte1 - pte0) / n, "vmas": (vmas1 - vmas0) / n}))  # fmt: skip


def bench_overhead(repeat: int) -> dict[str, list[float]]:
    runs = [
        json.loads(subprocess.check_output([sys.executable, __file__, "--overhead-child"]))
        for _ in range(repeat)
    ]
    return {k: [r[k] for r in runs] for k in runs[0]}


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--prealloc-size", type=parse_size, default="1G")
    ap.add_argument("--overhead-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.overhead_child:
        return overhead_child()
    size, n = args.prealloc_size, args.repeat
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}, kernel {platform.release()},"
          f" {os.cpu_count()} CPUs, THP {thp}, Python {platform.python_version()},"
          f" `python {' '.join(sys.argv)}`\n")  # fmt: skip
    rows = ["| # | measurement | median | p90 | note |", "|---|---|---|---|---|"]

    def row(num: int, what: str, med: str, tail: str = "", note: str = "") -> None:
        rows.append(f"| {num} | {what} | {med} | {tail} | {note} |")

    def time_row(num: int, what: str, xs: list[float], note: str = "") -> None:
        row(num, what, us(statistics.median(xs)), us(p90(xs)), note)

    reserve = bench_reserve(n, [GiB, 64 * GiB, TiB])
    for m, xs in reserve.items():
        note = ""
        if m == TiB:
            note = f"1 TiB / 1 GiB = {statistics.median(xs) / statistics.median(reserve[GiB]):.2f}"
        time_row(1, f"add + remove, size 64 MiB, max {format_size(m)}", xs, note)
    grow, shrink = bench_resize(n)
    time_row(2, "resize grow 64 -> 128 MiB (max 1 GiB)", grow)
    time_row(2, "resize shrink 128 -> 64 MiB (max 1 GiB)", shrink)

    with tempfile.TemporaryDirectory() as tmp:
        pre = bench_prealloc(n, size, build_c(tmp))
    med = {k: statistics.median(v) for k, v in pre.items()}

    def bw(x: float) -> str:
        return f"{size / GiB / x:.2f} GiB/s"

    labels = {
        "ramd": ("RAMList.add(prealloc=True)", "c_populate"),
        "ramd_huge": ("RAMList.add(prealloc=True, hugepages=True)", "c_huge"),
        "ctypes": ("ctypes mmap + MADV_POPULATE_WRITE", "c_populate"),
        "c_populate": ("C mmap + MADV_POPULATE_WRITE", None),
        "c_touch": ("C mmap + write to each page", "c_populate"),
        "c_huge": ("C MADV_HUGEPAGE + MADV_POPULATE_WRITE", None),
    }
    for key, (what, ref) in labels.items():
        what = f"prealloc {format_size(size)}: {what}"
        if key not in pre:
            row(3, what, "n/a (no gcc)")
            continue
        note = ""
        if ref in pre:
            best = min(pre[key]) / min(pre[ref])
            note = f"time / {ref}: median {med[key] / med[ref]:.2f}, best {best:.2f}"
        row(3, what, bw(med[key]), bw(p90(pre[key])), note)

    ov = bench_overhead(n)
    m4 = {k: statistics.median(v) for k, v in ov.items()}
    what = f"per block ({N_BLOCKS:,} one-page blocks)"
    row(4, f"{what}: Python heap (tracemalloc)", f"{m4['heap']:.0f} B")
    row(4, f"{what}: VmRSS delta - own pages", f"{m4['rss']:.0f} B", f"{p90(ov['rss']):.0f} B")
    row(4, f"{what}: VmPTE delta", f"{m4['pte']:.0f} B", "", f"{m4['vmas']:.1f} VMAs per block")
    time_row(4, f"{what}: time per add", ov["add"])
    print("\n".join(rows))


if __name__ == "__main__":
    main()
