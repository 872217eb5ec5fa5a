"""A consistent snapshot of the daemon's figures, taken on the loop thread for a scrape.

Thread-safety (the choice, docs/protocol.md §15): every figure the metrics report is loop-owned
state (the RAM list, the mappers, the connections, the plain counters of
:mod:`ramd.metrics.counters`, the broadcaster and the server), written without locks. A scrape
runs on an HTTP thread, so it never reads that state itself: :class:`LoopFigures` schedules
:func:`take` on the loop with ``call_soon_threadsafe`` and waits for the immutable
:class:`Figures` it returns (with a timeout). One snapshot is one loop callback, so its figures
agree with each other (``ramd_blocks`` is the number of ``ramd_block_size_bytes`` series), and
counting on the hot paths costs no lock. The callback is O(blocks + connections), a plain
tuple per block: 16384 blocks take about 3 ms.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramd.api.service import Service
from ramd.metrics.counters import OUTCOMES
from ramd.ramblock import RAMBlock
from ramd.ramblock.holders import KINDS

if TYPE_CHECKING:
    from ramd.transport.sockets.server import Server

#: Holder kinds (docs/protocol.md §12) counted per block, in the order they are reported.
HOLDER_KINDS = KINDS
#: The dialects whose connections are counted (``ramd_connections{socket}``).
SOCKETS = ("jsonrpc", "qmp")
#: Seconds a scrape waits for the loop to take its snapshot before it answers 503.
SNAPSHOT_TIMEOUT = 5.0

Pairs = tuple[tuple[str, int], ...]


def holder_counts(block: RAMBlock) -> tuple[int, ...]:
    """How many holders ``block`` has now of each kind in :data:`HOLDER_KINDS`, in that
    order (from ``RamBlockInfo.holders``, kept by :class:`~ramd.ramblock.holders.Holders`)."""
    kinds = [h["kind"] for h in block.holder_list]
    return tuple(kinds.count(kind) for kind in HOLDER_KINDS)


def pool_ready(service: Service) -> Pairs:
    """``(pool name, blocks ready)`` per configured pool (docs/protocol.md §14)."""
    return tuple(sorted(service.pools.ready_counts().items()))


#: One block: ``(id, size, max_size, holders)``, ``holders`` a count for each of
#: :data:`HOLDER_KINDS` in that order. A plain tuple: thousands are made in one loop
#: callback, and a tuple display costs a fraction of any class's constructor.
BlockFigures = tuple[str, int, int, tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class CommandLatency:
    command: str
    #: Calls per bucket of :data:`ramd.metrics.counters.BUCKETS`, then above them (not
    #: cumulative).
    buckets: tuple[int, ...]
    total_seconds: float


@dataclass(frozen=True, slots=True)
class Figures:
    """Everything one scrape reports; immutable, so any thread may read it."""

    blocks: tuple[BlockFigures, ...]
    reserved: int
    used: int
    connections: Pairs
    #: ``((command, outcome), calls)``.
    commands: tuple[tuple[tuple[str, str], int], ...]
    latencies: tuple[CommandLatency, ...]
    events: Pairs
    refused_connections: Pairs
    job_bytes: Pairs
    pools: Pairs


def take(service: Service, server: Server) -> Figures:
    """The figures now. Loop thread only."""
    blocks = tuple([(b.id, b.size, b.max_size, holder_counts(b)) for b in service.ram])
    connections = dict.fromkeys(SOCKETS, 0)
    for conn in server.connections:
        if conn.dialect is not None and conn.dialect.name in connections:
            connections[conn.dialect.name] += 1
    tallies = service.command_stats.by_command
    jobs = service.jobs
    return Figures(
        blocks=blocks,
        reserved=service.ram.reserved,
        used=service.ram.used,
        connections=tuple(connections.items()),
        commands=tuple(
            ((name, outcome), calls)
            for name, tally in tallies.items()
            for outcome, calls in zip(OUTCOMES, tally.outcomes, strict=True)
            if calls
        ),
        latencies=tuple(
            CommandLatency(name, tuple(tally.buckets), tally.seconds)
            for name, tally in tallies.items()
        ),
        events=tuple(service.broadcaster.emitted_by_name.items()),
        refused_connections=tuple(server.refused.items()),
        job_bytes=tuple(jobs.bytes_by_type().items()) if jobs is not None else (),
        pools=pool_ready(service),
    )


class SnapshotUnavailable(Exception):
    """The loop did not take the snapshot in time, or is gone (the daemon is stopping)."""


class LoopFigures:
    """Takes :func:`take` snapshots on the loop for callers on other threads."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        snapshot: Callable[[], Figures],
        timeout: float = SNAPSHOT_TIMEOUT,
    ) -> None:
        self._loop = loop
        self._snapshot = snapshot
        self._timeout = timeout

    def __call__(self) -> Figures:
        """A snapshot taken on the loop; :class:`SnapshotUnavailable` after ``timeout``.
        Never call it on the loop thread (it would wait for itself)."""
        fut: concurrent.futures.Future[Figures] = concurrent.futures.Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self._snapshot())
                except BaseException as e:
                    fut.set_exception(e)

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:
            raise SnapshotUnavailable("the daemon is stopping") from None
        try:
            return fut.result(self._timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise SnapshotUnavailable(
                f"the daemon took no snapshot within {self._timeout:g} s"
            ) from None
