"""Request latency, throughput and server CPU per call, with the targets taking turns.

Noise on a shared machine comes in bursts, so no target is measured in one block: each round
visits every target once, doing a single-connection latency slice and then an N-connection
throughput slice, and the figures pool all rounds.

- latency: one connection, one request at a time (send, read the reply line); p50 and p99 of
  every call of every round;
- throughput: N client *processes* (not threads: one GIL would be the bottleneck), client i on
  ``paths[i % len(paths)]``. They connect and warm up first, then all start at one instant
  and count replies for the slice's duration;
- server CPU per call: utime + stime of the server process between the start and the end of
  the slice (read by this process while the clients run), divided by the calls in it.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.synchronize as mps
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers import cpu_seconds
from wire import Conn


@dataclass(frozen=True)
class Target:
    """One thing to measure: a server process, the sockets its clients use, and a method.
    ``single`` is (pid, socket) of the server for the one-connection slices when that is
    another process (QEMU: one with a single monitor), else None (``pid``, ``paths[0]``)."""

    label: str
    pid: int
    paths: tuple[Path, ...]
    qmp: bool
    method: str
    single: tuple[int, Path] | None = None


@dataclass
class Tally:
    """Everything measured for one target, pooled over rounds."""

    latencies: list[float] = field(default_factory=list)
    lat_cpu: float = 0.0
    calls: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    slice_rates: list[float] = field(default_factory=list)

    def p(self, q: float) -> float:
        """The ``q`` quantile of the latencies, in µs."""
        ts = sorted(self.latencies)
        return ts[min(len(ts) - 1, int(len(ts) * q))] * 1e6

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_call(self) -> float:
        """Server CPU µs per call over the N-connection slices."""
        return self.cpu / self.calls * 1e6 if self.calls else 0.0

    @property
    def lat_cpu_per_call(self) -> float:
        """Server CPU µs per call over the one-connection slices."""
        return self.lat_cpu / len(self.latencies) * 1e6 if self.latencies else 0.0


def latency_slice(t: Target, n: int, tally: Tally, warmup: int = 50) -> None:
    pid, path = t.single or (t.pid, t.paths[0])
    c = Conn(path, t.qmp)
    req = c.request_bytes(t.method)
    for _ in range(warmup):
        c.send_raw(req)
        c.f.readline()
    times = []
    cpu0 = cpu_seconds(pid)
    for _ in range(n):
        t0 = time.perf_counter()
        c.send_raw(req)
        c.f.readline()
        times.append(time.perf_counter() - t0)
    tally.lat_cpu += cpu_seconds(pid) - cpu0
    c.close()
    tally.latencies += times


def _client(
    path: Path,
    qmp: bool,
    method: str,
    seconds: float,
    ready: mp.Queue[int],
    go: mps.Event,
    start: Any,
    counts: mp.Queue[int],
) -> None:
    """One throughput client (its own process): connect, warm up, wait for ``go``, then
    count round trips from ``start.value`` for ``seconds`` (CLOCK_MONOTONIC is system-wide)."""
    c = Conn(path, qmp)
    req = c.request_bytes(method)
    for _ in range(20):
        c.send_raw(req)
        c.f.readline()
    ready.put(1)
    go.wait()
    begin = start.value
    end = begin + seconds
    while time.monotonic() < begin:
        pass
    count = 0
    while time.monotonic() < end:
        c.send_raw(req)
        c.f.readline()
        count += 1
    counts.put(count)
    c.close()


def throughput_slice(t: Target, conns: int, seconds: float, tally: Tally) -> None:
    ctx = mp.get_context("fork")
    ready: mp.Queue[int] = ctx.Queue()
    counts: mp.Queue[int] = ctx.Queue()
    go = ctx.Event()
    start = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_client,
            args=(t.paths[i % len(t.paths)], t.qmp, t.method, seconds, ready, go, start, counts),
        )
        for i in range(conns)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    begin = time.monotonic() + 0.02
    start.value = begin
    go.set()
    time.sleep(max(0.0, begin - time.monotonic()))
    cpu0 = cpu_seconds(t.pid)
    time.sleep(max(0.0, begin + seconds - time.monotonic()))
    cpu1 = cpu_seconds(t.pid)
    total = sum(counts.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    tally.calls += total
    tally.seconds += seconds
    tally.cpu += cpu1 - cpu0
    tally.slice_rates.append(total / seconds)


def measure(
    targets: list[Target], rounds: int, per_round: int, seconds: float, conns: int = 8
) -> dict[str, Tally]:
    """``rounds`` rounds; in each, every target gets ``per_round`` single-connection calls and
    a ``seconds`` slice of ``conns`` connections, in the order given."""
    tallies = {t.label: Tally() for t in targets}
    for _ in range(rounds):
        for t in targets:
            latency_slice(t, per_round, tallies[t.label])
            throughput_slice(t, conns, seconds, tallies[t.label])
    return tallies
