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

A connection that receives a bulk answer (over ``BULK_ANSWER``) gets a larger kernel send
buffer (``BULK_SEND_BUFFER``), so it can hold about one more answer in the kernel.

File descriptors (``SCM_RIGHTS``) travel with the first byte of the message they belong to.
asyncio's transports cannot send them, so that byte goes out with ``sendmsg`` on the raw
socket (``send_fds``), which is only correct once everything handed to the transport before
it has left: such a message waits until the transport's buffer is empty (its high-water mark
is lowered to 0 meanwhile, so asyncio says when). The output owns queued fds: they are
closed once sent, or when the output closes.

Ownership and thread: owned by its connection; loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence

#: Bytes in the transport's buffer above which the output counts as backed up.
WRITE_HIGH_WATER = 256 * 1024
#: An answer larger than this (a bulk read) raises the socket's send buffer to
#: ``BULK_SEND_BUFFER`` (the kernel caps it at ``net.core.wmem_max``), so that the answer goes
#: to the kernel in a few writes and the client reads it without waiting for the daemon.
BULK_ANSWER = 1024 * 1024
BULK_SEND_BUFFER = 4 * 1024 * 1024
#: Seconds between tries when the socket itself is full as an fd is to be sent.
FD_RETRY = 0.005


class Output:
    """The output side of one connection (see the module docstring)."""

    __slots__ = (
        "_bulk",
        "_closed",
        "_events",
        "_limit",
        "_on_slow",
        "_paused",
        "_queue",
        "_send_fds",
        "_t",
        "_waiters",
        "bytes_out",
    )

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        queue_limit: int,
        on_slow: Callable[[], None],
        send_fds: Callable[[bytes, Sequence[int]], None],
    ) -> None:
        self._t = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._limit = queue_limit
        self._on_slow = on_slow
        self._send_fds = send_fds
        self._queue: deque[tuple[bytes, bool, Sequence[int]]] = deque()
        self._events = 0  # live events in the queue
        self._paused = False
        self._closed = False
        self._waiters: list[asyncio.Future[None]] = []
        #: Bytes of answers handed over so far (events not counted).
        self.bytes_out = 0
        self._bulk = False

    @property
    def backed_up(self) -> bool:
        """The client is not keeping up: the transport is paused or data is queued here."""
        return self._paused or bool(self._queue)

    def write(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` after everything handed over before it; ``fds`` (owned by the
        output from now on) go with its first byte."""
        self.bytes_out += len(data)
        if len(data) > BULK_ANSWER and not self._bulk:
            self._bulk = True
            sock = self._t.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BULK_SEND_BUFFER)
        if self._closed:
            close_fds(fds)
            return
        if self._paused or self._queue:
            self._queue.append((data, False, fds))
        elif fds:
            self._queue.append((data, False, fds))
            self._flush()
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
            self._queue.append((data, live, ()))
            self._events += live

    def pause(self) -> None:
        """The transport's buffer is above its high-water mark."""
        self._paused = True

    def resume(self) -> None:
        """The transport's buffer drained: hand it queued data until it fills up again."""
        self._paused = False
        self._t.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._flush()

    def _flush(self) -> None:
        while self._queue and not self._paused and not self._closed:
            data, live, fds = self._queue[0]
            if fds:
                if self._t.get_write_buffer_size():
                    # pause_writing now, resume_writing once the buffer is empty
                    self._t.set_write_buffer_limits(high=0, low=0)
                    return
                try:
                    self._send_fds(data[:1], fds)
                except (BlockingIOError, InterruptedError):
                    asyncio.get_running_loop().call_later(FD_RETRY, self._retry)
                    self._paused = True
                    return
                except OSError:
                    self.close()  # the peer is gone: the transport reports it
                    return
                close_fds(fds)
                self._queue.popleft()
                if len(data) > 1:
                    self._t.write(data[1:])
                continue
            self._queue.popleft()
            self._events -= live
            self._t.write(data)
        if not self.backed_up:
            self._wake()

    def _retry(self) -> None:
        if not self._closed:
            self._paused = False
            self._flush()

    async def drained(self) -> None:
        """Return once nothing is queued here and the transport accepts data (or closed)."""
        while self.backed_up and not self._closed:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            await fut

    def flush(self) -> None:
        """Hand everything queued to the transport (which writes it before closing); a
        message that carries fds, and everything after it, is dropped."""
        while self._queue and not self._queue[0][2]:
            self._t.write(self._queue.popleft()[0])
        self.close()

    def close(self) -> None:
        """Drop what is queued (closing its fds) and wake every waiter; nothing is sent
        afterwards."""
        self._closed = True
        for _, _, fds in self._queue:
            close_fds(fds)
        self._queue.clear()
        self._events = 0
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


def close_fds(fds: Sequence[int]) -> None:
    """Close fds that will not be sent."""
    for fd in fds:
        os.close(fd)
