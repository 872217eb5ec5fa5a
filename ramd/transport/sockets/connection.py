"""One client connection: the I/O around its request pipeline.

Ownership and thread: a :class:`Connection` is created by the listener for each accepted
socket, owns its transport, splitter, :class:`~ramd.transport.sockets.output.Output`,
:class:`~ramd.transport.sockets.pipeline.Pipeline`, dialect and session, and lives on the loop
thread.

Reading: asyncio's transports cannot receive file descriptors (``SCM_RIGHTS``, QEMU's
``getfd``), so the transport's own reading is paused for good and the connection reads with
``recvmsg_into`` on a duplicate of the socket, registered with the loop's ``add_reader``
(both event loops support it), into the server's one read buffer (see :func:`read_buffer`;
each read is copied out before the callback returns). The fds of a read go to the pipeline
with the messages of that read (:meth:`~ramd.transport.sockets.pipeline.Pipeline.push_fds`): only a
``getfd`` among them keeps one, the others are closed once those messages are answered; the
kernel closes those beyond ``MAX_RECEIVED_FDS`` (no room for them in the ancillary buffer).
Writing stays with the transport (:class:`~ramd.transport.sockets.output.Output`).

Flow: each read is split into JSON texts queued in the pipeline; reading pauses while the
pipeline is full. While the connection's task is parked (nothing in
progress), the callback runs the pipeline inline for one budget; otherwise, or when the
budget is spent, the task carries on: it settles pending outcomes, waits while the output is
backed up (a client that does not read its answers stops being read) and yields between
budgets.

Refused connections get their refusal, then a half-close, and are read (and the input
dropped) until the peer closes or ``REFUSAL_LINGER`` passes: closing at once would reset a
peer that already sent a request, and it would see EPIPE instead of the refusal.

Idle connections (no request for ``idle-timeout``, neither subscribed nor mapping a block)
are closed.
Closing never cancels the command in flight: the task settles it, then exits. A closed
connection drops its buffers and its session at once (no reference cycle keeps them).
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import mmap
import os
import socket
import termios
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from ramd.api.events import Event
from ramd.api.service import Session
from ramd.process import heap
from ramd.transport.protocol.dialect import Dialect
from ramd.transport.protocol.splitter import JsonSplitter
from ramd.transport.sockets.output import Output, close_fds
from ramd.transport.sockets.peer import peer_credentials
from ramd.transport.sockets.pipeline import MAX_RECEIVED_FDS, Pipeline, State

if TYPE_CHECKING:
    from ramd.transport.sockets.server import Server

DialectFactory = Callable[[Session], Dialect]

log = logging.getLogger("ramd.connection")

#: Size of the read buffer all connections of a server share: a read takes up to this much
#: (a few reads per bulk message of megabytes, not hundreds).
READ_BUFFER = 256 * 1024
#: A connection that received or answered more bytes than this hands the heap's free pages
#: back to the kernel when it closes (see :mod:`ramd.process.heap`).
TRIM_AFTER = 1024 * 1024
#: Seconds a refused connection is kept half-closed so that the peer reads its refusal.
REFUSAL_LINGER = 2.0
_ANCILLARY = socket.CMSG_SPACE(MAX_RECEIVED_FDS * array.array("i").itemsize)


def read_buffer() -> memoryview:
    """A read buffer for the connections of one server (one event loop: the loop thread
    reads one socket at a time and copies the bytes out at once). Anonymous memory, so only
    the pages reads have reached count in the daemon's RSS."""
    return memoryview(mmap.mmap(-1, READ_BUFFER))


class Connection(asyncio.Protocol):
    """A client connection speaking one dialect."""

    def __init__(self, server: Server, dialect_factory: DialectFactory) -> None:
        self.server = server
        self._factory = dialect_factory
        limits = server.service.limits
        self._splitter: JsonSplitter | None = JsonSplitter(
            limits.max_message_size, limits.max_depth
        )
        self._read_paused = False
        self._sock: socket.socket | None = None
        self._eof = False
        self._parked = False
        self._refused = False
        self.closed = False
        self._wakeup: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._last_request = time.monotonic()
        self._bytes_in = 0
        self.task: asyncio.Task[None] | None = None
        self.dialect: Dialect | None = None
        self.output: Output | None = None
        self.pipeline: Pipeline | None = None
        self.peer = ""
        self.uid = -1
        self.fields: dict[str, object] = {}

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = t = cast(asyncio.Transport, transport)
        raw = t.get_extra_info("socket")
        t.pause_reading()
        self._loop.call_soon(_keep_paused, t)
        try:
            self._sock = socket.socket(fileno=os.dup(raw.fileno()))
        except OSError as e:  # EMFILE: the fd budget should have kept room; never per peer
            self.server.resource_error("cannot take a connection", e)
            t.abort()
            return
        self._sock.setblocking(False)
        self._loop.add_reader(self._sock.fileno(), self._readable)
        cred = peer_credentials(raw)
        self.uid = cred.uid
        self.peer = str(cred)
        self.fields = {"pid": cred.pid, "uid": cred.uid, "gid": cred.gid}
        access, refusal = self.server.admit(self, cred)
        session = Session(
            self.server.service,
            self,
            readonly=access == "readonly",
            peer=self.peer,
            peer_fields=dict(self.fields),
        )
        session.take_received_fd = self._take_received_fd
        session.closer = self._finish
        self.dialect = dialect = self._factory(session)
        self.fields["dialect"] = dialect.name
        limits = self.server.service.limits
        self.output = Output(
            t,
            limits.subscriber_queue,
            self._drop_slow,
            self._send_fds,
            self._unread,
            self.server.fd_flight,
            self.peer,
        )
        if refusal is not None:
            self._refuse(refusal)
            return
        log.debug(
            "accepted connection %s (%s, %s)",
            self.peer,
            dialect.name,
            access,
            extra={"fields": {**self.fields, "event": "accepted", "access": access}},
        )
        self.pipeline = Pipeline(dialect, self.output)
        if hello := dialect.greeting():
            self.output.write(hello)
        self.task = self._loop.create_task(self._run())
        self._arm_idle_timer(self.server.service.limits.idle_timeout)

    def _readable(self) -> None:
        """One read from the socket (the loop's reader callback)."""
        sock = self._sock
        if sock is None:
            return
        try:
            buffer = self.server.read_buffer
            nbytes, ancillary, _flags, _ = sock.recvmsg_into([buffer], _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(data[: len(data) - len(data) % got.itemsize])
                fds += got
        if nbytes == 0:
            close_fds(fds)
            self._stop_reading()
            self._eof_received()
            return
        try:
            data = bytes(buffer[:nbytes])
        except MemoryError:  # the read is lost: the stream cannot be followed any more
            close_fds(fds)
            self._out_of_memory("reading its input")
            return
        self._received(data, fds)

    def _take_received_fd(self) -> int | None:
        """The first fd offered to the message in progress (by ``getfd``), now the caller's."""
        return self.pipeline.take_fd() if self.pipeline is not None else None

    def _send_fds(self, first: bytes, fds: Sequence[int]) -> None:
        """Send ``first`` with ``fds`` attached (the output calls this when nothing else is
        waiting to be written)."""
        assert self._sock is not None
        rights = array.array("i", fds).tobytes()
        self._sock.sendmsg([first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])

    def _unread(self) -> int:
        """Bytes sent that the peer has not read yet (``TIOCOUTQ``, i.e. ``SIOCOUTQ``: on a
        Unix stream socket, what is still queued at the peer counts until it is read)."""
        if self._sock is None:
            return 0
        count = array.array("i", [0])
        fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, count)
        return count[0]

    def _stop_reading(self) -> None:
        if self._sock is not None and not self._read_paused:
            self._loop.remove_reader(self._sock.fileno())
        self._read_paused = True

    def _lost(self) -> None:
        """The socket failed: abort (the transport then calls :meth:`connection_lost`)."""
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        """Input the transport read before its reading was paused (uvloop may read once
        right after ``connection_made``): the same path as our own reads, in stream order."""
        self._received(data)

    def _received(self, data: bytes, fds: list[int] | None = None) -> None:
        """One read's bytes, and the fds that came with them (now owned here)."""
        pipeline, splitter = self.pipeline, self._splitter
        if self.closed or pipeline is None or splitter is None:
            close_fds(fds or ())
            return  # refused (input dropped) or closing
        self._last_request = time.monotonic()
        self._bytes_in += len(data)
        try:
            items = splitter.feed(data)
        except MemoryError:  # the splitter reports what it cannot store: a last resort
            close_fds(fds or ())
            self._out_of_memory("splitting its input")
            return
        for item in items:
            pipeline.push(item)
        if fds:
            pipeline.push_fds(fds, len(items), splitter.in_message)
        if pipeline.full:
            self._stop_reading()
        if self._parked and not self.server.stopping:
            try:
                state = pipeline.run()
            except Exception:
                log.exception("connection %s failed", self.peer)
                self._finish()
                return
            if state is State.IDLE:
                self._resume_reading()
                return
        self.wake()

    def _out_of_memory(self, doing: str) -> None:
        """Input was lost for lack of memory: say so to the peer, then close."""
        log.warning("connection %s: out of memory %s", self.peer, doing)
        if self.output is not None and self.dialect is not None:
            self.output.write(self.dialect.no_memory())
        self._finish()

    def _eof_received(self) -> None:
        self._eof = True
        self.wake()
        if self._refused and self._transport is not None:
            self._transport.close()  # the peer read its refusal

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_reading()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.dialect is not None:
            self.dialect.session.close()
        moved = self._bytes_in
        if self.output is not None:
            moved += self.output.bytes_out
            self.output.close()
        if self.pipeline is not None:
            self.pipeline.clear()
        self._splitter = None
        if moved > TRIM_AFTER:
            heap.trim()
        self.wake()
        self.server.forget(self)
        if not self._refused:
            log.debug(
                "closed connection %s",
                self.peer,
                extra={"fields": {**self.fields, "event": "closed"}},
            )

    def pause_writing(self) -> None:
        if self.output is not None:
            self.output.pause()

    def resume_writing(self) -> None:
        if self.output is not None:
            self.output.resume()
        self.wake()

    # -- events (EventSink of the session) ----------------------------------------------

    def send_event(self, event: Event, live: bool = True) -> None:
        """Queue an event; a too slow subscriber is disconnected. Never blocks."""
        if self.closed or self.dialect is None or self.output is None:
            return
        wire = self.dialect.encode_event(event)
        if wire is not None:
            self.output.event(wire, live)

    async def drained(self) -> None:
        if self.output is not None:
            await self.output.drained()

    def _drop_slow(self) -> None:
        log.warning(
            "disconnecting slow subscriber %s: %d events queued (subscriber-queue)",
            self.peer,
            self.server.service.limits.subscriber_queue,
            extra={"fields": {**self.fields, "event": "slow-subscriber"}},
        )
        self.server.service.dropped_subscribers += 1
        self._abort()

    @property
    def backed_up(self) -> bool:
        """Output waits for the peer to read it."""
        return not self.closed and self.output is not None and self.output.backed_up

    def drop_unread(self) -> None:
        """Shutdown: the peer reads nothing, so the connection is dropped now; what was
        queued for it is discarded (see :meth:`Server.shutdown`)."""
        log.warning(
            "dropping connection %s at shutdown: its peer reads nothing",
            self.peer,
            extra={"fields": {**self.fields, "event": "unread-at-stop"}},
        )
        self._abort()

    def _abort(self) -> None:
        """Close at once, discarding queued output (``connection_lost`` follows)."""
        self.closed = True
        if self.dialect is not None:
            self.dialect.session.close()
        assert self._transport is not None
        self._transport.abort()

    # -- refusal and idleness --------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        assert self.dialect is not None and self._transport is not None
        self._refused = True
        self.server.refusal(self, reason)
        t = self._transport
        t.write(self.dialect.refusal(reason))
        self.dialect.session.close()
        if not self.server.linger(self) or not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        self._timer = self._loop.call_later(REFUSAL_LINGER, t.close)

    def _arm_idle_timer(self, delay: float) -> None:
        if delay > 0:
            self._timer = self._loop.call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        """Close the connection if it sent nothing for ``idle-timeout`` and neither
        receives events nor maps a block (:attr:`Session.holding`); otherwise look again
        when it could next become idle."""
        self._timer = None
        timeout = self.server.service.limits.idle_timeout
        if self.closed or self.dialect is None or timeout <= 0:
            return
        idle = time.monotonic() - self._last_request
        if self.dialect.session.holding or (self.pipeline is not None and self.pipeline.busy):
            self._arm_idle_timer(timeout)
        elif idle >= timeout:
            log.info(
                "closing idle connection %s after %.0f s",
                self.peer,
                idle,
                extra={"fields": {**self.fields, "event": "idle"}},
            )
            self._finish()
        else:
            self._arm_idle_timer(timeout - idle)

    # -- the connection's task -------------------------------------------------------------

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

    def _resume_reading(self) -> None:
        if (
            self._read_paused
            and not self._eof
            and self._sock is not None
            and self.pipeline is not None
            and not self.pipeline.full
        ):
            self._read_paused = False
            self._loop.add_reader(self._sock.fileno(), self._readable)

    async def _run(self) -> None:
        """Drive the pipeline until the connection ends, or the server stops and no message
        is in progress (a command in flight is always finished)."""
        pipeline, output = self.pipeline, self.output
        assert pipeline is not None and output is not None
        try:
            while True:
                if pipeline.pending is not None:
                    await pipeline.settle()
                    continue
                stopping = self.server.stopping
                if self.closed or (stopping and not pipeline.busy):
                    break
                state = pipeline.run(start=not stopping)
                self._resume_reading()
                if state is State.YIELD:
                    await asyncio.sleep(0)
                elif state is State.OUTPUT:
                    await output.drained()
                elif state is State.IDLE:
                    if self._eof or stopping:
                        break
                    self._parked = True
                    try:
                        await self._wait()
                    finally:
                        self._parked = False
        except Exception:
            log.exception("connection %s failed", self.peer)
        finally:
            self._finish()

    def _finish(self) -> None:
        """Close after the queued output is written (the transport flushes on close)."""
        t = self._transport
        if t is not None and not t.is_closing():
            if self.output is not None:
                self.output.flush()
            t.close()

    def close(self) -> None:
        """Close now (server shutdown); a command in flight still completes."""
        self._finish()


def _keep_paused(transport: asyncio.Transport) -> None:
    """Pause the transport's reading again once the loop is done starting it."""
    if not transport.is_closing() and transport.is_reading():
        transport.pause_reading()
