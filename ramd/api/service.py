"""The API-level state of a daemon (:class:`Service`) and of one connection (:class:`Session`).

Ownership and thread: the :class:`Service` owns the ``RAMList`` and the
:class:`~ramd.api.events.Broadcaster`; a :class:`Session` is owned by its connection. Both are
used on the asyncio loop thread only.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from ramd.api.events import Broadcaster, Event, EventSink
from ramd.api.models import EVENT_NAMES
from ramd.config import Limits
from ramd.hostlimits import HostMemory
from ramd.ramblock import RAMList


class Service:
    """Everything the command handlers operate on."""

    def __init__(
        self,
        limits: Limits | None = None,
        ram: RAMList | None = None,
        host: HostMemory | None = None,
    ) -> None:
        self.limits = limits or Limits()
        #: The host's memory bounds, checked before a block is added or grown.
        self.host = host or HostMemory()
        self.ram = ram or RAMList()
        self.broadcaster = Broadcaster()
        self.ram.register_notifier(self.broadcaster)
        self.sessions: set[Session] = set()
        #: Subscribers disconnected for falling behind (counted by the transport).
        self.dropped_subscribers = 0
        self.started = time.monotonic()

    def close(self) -> None:
        """Free every block (each removal is notified) and forget the sessions."""
        self.ram.close()
        self.sessions.clear()


class Session:
    """One client's view of the API: its event subscription and access class.

    ``subscribed`` is the set of event names it receives, or None before ``subscribe`` (a QMP
    session is created subscribed to every event once negotiated). ``readonly`` peers may only
    run ``query-*`` and ``subscribe``/``unsubscribe``.
    """

    def __init__(
        self,
        service: Service,
        sink: EventSink,
        *,
        readonly: bool = False,
        peer: str = "",
    ) -> None:
        self.service = service
        self.sink = sink
        self.readonly = readonly
        self.peer = peer
        self.subscribed: frozenset[str] | None = None
        service.sessions.add(self)

    def subscribe(self, events: Collection[str] | None) -> frozenset[str]:
        """Receive ``events`` (all when None) from now on."""
        self.subscribed = frozenset(EVENT_NAMES if events is None else events)
        self.service.broadcaster.subscribe(self)
        return self.subscribed

    def unsubscribe(self) -> None:
        self.subscribed = None
        self.service.broadcaster.unsubscribe(self)

    def deliver(self, event: Event) -> None:
        if self.subscribed is not None and event.name in self.subscribed:
            self.sink.send_event(event)

    def close(self) -> None:
        """Detach from the service; no event reaches the sink afterwards."""
        self.unsubscribe()
        self.service.sessions.discard(self)
