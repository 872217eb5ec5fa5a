"""Events: the envelope (``seq``, timestamp) and the broadcaster notifier.

Path of an event: ``RAMList`` -> :class:`Broadcaster` (a RAM block notifier) -> each
subscribed :class:`EventSink` (the connection's bounded output). Everything runs on the loop
thread, synchronously inside the command that caused the event, so on one connection the
events caused by a command are queued before that command's response.

``seq`` is daemon-wide, +1 per event from 1, and advances whether or not anyone listens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ramd.api.models import (
    JobStatusChangeData,
    RamBlockAddedData,
    RamBlockRemovedData,
    RamBlockResizedData,
)
from ramd.ramblock import RAMBlock


@dataclass(slots=True)
class Event:
    """One event. ``encoded`` caches the wire form per dialect, so fan-out encodes once."""

    name: str
    data: dict[str, Any]
    seconds: int
    microseconds: int
    encoded: dict[str, bytes] = field(default_factory=dict)

    @property
    def seq(self) -> int:
        return int(self.data["seq"])

    @property
    def stamp(self) -> tuple[int, int]:
        return (self.seconds, self.microseconds)

    @property
    def timestamp(self) -> dict[str, int]:
        return {"seconds": self.seconds, "microseconds": self.microseconds}

    def public_data(self) -> dict[str, Any]:
        """``data`` as read-only peers see it: without the daemon's ``host`` addresses."""
        return {k: v for k, v in self.data.items() if k != "host"}


def make_event(name: str, data: dict[str, Any]) -> Event:
    """An event stamped with the current wall-clock time."""
    now = time.time_ns() // 1000
    return Event(name, data, now // 1_000_000, now % 1_000_000)


class EventSink(Protocol):
    """Where a subscriber's events go (a connection's output). Must not block or raise.

    ``live`` events count against the subscriber's bounded queue (a subscriber that falls
    too far behind is dropped). Replay events are part of the answer to the client's own
    ``subscribe``: the replay awaits :meth:`drained` between slices, so the events it queues
    are bounded like live ones without ever counting the client as slow.
    """

    def send_event(self, event: Event, live: bool = True) -> None: ...

    async def drained(self) -> None:
        """Return once the sink's queued output is below its high-water mark."""
        ...


class Subscriber(Protocol):
    """A session that may want events; filters them itself."""

    def deliver(self, event: Event) -> None: ...

    def deliver_mapped(self, event: Event) -> None:
        """An event of a block this session maps: sent whether subscribed or not."""
        ...


def added_data(block: RAMBlock, seq: int, replay: bool) -> dict[str, Any]:
    """Data of ``RAM_BLOCK_ADDED`` for ``block``."""
    return RamBlockAddedData(
        seq=seq,
        id=block.id,
        host=block.host,
        offset=block.offset,
        size=block.size,
        max_size=block.max_size,
        page_size=block.page_size,
        resizable=block.resizable,
        backend=block.backend,
        replay=replay,
    ).model_dump(by_alias=True)


class Broadcaster:
    """The RAM block notifier that turns block changes into events for subscribers.

    Owns the ``seq`` counter, the count of events emitted per name (``emitted_by_name``: each
    event that advanced ``seq``; replays are answers, not events, and are not counted) and the
    set of subscribers (in subscription order). The
    mappers of a block (``mappers_of``) get every event of that block, subscribed or not; a
    shrink's ``RAM_BLOCK_RESIZED`` and a ``RAM_BLOCK_REMOVED`` carry ``"ack": true`` for them
    (they must acknowledge it; not for a sealed block, whose removal waits for nobody) and
    ``"ack": false`` for everyone else. Loop thread only.
    """

    def __init__(self, mappers_of: Callable[[RAMBlock], Collection[Subscriber]]) -> None:
        self.seq = 0
        self.emitted_by_name: dict[str, int] = {}
        self._subscribers: dict[Subscriber, None] = {}
        self._mappers_of = mappers_of

    @property
    def emitted(self) -> int:
        return self.seq

    def subscribe(self, sub: Subscriber) -> None:
        self._subscribers[sub] = None

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.pop(sub, None)

    def subscribers(self) -> Iterable[Subscriber]:
        return self._subscribers.keys()

    def _emit(self, name: str, data: dict[str, Any], block: RAMBlock, ack: bool = False) -> None:
        event = make_event(name, data)
        mapped = self._mappers_of(block)
        for sub in list(self._subscribers):
            if sub not in mapped:
                sub.deliver(event)
        if mapped:
            to_mappers = Event(name, {**data, "ack": True}, *event.stamp) if ack else event
            for sub in list(mapped):
                sub.deliver_mapped(to_mappers)

    def _next(self, name: str) -> int:
        """The ``seq`` of a new event ``name``, which is counted."""
        self.emitted_by_name[name] = self.emitted_by_name.get(name, 0) + 1
        self.seq += 1
        return self.seq

    def added(self, block: RAMBlock) -> None:
        seq = self._next("RAM_BLOCK_ADDED")
        self._emit("RAM_BLOCK_ADDED", added_data(block, seq, False), block)

    def resized(self, block: RAMBlock, old_size: int, new_size: int) -> None:
        seq = self._next("RAM_BLOCK_RESIZED")
        data = RamBlockResizedData(
            seq=seq,
            id=block.id,
            host=block.host,
            old_size=old_size,
            new_size=new_size,
            max_size=block.max_size,
            ack=False,
        ).model_dump(by_alias=True)
        # a VMM's guest shrank a block it sizes: nothing is released, nothing to acknowledge
        ack = new_size < old_size and block.sized_by is None
        self._emit("RAM_BLOCK_RESIZED", data, block, ack=ack)

    def removed(self, block: RAMBlock) -> None:
        seq = self._next("RAM_BLOCK_REMOVED")
        data = RamBlockRemovedData(
            seq=seq,
            id=block.id,
            host=block.host,
            size=block.size,
            max_size=block.max_size,
            ack=False,
        ).model_dump(by_alias=True)
        # a sealed block is removed without waiting: its mappers keep their mappings
        self._emit("RAM_BLOCK_REMOVED", data, block, ack=not block.sealed)

    def block_event(self, name: str, block: RAMBlock, data: dict[str, Any]) -> None:
        """An event of ``block`` that is no change of its memory (``RAM_BLOCK_ATTACHED``,
        ``RAM_BLOCK_DETACHED``): ``data`` without ``seq``, which is taken here; it reaches
        subscribers and the block's mappers like any event of the block."""
        self._emit(name, {"seq": self._next(name), **data}, block)

    def job_status(self, job_id: str, status: str) -> None:
        """``JOB_STATUS_CHANGE``: to subscribers only (a job is no block: no mapper gets it)."""
        seq = self._next("JOB_STATUS_CHANGE")
        data = JobStatusChangeData.model_validate({"seq": seq, "id": job_id, "status": status})
        event = make_event("JOB_STATUS_CHANGE", data.model_dump(by_alias=True))
        for sub in list(self._subscribers):
            sub.deliver(event)
