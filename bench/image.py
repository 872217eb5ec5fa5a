"""Benchmark of RAM block images (ramd.snapshot): save and load bandwidth beside ``cp``.

Run as ``python bench/image.py [--size 4G] [--dir DIR] [--repeat N]``. It creates one real
anonymous RAM block (``RAMList``) of ``--size`` and measures, in one run:

- save: :func:`write_image` of the block into :func:`atomic_target` in ``DIR`` (a temporary
  directory on the filesystem of ``/var/tmp`` by default), reading the block with
  ``RAMList.read``; timed without and with the final fsync + rename + directory fsync;
- load: :func:`verify` of that image, then :func:`load` into the block (``RAMList.write``
  for data, ``RAMList.discard`` for zeros), timed apart and together;
- ``cp`` of a regular file of the same size (the full image) to a new name in the same
  directory, timed without and with ``sync FILE`` (an fsync of the copy).

for two contents: "full" (every page non-zero, pseudo-random) and "mostly zero" (64 MiB of
data at the start, then one data page per MiB). Bandwidth is block bytes / time. Each number
is the median of ``--repeat`` runs; ``sync`` runs (untimed) before every timed step, so dirty
pages of one step are not flushed during the next. The ratio column is the bandwidth divided
by ``cp``'s in the same run (without fsync against cp, with fsync against cp + sync).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ramd.ramblock import RAMList
from ramd.sizes import format_size, parse_size
from ramd.snapshot import (
    BlockDescriptor,
    ImageInfo,
    WriteFn,
    ZeroFn,
    atomic_target,
    load,
    open_image,
    open_state_dir,
    verify,
    write_image,
)

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096


def fill(ram: RAMList, block_id: str, size: int, kind: str) -> None:
    """Write the block's contents: "full" (every page non-zero) or "mostly zero"."""
    ram.discard(block_id, 0, size)
    pattern = bytearray(os.urandom(64 * MiB))
    if kind == "full":
        for off in range(0, size, len(pattern)):
            n = min(len(pattern), size - off)
            pattern[:8] = off.to_bytes(8, "little")  # no two chunks alike
            ram.write(block_id, off, bytes(pattern[:n]))
    else:
        ram.write(block_id, 0, bytes(pattern[: min(64 * MiB, size)]))
        for off in range(64 * MiB, size, MiB):
            start = off % (63 * MiB)
            ram.write(block_id, off, bytes(pattern[start : start + PAGE]))


def as_pointer(view: memoryview) -> ctypes.Array[ctypes.c_char]:
    """A ctypes view of a writable buffer, for ``ctypes.memmove`` (no copy)."""
    return (ctypes.c_char * len(view)).from_buffer(view)


def timed(fn: Callable[[], object]) -> float:
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


#: Steps timed per repetition, and the cp variant each is compared with.
STEPS = {
    "save": "cp",
    "save+fsync": "cp+sync",
    "verify": "cp",
    "load": "cp",
    "verify+load": "cp",
}


class Run:
    """One content kind: the time of every step, per repetition."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}
        self.allocated = 0

    def add(self, step: str, seconds: float) -> None:
        self.times.setdefault(step, []).append(seconds)

    def median(self, step: str) -> float:
        return statistics.median(self.times[step])

    def ratio(self, step: str) -> float:
        """Median over repetitions of (cp time / step time), each cp from the same repetition."""
        refs = self.times[STEPS[step]]
        return statistics.median(r / t for r, t in zip(refs, self.times[step], strict=True))


def copy_file(src: Path, dst: Path, fsync: bool) -> None:
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if fsync:
        subprocess.run(["sync", str(dst)], check=True)


def make_reference(path: Path, size: int) -> None:
    """A regular file of ``size`` non-zero pseudo-random bytes, for ``cp``."""
    pattern = bytearray(os.urandom(64 * MiB))
    with open(path, "wb") as f:
        for off in range(0, size, len(pattern)):
            pattern[:8] = off.to_bytes(8, "little")
            f.write(pattern[: min(len(pattern), size - off)])


def time_verify_load(dfd: int, run: Run, write: WriteFn, zero: ZeroFn) -> None:
    """Time :func:`verify`, then :func:`load` of the image ``image`` in ``dfd``."""
    fd = open_image(dfd, "image")
    try:
        infos: list[ImageInfo] = []
        run.add("verify", timed(lambda: infos.append(verify(fd))))
        run.add("load", timed(lambda: load(fd, infos[0], write, zero)))
    finally:
        os.close(fd)


def bench_kind(ram: RAMList, size: int, kind: str, work: Path, reference: Path, repeat: int) -> Run:
    """Fill the block with ``kind`` contents, then time every step ``repeat`` times; each
    repetition also times ``cp`` of ``reference`` into ``work`` (with and without fsync)."""
    fill(ram, "src", size, kind)
    block = ram.get("src")
    desc = BlockDescriptor("src", size, size, False, block.page_size, "anonymous", {})
    dfd = open_state_dir(str(work))
    run = Run()

    def read(index: int, offset: int, buf: memoryview) -> None:
        assert offset + len(buf) <= block.size
        ctypes.memmove(as_pointer(buf), block.host + offset, len(buf))

    def write(index: int, offset: int, view: memoryview) -> None:
        assert offset + len(view) <= block.size
        ctypes.memmove(block.host + offset, as_pointer(view), len(view))

    def zero(index: int, offset: int, length: int) -> None:
        ram.discard("src", offset, length)

    def save_nosync() -> None:
        fd = os.open(work / "nosync", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            write_image(fd, [desc], read)
        finally:
            os.close(fd)

    def save_atomic() -> None:
        with atomic_target(dfd, "image") as fd:
            write_image(fd, [desc], read)

    try:
        for _ in range(repeat):
            for name in os.listdir(work):
                os.unlink(work / name)
            run.add("cp", timed(lambda: copy_file(reference, work / "copy", False)))
            os.unlink(work / "copy")
            run.add("save", timed(save_nosync))
            os.unlink(work / "nosync")
            run.add("cp+sync", timed(lambda: copy_file(reference, work / "copy", True)))
            os.unlink(work / "copy")
            run.add("save+fsync", timed(save_atomic))
            run.allocated = os.stat(work / "image").st_blocks * 512

            time_verify_load(dfd, run, write, zero)
            run.add("verify+load", run.times["verify"][-1] + run.times["load"][-1])
    finally:
        os.close(dfd)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="4G", help="block size (default 4G)")
    parser.add_argument("--dir", default=None, help="directory for the images (default: /var/tmp)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    size = parse_size(args.size)
    base = Path(tempfile.mkdtemp(prefix="ramd-image-bench-", dir=args.dir or "/var/tmp"))
    reference = base / "reference"
    ram = RAMList()
    try:
        make_reference(reference, size)
        ram.add("src", size)
        runs = {
            k: bench_kind(ram, size, k, base / "state", reference, args.repeat)
            for k in ("full", "mostly zero")
        }
    finally:
        ram.close()
        shutil.rmtree(base)

    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; Linux {platform.release()};"
        f" {os.cpu_count()} CPUs; Python {platform.python_version()};"
        f" block {format_size(size)}; median of {args.repeat}; load average before"
        f" {load_before}; command: {' '.join(sys.argv)}"
    )
    print()
    print("| content | step | time | bandwidth | ratio to cp (same run) |")
    print("|---|---|---|---|---|")
    gib = size / GiB
    for kind, run in runs.items():
        for step, ref in STEPS.items():
            t = run.median(step)
            print(
                f"| {kind} | {step} | {t:.2f} s | {gib / t:.2f} GiB/s |"
                f" {run.ratio(step):.2f} (vs {ref}) |"
            )
        for ref in ("cp", "cp+sync"):
            t = run.median(ref)
            name = f"{ref} of a {format_size(size)} file"
            print(f"| {kind} | {name} | {t:.2f} s | {gib / t:.2f} GiB/s | |")
        print(f"| {kind} | image allocated on disk | {format_size(run.allocated)} | | |")


if __name__ == "__main__":
    main()
