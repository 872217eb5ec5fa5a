"""The asyncio protocol of a client connection: the daemon's lines received in place.

The daemon sends one JSON text per line (docs/protocol.md §1). :class:`LineReader` has the transport
receive straight into one buffer of its own (``recv_into``: no bytes object per read, no
concatenation), and :meth:`LineReader.readline` hands out each line as a place in that
buffer, so a bulk answer of several MiB is copied once, by the kernel, and then read where
it lies. It also gives writers :meth:`LineReader.drain` (the transport's flow control).

Buffer: ``[start, end)`` holds the bytes received and not yet handed out. Before each read
the rest is moved to the front when it is small (at most one read's worth: the part of the
last read after the last whole line) or when the free room runs short, and the buffer grows
(doubling) only when a line needs the room. Each read takes at most :data:`READ` bytes, so
what is moved is less than a read per line handed out, and each byte is scanned for the
newline once: nothing is quadratic.

Bounds: a line may hold at most ``limit`` bytes before its newline; a longer one makes
:meth:`LineReader.readline` raise ``ValueError``. Reading pauses while more than ``limit``
bytes wait, so the buffer never exceeds ``limit`` + 2 * :data:`READ` bytes, whatever the
daemon sends. It lives as long as the connection.

Threads: everything runs on the event loop that made the connection; one task reads.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

__all__ = ["READ", "LineReader"]

#: The most bytes taken by one read.
READ = 512 * 1024
_INITIAL = READ


class LineReader(asyncio.BufferedProtocol):
    """One connection's receive buffer and write flow control; see the module docstring."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buf = bytearray(_INITIAL)
        self._start = 0
        self._end = 0
        self._scan = 0  # no newline in [start, scan)
        self._transport: asyncio.Transport | None = None
        self._reading_paused = False
        self._eof = False
        self._error: BaseException | None = None  # why the connection was lost
        self._waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drainers: deque[asyncio.Future[None]] = deque()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- the transport's side -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is one without deriving from asyncio.Transport)
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        buf, start, end = self._buf, self._start, self._end
        if start == end:
            start = end = 0
        elif start and (end - start <= READ or len(buf) - end < READ):
            buf[: end - start] = buf[start:end]
            start, end = 0, end - start
        self._scan -= self._start - start
        self._start, self._end = start, end
        if len(buf) - end < READ:  # reading pauses past limit: end <= limit here
            size = max(min(2 * len(buf), self._limit + 2 * READ), end + READ)
            buf.extend(bytes(size - len(buf)))
        return memoryview(buf)[end : end + READ]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        if self._end - self._start > self._limit and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()
        while self._drainers:
            drainer = self._drainers.popleft()
            if not drainer.done():
                drainer.set_exception(ConnectionResetError("connection lost"))
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        while self._drainers:
            drainer = self._drainers.popleft()
            if not drainer.done():
                drainer.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the reading task's side ----------------------------------------------------------

    async def readline(self) -> tuple[bytearray, int, int]:
        """The next line as ``(buffer, start, end)``: it is ``buffer[start:end]``, ending
        with ``\\n`` (without one: what the daemon sent before it closed the connection, empty
        at a clean end). Valid only until the event loop runs anything else (the next read
        may move the buffer's bytes): use it before awaiting anything, and await this
        coroutine directly, not through a task (``asyncio.wait_for`` would make one). The
        buffer must not be changed, and no memoryview of it may outlive that use.

        Raises ``ValueError`` for a line over ``limit`` bytes, and the connection's error
        (an OSError) when it failed, once the whole lines received before are handed out.
        """
        while True:
            buf, start, end = self._buf, self._start, self._end
            newline = buf.find(b"\n", self._scan, end)
            if newline >= 0:
                if newline - start > self._limit:
                    raise ValueError(f"a line exceeds {self._limit} bytes")
                self._start = self._scan = newline + 1
                if self._reading_paused and end - newline - 1 <= self._limit:
                    self._reading_paused = False
                    if self._transport is not None:
                        self._transport.resume_reading()
                return buf, start, newline + 1
            self._scan = end
            if end - start > self._limit:
                raise ValueError(f"a line exceeds {self._limit} bytes")
            if self._eof:
                if self._error is not None:
                    raise self._error
                self._start = self._scan = end
                return buf, start, end
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            await waiter

    # -- the writers' side ----------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until the transport's buffer is below its high-water mark (at once when it
        is). Raises ConnectionResetError once the connection is lost.

        Waiters wake in the order they came and each looks again: when the first one's
        write fills the buffer past the mark, the others wait on.
        """
        while True:
            if self._closed.done():
                raise ConnectionResetError("connection lost")
            if not self._write_paused:
                return
            drainer = asyncio.get_running_loop().create_future()
            self._drainers.append(drainer)
            await drainer

    async def wait_closed(self) -> None:
        """Wait until the connection is lost (closed by either side)."""
        await asyncio.shield(self._closed)
