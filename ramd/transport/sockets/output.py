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

fds in flight (docs/protocol.md §11, :mod:`ramd.transport.sockets.fdflight`): a message with
fds also waits until the peer read the previous one (``unread``, the socket's ``TIOCOUTQ``, is
0: the peer read everything sent before; asked every ``FD_RETRY`` to ``FD_RETRY_MAX`` seconds,
as nothing signals it), and goes only if the server's
:class:`~ramd.transport.sockets.fdflight.FdFlight` admits it. When it cannot go (refused there,
or ``sendmsg`` fails for any reason but the peer being gone), its fds are closed, the failure
is logged and the message is replaced by the answer
``failed(reason)`` gives (its requests fail); the connection goes on.

Ownership and thread: owned by its connection; loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Sequence

from ramd.logs import LogBudget
from ramd.transport.sockets.fdflight import FdFlight

log = logging.getLogger("ramd.connection")

#: Bytes in the transport's buffer above which the output counts as backed up.
WRITE_HIGH_WATER = 256 * 1024
#: An answer larger than this (a bulk read) raises the socket's send buffer to
#: ``BULK_SEND_BUFFER`` (the kernel caps it at ``net.core.wmem_max``), so that the answer goes
#: to the kernel in a few writes and the client reads it without waiting for the daemon.
BULK_ANSWER = 1024 * 1024
BULK_SEND_BUFFER = 4 * 1024 * 1024
#: Seconds between tries when the socket itself is full as an fd is to be sent, or the peer
#: has not read the previous fd yet (doubled at each try, up to ``FD_RETRY_MAX``).
FD_RETRY = 0.005
FD_RETRY_MAX = 0.25
#: The most fds one ``sendmsg`` can carry (Linux's ``SCM_MAX_FD``).
SCM_MAX_FD = 253
#: ``sendmsg`` errors that mean the peer is gone (the transport reports it).
PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF})

#: The answer to send instead of a message whose fds could not go, given why.
Failed = Callable[[str], bytes | None]
#: One queued message: its bytes, whether it is a live event, its fds, its replacement.
_Item = tuple[bytes, bool, Sequence[int], Failed | None]


class Output:
    """The output side of one connection (see the module docstring)."""

    __slots__ = (
        "_bulk",
        "_closed",
        "_delay",
        "_events",
        "_flight",
        "_in_flight",
        "_limit",
        "_log",
        "_on_slow",
        "_paused",
        "_peer",
        "_queue",
        "_send_fds",
        "_t",
        "_timer",
        "_unread",
        "_waiters",
        "bytes_out",
    )

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        queue_limit: int,
        on_slow: Callable[[], None],
        send_fds: Callable[[bytes, Sequence[int]], None],
        unread: Callable[[], int],
        flight: FdFlight,
        peer: str = "",
    ) -> None:
        self._t = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self._limit = queue_limit
        self._on_slow = on_slow
        self._send_fds = send_fds
        self._unread = unread
        self._flight = flight
        self._peer = peer
        self._in_flight = False  # fds were sent that the peer may not have read yet
        self._delay = FD_RETRY
        self._timer: asyncio.TimerHandle | None = None
        self._log = LogBudget()
        self._queue: deque[_Item] = deque()
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

    def write(self, data: bytes, fds: Sequence[int] = (), failed: Failed | None = None) -> None:
        """Send ``data`` after everything handed over before it; ``fds`` (owned by the
        output from now on) go with its first byte, or, if they cannot, ``failed(reason)``
        is sent instead (nothing when it is None or gives None)."""
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
            self._queue.append((data, False, fds, failed))
        elif fds:
            self._queue.append((data, False, fds, failed))
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
            self._queue.append((data, live, (), None))
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
            data, live, fds, failed = self._queue[0]
            if fds:
                if self._t.get_write_buffer_size():
                    # pause_writing now, resume_writing once the buffer is empty
                    self._t.set_write_buffer_limits(high=0, low=0)
                    return
                if self._in_flight and not self.peer_read_all():
                    self._retry_later()  # the peer has not read the previous fds yet
                    return
                refusal = self._flight.refusal(len(fds))
                if refusal is None:
                    try:
                        self._send_fds(data[:1], fds)
                    except (BlockingIOError, InterruptedError):
                        self._retry_later()
                        return
                    except OSError as e:
                        if e.errno in PEER_GONE:
                            self.close()  # the transport reports it
                            return
                        refusal = f"Cannot pass the file descriptor: {e.strerror}"
                    else:
                        self._flight.sent(self, len(fds))
                        self._in_flight = True
                        self._delay = FD_RETRY
                close_fds(fds)
                self._queue.popleft()
                if refusal is None:
                    data = data[1:]
                else:
                    self._fds_failed(refusal, len(fds))
                    data = (failed(refusal) if failed is not None else None) or b""
                if data:
                    self._t.write(data)
                continue
            self._queue.popleft()
            self._events -= live
            self._t.write(data)
        if not self.backed_up:
            self._wake()

    def peer_read_all(self) -> bool:
        """Whether the peer read everything sent so far (so, every fd); once it did, its
        fds are no longer in flight (see :class:`~ramd.transport.sockets.fdflight.FdFlight`)."""
        try:
            unread = self._unread()
        except OSError:
            unread = 0  # the socket is gone: so are the fds in it
        if unread:
            return False
        self._in_flight = False
        self._flight.read(self)
        return True

    def _fds_failed(self, reason: str, count: int) -> None:
        if self._log.allow():
            log.warning(
                "connection %s: %d fd(s) not sent, the request fails: %s%s",
                self._peer,
                count,
                reason,
                self._log.suppressed_note(),
                extra={"fields": {"event": "fd-not-sent", "reason": reason}},
            )

    def _retry_later(self) -> None:
        self._paused = True
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._retry)
            self._delay = min(FD_RETRY_MAX, self._delay * 2)

    def _retry(self) -> None:
        self._timer = None
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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, _, fds, _ in self._queue:
            close_fds(fds)
        self._queue.clear()
        self._events = 0
        self._flight.read(self)  # if its peer never reads them, they are not ours to count
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
