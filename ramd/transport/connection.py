"""One client connection: split input, one reader task, bounded output.

Ownership and thread: a :class:`Connection` is created by the listener for each accepted
socket, owns its transport, splitter, dialect and session, and lives on the loop thread.

Flow: the transport reads into one reusable buffer per connection (``BufferedProtocol``: no
allocation or ``mmap`` per read); ``buffer_updated`` splits the bytes into JSON texts and
queues them. Reading pauses when ``INBOX_MAX`` messages or ``INBOX_BYTES`` wait, so a
connection holds about two messages' worth of input at most. Messages are answered one at a
time, in order: inline in the protocol callback while the reader task is parked with nothing
in flight (the common case: no task switch per request), otherwise by the reader task, which
also awaits answers that must wait and waits whenever the output is paused, so a client that
does not read its answers stops being read.
Events go through the same ordered output; while it is paused they are queued, and a
subscriber with more than ``subscriber-queue`` events waiting is disconnected (logged).
Closing never cancels the command in flight: the reader finishes it, then exits.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

from ramd.api.events import Event
from ramd.api.service import Session
from ramd.transport.dialect import Dialect, Reply
from ramd.transport.peer import peer_credentials
from ramd.transport.splitter import JsonSplitter, SplitError

if TYPE_CHECKING:
    from ramd.transport.server import Server

log = logging.getLogger("ramd.connection")

#: Complete messages queued before the connection stops reading from its socket.
INBOX_MAX = 64
#: Bytes of complete messages queued before the connection stops reading.
INBOX_BYTES = 1024 * 1024
#: Bytes in the transport's buffer above which the output counts as paused.
WRITE_HIGH_WATER = 256 * 1024
#: Size of the reusable read buffer of each connection.
READ_BUFFER = 16 * 1024

DialectFactory = Callable[[Session], Dialect]


class Connection(asyncio.BufferedProtocol):
    """A client connection speaking one dialect."""

    def __init__(self, server: Server, dialect_factory: DialectFactory) -> None:
        self.server = server
        self._factory = dialect_factory
        limits = server.service.limits
        self._splitter = JsonSplitter(limits.max_message_size, limits.max_depth)
        self._queue_limit = limits.subscriber_queue
        self._inbox: deque[bytes | SplitError] = deque()
        self._inbox_bytes = 0
        self._out: deque[tuple[bytes, bool]] = deque()
        self._queued_events = 0
        self._write_paused = False
        self._read_paused = False
        self._eof = False
        #: The reader task waits for input with nothing in flight: input is answered inline.
        self._parked = False
        #: An answer that must wait, handed from the inline path to the reader task.
        self._deferred: Awaitable[Reply] | None = None
        self.closed = False
        self._wakeup: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._read_buffer = memoryview(bytearray(READ_BUFFER))
        self._loop = asyncio.get_running_loop()
        self.task: asyncio.Task[None] | None = None
        self.dialect: Dialect | None = None
        self.peer = ""
        self.fields: dict[str, object] = {}

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        cred = peer_credentials(t.get_extra_info("socket"))
        self.peer = str(cred)
        self.fields = {"pid": cred.pid, "uid": cred.uid, "gid": cred.gid}
        access, refusal = self.server.admit(self, cred)
        session = Session(self.server.service, self, readonly=access == "readonly", peer=self.peer)
        self.dialect = self._factory(session)
        self.fields["dialect"] = self.dialect.name
        if refusal is not None:
            log.warning(
                "refused connection %s: %s",
                self.peer,
                refusal,
                extra={"fields": {**self.fields, "event": "refused", "reason": refusal}},
            )
            t.write(self.dialect.refusal(refusal))
            self._finish()
            return
        log.info(
            "accepted connection %s (%s, %s)",
            self.peer,
            self.dialect.name,
            access,
            extra={"fields": {**self.fields, "event": "accepted", "access": access}},
        )
        if hello := self.dialect.greeting():
            t.write(hello)
        self.task = self._loop.create_task(self._run())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed or self.task is None:
            return
        for item in self._splitter.feed(bytes(self._read_buffer[:nbytes])):
            self._inbox.append(item)
            self._inbox_bytes += len(item) if isinstance(item, bytes) else 0
        if self._inbox_full() and not self._read_paused:
            self._read_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        if self._parked:
            self._answer_inline()
        if self._inbox or self._deferred is not None:
            self.wake()

    def eof_received(self) -> bool:
        self._eof = True
        self.wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.dialect is not None:
            self.dialect.session.close()
        self._inbox.clear()
        self._inbox_bytes = 0
        self._out.clear()
        self.wake()
        self.server.forget(self)
        log.info(
            "closed connection %s", self.peer, extra={"fields": {**self.fields, "event": "closed"}}
        )

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        t = self._transport
        while self._out and not self._write_paused and t is not None:
            data, is_event = self._out.popleft()
            self._queued_events -= is_event
            t.write(data)
        self.wake()

    # -- output ----------------------------------------------------------------------------

    def send(self, data: bytes, is_event: bool = False) -> None:
        """Write ``data`` after everything queued before it."""
        if self.closed or self._transport is None:
            return
        if self._write_paused or self._out:
            self._out.append((data, is_event))
            self._queued_events += is_event
        else:
            self._transport.write(data)

    def send_event(self, event: Event, live: bool = True) -> None:
        """Queue an event; disconnect this subscriber if its queue of live events is full.
        Never blocks. Replay events (``live=False``) are queued like a response."""
        if self.closed or self.dialect is None:
            return
        wire = self.dialect.encode_event(event)
        if wire is None:
            return
        backed_up = self._write_paused or self._out
        if live and backed_up and self._queued_events >= self._queue_limit:
            self._drop_slow_subscriber()
            return
        self.send(wire, live)

    def _drop_slow_subscriber(self) -> None:
        log.warning(
            "disconnecting slow subscriber %s: %d events queued (subscriber-queue)",
            self.peer,
            self._queued_events,
            extra={"fields": {**self.fields, "event": "slow-subscriber"}},
        )
        self.server.service.dropped_subscribers += 1
        self.closed = True
        if self.dialect is not None:
            self.dialect.session.close()
        assert self._transport is not None
        self._transport.abort()

    # -- reader task -----------------------------------------------------------------------

    def _inbox_full(self) -> bool:
        return len(self._inbox) >= INBOX_MAX or self._inbox_bytes > INBOX_BYTES

    def wake(self) -> None:
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        self._wakeup = self._loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    def _take(self) -> bytes | SplitError:
        """The next queued message; reading resumes once the queue has room again."""
        item = self._inbox.popleft()
        self._inbox_bytes -= len(item) if isinstance(item, bytes) else 0
        if self._read_paused and not self._inbox_full():
            self._read_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        return item

    def _answer(self, item: bytes | SplitError) -> Reply | Awaitable[Reply]:
        assert self.dialect is not None
        if isinstance(item, SplitError):
            return self.dialect.split_error(item)
        return self.dialect.handle(item)

    def _answer_inline(self) -> None:
        """Answer queued messages right here, in the protocol callback, while the reader task
        is parked with nothing in flight (so order is kept and no task switch is paid per
        request). Stops at an answer that must wait (handed to the reader task), when the
        output backs up, or when the connection or the server is closing."""
        try:
            while self._inbox and not (
                self._write_paused or self._out or self.closed or self.server.stopping
            ):
                answer = self._answer(self._take())
                if inspect.isawaitable(answer):
                    self._deferred = answer
                    return
                if answer:
                    self.send(answer)
        except Exception:
            log.exception("connection %s failed", self.peer)
            self._finish()

    async def _run(self) -> None:
        """Answer queued messages in order until the connection ends or the server stops.

        While it waits for input the task is *parked*: new input is then answered inline by
        :meth:`_answer_inline`, and the task only wakes for answers that must wait, for a
        backed-up output, for end of input, or to stop.
        """
        try:
            while not self.closed and not self.server.stopping:
                reply: bytes | None
                if self._deferred is not None:
                    pending, self._deferred = self._deferred, None
                    reply = await pending
                elif self._inbox:
                    answer = self._answer(self._take())
                    reply = await answer if inspect.isawaitable(answer) else answer
                elif self._eof:
                    break
                else:
                    self._parked = True
                    try:
                        await self._wait()
                    finally:
                        self._parked = False
                    continue
                if reply:
                    self.send(reply)
                while (self._write_paused or self._out) and not self.closed:
                    await self._wait()
        except Exception:
            log.exception("connection %s failed", self.peer)
        finally:
            self._finish()

    def _finish(self) -> None:
        """Close after the queued output is written (the transport flushes on close)."""
        if self._transport is not None and not self._transport.is_closing():
            for data, _ in self._out:
                self._transport.write(data)
            self._out.clear()
            self._transport.close()

    def close(self) -> None:
        """Close now (server shutdown); a command in flight still completes."""
        self._finish()
