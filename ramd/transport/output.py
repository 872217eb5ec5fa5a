"""One connection's ordered, bounded output, and the slow-subscriber policy.

Everything a connection sends (greeting, answers, replayed and live events) goes through one
:class:`Output`, in the order it was handed over. While the transport's buffer is above its
high-water mark (asyncio calls :meth:`pause`), data waits in a queue here instead. What can
sit in that queue is bounded:

- answers: the request pipeline runs nothing while the output is backed up
  (:attr:`backed_up`), so at most one answer (at most ``max-message-size``) waits;
- replay events: a replay awaits :meth:`drained` after each slice;
- live events: when ``subscriber-queue`` of them wait, the subscriber is too slow and is
  disconnected (``on_slow``), so nobody else waits for it and the daemon's memory stays bounded.

Ownership and thread: owned by its connection; loop thread only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Output:
    """The output side of one connection (see the module docstring)."""

    __slots__ = ("_closed", "_events", "_limit", "_on_slow", "_paused", "_queue", "_t", "_waiters")

    def __init__(
        self, transport: asyncio.WriteTransport, queue_limit: int, on_slow: Callable[[], None]
    ) -> None:
        self._t = transport
        self._limit = queue_limit
        self._on_slow = on_slow
        self._queue: deque[tuple[bytes, bool]] = deque()
        self._events = 0  # live events in the queue
        self._paused = False
        self._closed = False
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def backed_up(self) -> bool:
        """The client is not keeping up: the transport is paused or data is queued here."""
        return self._paused or bool(self._queue)

    def write(self, data: bytes) -> None:
        """Send ``data`` after everything handed over before it."""
        if self._closed:
            return
        if self._paused or self._queue:
            self._queue.append((data, False))
        else:
            self._t.write(data)

    def event(self, data: bytes, live: bool) -> None:
        """Send an event; a live one finding ``subscriber-queue`` live events still queued
        disconnects the subscriber instead."""
        if self._closed:
            return
        if not (self._paused or self._queue):
            self._t.write(data)
        elif live and self._events >= self._limit:
            self._on_slow()
        else:
            self._queue.append((data, live))
            self._events += live

    def pause(self) -> None:
        """The transport's buffer is above its high-water mark."""
        self._paused = True

    def resume(self) -> None:
        """The transport's buffer drained: hand it queued data until it fills up again."""
        self._paused = False
        while self._queue and not self._paused and not self._closed:
            data, live = self._queue.popleft()
            self._events -= live
            self._t.write(data)
        if not self.backed_up:
            self._wake()

    async def drained(self) -> None:
        """Return once nothing is queued here and the transport accepts data (or closed)."""
        while self.backed_up and not self._closed:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    def flush(self) -> None:
        """Hand everything queued to the transport (which writes it before closing)."""
        while self._queue:
            self._t.write(self._queue.popleft()[0])
        self._events = 0

    def close(self) -> None:
        """Drop what is queued and wake every waiter; nothing is sent afterwards."""
        self._closed = True
        self._queue.clear()
        self._events = 0
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
