"""Events: the typed :class:`Event` and :class:`EventStream`, a bounded ``async for`` source.

An :class:`EventStream` is made by :meth:`ramd_client.AsyncClient.events`; it subscribes on
``async with`` (or on the first ``async for`` step) and then yields every matching event in
the order the daemon sent it, which is ``seq`` order: first, with ``replay``, one
``RAM_BLOCK_ADDED`` (``replay=True``, ``seq`` = the subscription's ``seq``) per block that
existed, then the live events (``seq`` strictly increasing from there).

Two sides, as everywhere in this package:

- the **reader side** (the connection's reader task) offers events to the stream with
  :meth:`EventStream._offer`. It never waits: the event is queued, or, when the consumer has
  fallen ``max_queue`` live events behind, the stream is marked overflowed and stops;
- the **caller side** (the consumer's task) takes them with ``async for`` / ``__anext__``.

Bounds: at most ``max_queue`` live events wait in a stream. The replay is counted apart (it
arrives in one burst before ``subscribe`` answers, before the consumer could read any of it):
at most ``max_replay`` replayed blocks, which the daemon's own ``max-blocks`` limit keeps
small. Past either bound the stream raises :class:`~ramd_client.error.EventOverflow` instead
of growing: the state must then be recovered with :func:`ramd_client.resync`.

How a stream ends: :class:`~ramd_client.error.ConnectionLost` once the events queued before
the loss are consumed; ``StopAsyncIteration`` after :meth:`EventStream.aclose` or after the
client was closed; :class:`~ramd_client.error.EventOverflow` at once on overflow.
"""

from __future__ import annotations

import asyncio
import datetime
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from ramd.api.models import (
    EVENT_MODELS,
    EVENT_NAMES,
    EventName,
    RamBlockAddedData,
    RamBlockAttachedData,
    RamBlockDetachedData,
    RamBlockRemovedData,
    RamBlockResizedData,
)
from ramd_client.error import ConnectionLost, EventOverflow, ProtocolError

if TYPE_CHECKING:
    from types import TracebackType

    from ramd_client.client import AsyncClient

__all__ = ["EVENT_NAMES", "MAX_QUEUE", "MAX_REPLAY", "Event", "EventData", "EventStream"]

#: Default bound of live events waiting in one stream (the daemon's own default per
#: subscriber is the same).
MAX_QUEUE = 1024
#: Default bound of replayed blocks one subscription may bring.
MAX_REPLAY = 65536

EventData = (
    RamBlockAddedData
    | RamBlockResizedData
    | RamBlockRemovedData
    | RamBlockAttachedData
    | RamBlockDetachedData
)


@dataclass(frozen=True, slots=True)
class Event:
    """One event: its ``name``, typed ``data`` (the models of :mod:`ramd.api.models`) and
    the daemon's wall-clock time of emission (``seconds``, ``microseconds``)."""

    name: EventName
    data: EventData
    seconds: int
    microseconds: int

    @property
    def seq(self) -> int:
        """The daemon-wide event counter (a replayed block has the subscription's seq)."""
        return self.data.seq

    @property
    def replay(self) -> bool:
        """True for a ``RAM_BLOCK_ADDED`` replayed at subscription, not a live change."""
        return isinstance(self.data, RamBlockAddedData) and self.data.replay

    @property
    def timestamp(self) -> datetime.datetime:
        """The time of emission, timezone-aware UTC, to the microsecond."""
        epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
        return epoch + datetime.timedelta(seconds=self.seconds, microseconds=self.microseconds)

    @classmethod
    def from_wire(cls, name: str, params: dict[str, Any]) -> Event:
        """Decode an event notification's ``method`` and ``params``.

        Raises :class:`ProtocolError` for an unknown event or malformed data.
        """
        model = EVENT_MODELS.get(name)
        if model is None:
            raise ProtocolError(f"unknown event {name!r}")
        try:
            stamp = params["timestamp"]
            seconds, microseconds = stamp["seconds"], stamp["microseconds"]
            data = model.model_validate(params["data"])
        except (KeyError, TypeError, ValidationError) as e:
            raise ProtocolError(f"malformed event {name}: {e}") from None
        if type(seconds) is not int or type(microseconds) is not int:
            raise ProtocolError(f"malformed event {name}: bad timestamp")
        assert isinstance(data, EventData)
        return cls(_event_name(name), data, seconds, microseconds)

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data, in the QMP shape:
        ``{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}``."""
        return {
            "event": self.name,
            "data": self.data.model_dump(mode="json", by_alias=True),
            "timestamp": {"seconds": self.seconds, "microseconds": self.microseconds},
        }


def _event_name(name: str) -> EventName:
    for known in EVENT_NAMES:
        if known == name:
            return known
    raise ProtocolError(f"unknown event {name!r}")


def check_names(names: Iterable[str] | None) -> frozenset[EventName]:
    """The set of event names asked for (all when None); ValueError for an unknown one."""
    if names is None:
        return frozenset(EVENT_NAMES)
    wanted = set(names)
    unknown = wanted.difference(EVENT_NAMES)
    if unknown:
        raise ValueError(
            f"unknown event name(s) {sorted(unknown)}: expected some of {list(EVENT_NAMES)}"
        )
    return frozenset(n for n in EVENT_NAMES if n in wanted)


_State = Literal["new", "pending", "active", "ended"]


class EventStream:
    """A subscription's events, for one consumer; see the module docstring.

    ``seq`` is the subscription's ``seq`` (the last event emitted before it took effect),
    None until subscribed; ``replayed`` the number of replayed blocks it received. Use it in
    ``async with`` to subscribe before doing anything that would cause events, and to close
    it deterministically::

        async with client.events(["RAM_BLOCK_RESIZED"], replay=False) as events:
            await client.ram_block_resize("ram0", 2 << 30)
            async for event in events:
                ...
    """

    def __init__(
        self,
        client: AsyncClient,
        names: frozenset[EventName],
        replay: bool,
        max_queue: int = MAX_QUEUE,
        max_replay: int = MAX_REPLAY,
    ) -> None:
        if max_queue < 1 or max_replay < 0:
            raise ValueError("max_queue must be positive and max_replay not negative")
        self.names = names
        self.replay = replay
        self.max_queue = max_queue
        self.max_replay = max_replay
        self.seq: int | None = None
        self.replayed = 0
        self._client = client
        self._state: _State = "new"
        self._queue: deque[Event] = deque()
        self._replay_queued = 0
        self._last_seq: int | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._lost: ConnectionLost | None = None
        self._overflow: EventOverflow | None = None

    # -- caller side -----------------------------------------------------------------------

    async def subscribe(self) -> int:
        """Subscribe (once; later calls return at once) and return the subscription's
        ``seq``. Caller side. With ``replay``, the replayed blocks are queued when this
        returns: the next ``replayed`` events are they."""
        if self._state == "new":
            await self._client._open_stream(self)
        if self._state == "ended" and self.seq is None:
            raise ConnectionLost(self._lost.reason if self._lost else "event stream closed")
        assert self.seq is not None
        return self.seq

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        """The next event, waiting for it. Caller side; one consumer at a time."""
        if self._state == "new":
            await self.subscribe()
        while True:
            if self._overflow is not None:
                raise self._overflow
            if self._queue:
                event = self._queue.popleft()
                if event.replay:
                    self._replay_queued -= 1
                return event
            if self._state == "ended":
                if self._lost is not None:
                    raise ConnectionLost(self._lost.reason)
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def aclose(self) -> None:
        """Stop receiving: forget queued events, end the iteration, and unsubscribe when no
        other stream of the client listens. Caller side; idempotent."""
        was_open = self._state in ("pending", "active")
        self._end(None)
        self._queue.clear()
        if was_open:
            await self._client._close_stream(self)

    async def __aenter__(self) -> EventStream:
        await self.subscribe()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- reader side -----------------------------------------------------------------------

    def _pending(self) -> None:
        """The subscribe request is about to be sent: accept its replay from now on."""
        self._state = "pending"

    def _activate(self, seq: int) -> None:
        """``subscribe`` answered (reader side, before any later message): live events
        from now on, every one with a seq above ``seq``."""
        if self._state == "pending":
            self._state = "active"
            self.seq = seq

    def _offer(self, event: Event) -> None:
        """Queue ``event`` if this stream wants it. Reader side: never waits."""
        if self._overflow is not None or event.name not in self.names:
            return
        if self._state == "pending":
            # Before the answer to subscribe: only this subscription's replay is ours; a live
            # event now predates the subscription (its change is in the replayed state).
            if not (event.replay and self.replay):
                return
            if self._replay_queued >= self.max_replay:
                self._overflowed(self.max_replay)
                return
            self._replay_queued += 1
            self.replayed += 1
        elif self._state == "active":
            if event.replay:
                return  # another stream's replay
            if len(self._queue) - self._replay_queued >= self.max_queue:
                self._overflowed(self.max_queue)
                return
        else:
            return
        self._queue.append(event)
        self._last_seq = event.seq
        self._wake()

    def _overflowed(self, limit: int) -> None:
        self._overflow = EventOverflow(limit, self._last_seq)
        self._queue.clear()
        self._replay_queued = 0
        self._wake()

    def _end(self, lost: ConnectionLost | None) -> None:
        """No more events: the connection was ``lost``, or (None) closed on purpose."""
        if self._state != "ended":
            self._state = "ended"
            self._lost = lost
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
