"""Pools: blocks allocated and populated before anyone asks for them (docs/protocol.md §14).

Each pool keeps up to ``count`` spare blocks ready (:meth:`RAMList.create_spare`): mapped on
the loop thread (cheap: no page is allocated there), then filled in a worker thread (every
page allocated and zero), invisible to clients. :meth:`Pools.take` commits a ready spare
under a client's id at once (no allocation on the request path) and starts the refill;
a spare is never given twice and a block is never put back, so no block from a pool ever
holds an earlier user's data.

Fills run in one thread of the pools' own, at the lowest CPU priority (nice 19): a refill is
background work, and must not slow the VMs that just took their blocks, nor the daemon's
other workers.

Charge (``pooled``): a pool is charged ``count x size`` against ``max-used`` from start-up.
Taking a block moves one block's charge from the pool to the block (``used``); the refill
charges the pool again, one block at a time, only while ``room(bytes)`` says ``max-used``
still fits it (otherwise it waits for :meth:`Pools.kick`, which the daemon calls when a
block is removed). Refill work is bounded: one block at a time per pool, in one task.

Ownership and thread: a :class:`Pools` is owned by the service; loop thread only, except the
fills it runs in its thread on spares nobody else can see.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from ramd.errors import RamdError
from ramd.hostmem import libc, linux
from ramd.hostmem.mmap_alloc import mmap_pagesize
from ramd.ramblock.block import RAMBlock
from ramd.ramblock.registry import RAMList

log = logging.getLogger(__name__)

#: Seconds before a pool retries after its refill failed (the kernel refused memory).
RETRY_DELAY = 5.0


@dataclass(frozen=True)
class PoolSpec:
    """One ``[[pool]]``: ``count`` blocks of ``size`` bytes (resizable to ``max_size``)."""

    name: str
    size: int
    count: int
    backend: Literal["memfd", "anonymous"] = "memfd"
    hugetlb: bool = False
    max_size: int | None = None


def page_size_of(spec: PoolSpec) -> int:
    """The page size of the pool's blocks (a huge page size for ``hugetlb``), found without
    allocating anything (a throwaway memfd's filesystem)."""
    if not spec.hugetlb:
        return libc.host_page_size()
    fd = linux.memfd_create("ramd:probe", hugetlb=True)
    try:
        return mmap_pagesize(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class Pool:
    """One pool's state. Invariant: ``len(ready) + (filling is not None) <= charged <=
    spec.count``; ``charged * unit`` bytes are charged to it."""

    spec: PoolSpec
    #: Bytes of one block (``size`` rounded up to the page size).
    unit: int
    charged: int
    ready: list[RAMBlock] = field(default_factory=list)
    filling: RAMBlock | None = None
    task: asyncio.Task[None] | None = None


class Pools:
    """Every pool of the daemon."""

    def __init__(self, ram: RAMList, room: Callable[[int], bool]) -> None:
        self._ram = ram
        self._room = room
        self._thread: ThreadPoolExecutor | None = None
        self._pools: dict[str, Pool] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False

    def pools(self) -> list[Pool]:
        """The pools in configuration order."""
        return list(self._pools.values())

    @property
    def charged(self) -> int:
        """Bytes charged to pools (``pooled`` in ``query-stats``)."""
        return sum(p.charged * p.unit for p in self._pools.values())

    def ready_counts(self) -> dict[str, int]:
        """Blocks ready to be taken now, per pool."""
        return {name: len(p.ready) for name, p in self._pools.items()}

    @staticmethod
    def charge_of(spec: PoolSpec) -> int:
        """What ``spec`` charges against ``max-used``: ``count x size`` in whole pages."""
        page = page_size_of(spec)
        return spec.count * ((spec.size + page - 1) // page * page)

    def add(self, spec: PoolSpec) -> Pool:
        """Add a pool, charged in full from now on; :meth:`kick` starts its filling."""
        if spec.name in self._pools:
            raise ValueError(f"pool '{spec.name}' defined twice")
        pool = Pool(spec, self.charge_of(spec) // spec.count, spec.count)
        self._pools[spec.name] = pool
        return pool

    def take(self, name: str, block_id: str) -> RAMBlock:
        """Commit a ready block of pool ``name`` as ``block_id`` (no allocation here) and
        start the refill. ``RamdError``: unknown pool, empty pool, bad or taken id."""
        pool = self._pools.get(name)
        if pool is None:
            raise RamdError(f"Pool '{name}' not found")
        if not pool.ready:
            raise RamdError(f"Pool '{name}' is empty")
        block = self._ram.take_spare(pool.ready[0], block_id)
        pool.ready.pop(0)
        pool.charged -= 1
        self.kick()
        return block

    def kick(self) -> None:
        """Start refilling every pool that is short and not refilling already."""
        if self._closed:
            return
        for pool in self._pools.values():
            if len(pool.ready) < pool.spec.count and (pool.task is None or pool.task.done()):
                pool.task = asyncio.get_running_loop().create_task(self._refill(pool))

    async def _refill(self, pool: Pool) -> None:
        """Fill ``pool`` one block at a time until it holds ``count`` ready blocks, its
        charge does not fit ``max-used``, or the kernel refuses memory (retried later)."""
        spec = pool.spec
        while len(pool.ready) < spec.count:
            if pool.charged <= len(pool.ready):
                if not self._room(pool.unit):
                    return  # kicked again when a block is removed
                pool.charged += 1
            try:
                block = self._ram.create_spare(
                    spec.name, spec.size, spec.max_size, backend=spec.backend, hugetlb=spec.hugetlb
                )
            except RamdError as e:
                self._failed(pool, e)
                return
            pool.filling = block
            try:
                await self._in_thread(functools.partial(self._ram.fill, block))
            except RamdError as e:
                self._ram.abort(block)
                self._failed(pool, e)
                return
            except BaseException:
                self._ram.abort(block)
                raise
            finally:
                pool.filling = None
            pool.ready.append(block)

    async def _in_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the pools' thread; if the waiting task is cancelled, this returns
        only once the thread is done (the spare it fills is freed after, never under it)."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(
                1, thread_name_prefix="ramd-pool", initializer=_lowest_priority
            )
        fut = asyncio.get_running_loop().run_in_executor(self._thread, fn)
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    def _failed(self, pool: Pool, error: RamdError) -> None:
        log.warning(
            "pool '%s': a block could not be made ready (%s): retrying in %s s",
            pool.spec.name,
            error.desc,
            RETRY_DELAY,
        )
        if self._retry is None or self._retry.cancelled():
            self._retry = asyncio.get_running_loop().call_later(RETRY_DELAY, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self.kick()

    def close(self) -> None:
        """Stop refilling and free every ready block (a block being filled is freed by
        its refill task once its worker thread is done with it)."""
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        for pool in self._pools.values():
            if pool.task is not None:
                pool.task.cancel()
            for block in pool.ready:
                self._ram.abort(block)
            pool.ready.clear()
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)


def _lowest_priority() -> None:
    """The calling thread runs at nice 19 (Linux: a thread id is a ``PRIO_PROCESS`` who)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as e:
        log.warning("pool thread keeps its priority: %s", e)
