"""The API-level state of a daemon (:class:`Service`) and of one connection (:class:`Session`).

Ownership and thread: the :class:`Service` owns the ``RAMList`` and the
:class:`~ramd.api.events.Broadcaster`; a :class:`Session` is owned by its connection. Both are
used on the asyncio loop thread only.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from ramd.api.blockinfo import BlockInfoCache
from ramd.api.events import Broadcaster, Event, EventSink
from ramd.api.holding import SessionHolders
from ramd.api.models import EVENT_NAMES
from ramd.config import DEFAULT_STATE_DIR, Limits
from ramd.hostlimits import HostLimits
from ramd.jobs import JobManager
from ramd.logs import LogBudget
from ramd.metrics.counters import CommandStats
from ramd.process import fdstore
from ramd.process.fdbudget import FdBudget, nofile_limit
from ramd.ramblock import RAMBlock, RAMList
from ramd.ramblock.change import Waiting
from ramd.ramblock.pools import Pools
from ramd.vmm.registry import Attachments

T = TypeVar("T")

#: Threads that fill, lock or scan block memory off the loop thread.
WORKER_THREADS = 4


class Service:
    """Everything the command handlers operate on."""

    def __init__(
        self,
        limits: Limits | None = None,
        ram: RAMList | None = None,
        host: HostLimits | None = None,
        state_dir: str = DEFAULT_STATE_DIR,
    ) -> None:
        self.limits = limits or Limits()
        #: The host's memory bounds, checked before a block is added or grown.
        self.host = host or HostLimits()
        self.ram = ram if ram is not None else RAMList()
        self.infos = BlockInfoCache()
        self.ram.holders.on_change = self._holders_changed
        self.ram.on_remove.append(fdstore.forget)
        #: The pools of ready blocks (``[[pool]]``), charged against ``max-used``.
        self.pools = Pools(self.ram, self.fits_used)
        self.ram.on_remove.append(lambda block: self.pools.kick())
        self.mappers = SessionHolders(self.ram.holders)
        self.broadcaster = Broadcaster(self.mappers.of)
        #: How block changes wait (acknowledgements, worker threads).
        self.waiting = Waiting(
            lambda: self.limits.ack_timeout, lambda: self.broadcaster.seq, self.in_worker
        )
        self.ram.register_notifier(self.broadcaster)
        self.ram.register_notifier(self.infos)
        #: Blocks attached to VMMs (docs/protocol.md §13).
        self.attachments = Attachments(self.broadcaster.block_event, self.infos.refresh, self.ram)
        self.ram.guards.append(self.attachments.guard)
        self.sessions: set[Session] = set()
        #: What connections and shared blocks may hold of ``RLIMIT_NOFILE``.
        self.fd_budget = FdBudget(nofile_limit())
        #: Subscribers disconnected for falling behind (counted by the transport).
        self.dropped_subscribers = 0
        #: Every command's calls and latencies (counted by :mod:`ramd.api.dispatch`).
        self.command_stats = CommandStats()
        self.started = time.monotonic()
        #: Asks the daemon to shut down as on SIGTERM (``quit``); set by whoever serves this
        #: service. It only schedules the shutdown, which lets the command in flight finish
        #: and its answer be sent first.
        self.request_shutdown: Callable[[], None] | None = None
        self._workers = ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="ramd-worker")
        #: Directory of image files, and its fd once opened (at the first save or load of a
        #: file; see :mod:`ramd.api.snapshots`).
        self.state_dir = state_dir
        self.state_dir_fd = -1
        #: The save and load jobs; created at the first one (it needs the running loop).
        self.jobs: JobManager | None = None

    def _holders_changed(self, block: RAMBlock) -> None:
        """A block's holders changed: its counts and its ``RamBlockInfo``."""
        holders = self.ram.holders.of(block)
        block.mappers = sum(1 for h in holders if h.kind == "mapper")
        block.leases = len(holders) - block.mappers
        block.holder_list = tuple({"kind": h.kind, "pid": h.pid, "uid": h.uid} for h in holders)
        self.infos.refresh(block)

    def fits_used(self, more: int) -> bool:
        """``more`` bytes of blocks or pools still fit ``max-used`` (0: unlimited), which
        bounds the blocks' ``used`` plus the pools' charge."""
        lim = self.limits.max_used
        return not lim or self.ram.used + self.pools.charged + more <= lim

    async def in_worker(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread and return its result on the loop thread.

        The caller must have made the memory ``fn`` touches unchangeable first (an
        uncommitted or pinned block). If the awaiting task is cancelled, ``fn`` still runs to
        its end: this coroutine only returns once the thread is done with the memory.
        """
        fut = asyncio.get_running_loop().run_in_executor(self._workers, fn)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            await asyncio.wait([fut])
            raise

    def close(self) -> None:
        """Free every block (each removal is notified) and pool, and forget the sessions."""
        self.pools.close()
        self.ram.close()
        self.sessions.clear()
        if self.state_dir_fd >= 0:
            os.close(self.state_dir_fd)
            self.state_dir_fd = -1
        self._workers.shutdown(wait=False, cancel_futures=True)


class Session:
    """One client's view of the API: its event subscription and access class.

    ``subscribed`` is the set of event names it receives, or None before ``subscribe`` (a QMP
    session is created subscribed to every event once negotiated). ``readonly`` peers may only
    run ``query-*`` and ``subscribe``/``unsubscribe``, and never see ``host`` addresses.
    ``sink`` is None once the session is closed (its connection is gone). ``dialect`` is the
    wire dialect's name, set by the dialect that takes the session (``jsonrpc`` until then):
    the few commands whose answer differs per dialect (``query-version``) read it.
    """

    def __init__(
        self,
        service: Service,
        sink: EventSink,
        *,
        readonly: bool = False,
        peer: str = "",
        peer_fields: dict[str, object] | None = None,
    ) -> None:
        self.service = service
        self.sink: EventSink | None = sink
        self.readonly = readonly
        self.peer = peer
        self.peer_fields = peer_fields or {}
        pid, uid = self.peer_fields.get("pid"), self.peer_fields.get("uid")
        #: The peer's pid and uid (-1 when unknown: an in-process session).
        self.pid = pid if isinstance(pid, int) else -1
        self.uid = uid if isinstance(uid, int) else -1
        self.subscribed: frozenset[str] | None = None
        self.dialect = "jsonrpc"
        #: Bounds the refusal lines this peer can cause in the log.
        self.refusal_log = LogBudget()
        #: fds passed by the client with ``getfd``, by name (owned by the session).
        self.fds: dict[str, int] = {}
        #: The oldest fd the client sent and nothing claimed yet (set by the connection).
        self.take_received_fd: Callable[[], int | None] = lambda: None
        #: Closes the connection (set by the connection).
        self.closer: Callable[[], None] = lambda: None
        service.sessions.add(self)

    @property
    def holding(self) -> bool:
        """Whether the connection must stay open however long it is silent (docs/protocol.md §11,
        ``idle-timeout``): it subscribed, or it maps a block (a mapper sends nothing while
        it only uses the memory, and closing it would release the memory under it)."""
        return self.subscribed is not None or self.holds_blocks

    def subscribe(self, events: Collection[str] | None) -> frozenset[str]:
        """Receive ``events`` (all when None) from now on."""
        self.subscribed = frozenset(EVENT_NAMES if events is None else events)
        self.service.broadcaster.subscribe(self)
        return self.subscribed

    def unsubscribe(self) -> None:
        self.subscribed = None
        self.service.broadcaster.unsubscribe(self)

    @property
    def holds_blocks(self) -> bool:
        """The session maps or leases a block (see :mod:`ramd.api.holding`)."""
        return self.service.mappers.holds_any(self)

    def deliver(self, event: Event) -> None:
        if self.subscribed is not None and event.name in self.subscribed and self.sink:
            self.sink.send_event(event)

    def deliver_mapped(self, event: Event) -> None:
        if self.sink is not None:
            self.sink.send_event(event)

    def close(self) -> None:
        """Detach from the service and from the sink; no event reaches the sink afterwards.
        The session stops mapping blocks (which counts as acknowledging) and its fds close."""
        self.unsubscribe()
        self.service.mappers.drop(self)
        self.service.sessions.discard(self)
        self.sink = None
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
