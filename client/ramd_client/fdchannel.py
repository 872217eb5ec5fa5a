"""A blocking JSON-RPC connection that receives file descriptors (docs/protocol.md §8).

asyncio's streams read with ``recv`` and drop ancillary data, so an fd sent by the daemon
(``SCM_RIGHTS`` with the first byte of a ``ram-block-get-fd`` answer) needs a connection of
its own that reads with ``recvmsg``: this one. Received fds are close-on-exec
(``MSG_CMSG_CLOEXEC``) and kept in arrival order; :meth:`FdChannel.call` hands the fd that
came with its answer to the caller (``take_fd``), and :meth:`FdChannel.close` closes any
fd nobody took, so none leaks.

Events (notifications: on a mapper's connection every event of the blocks it maps arrives
without ``subscribe``) are queued in arrival order, at most ``max_events`` (past that,
:class:`~ramd_client.error.ProtocolError`: the owner stopped following them), and taken
with :meth:`FdChannel.next_event`. :meth:`FdChannel.send` sends a request without waiting
for its answer (an acknowledgement must not block whoever follows events); such answers are
checked when they arrive and an error is logged.

Thread: not thread-safe; one owner thread uses a channel (or one thread at a time, handing it
over with a happens-before edge, as :class:`~ramd_client.shared.AsyncSharedBlock` does).
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from ramd_client.error import CallTimeout, ConnectError, ConnectionLost, ProtocolError
from ramd_client.message import (
    ErrorReply,
    Notification,
    Response,
    decode,
    encode_request,
    refusal,
    request,
)

__all__ = ["FdChannel", "Trace"]

log = logging.getLogger(__name__)

#: The largest line accepted from the daemon.
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: Events queued at most before the owner must have taken some.
MAX_EVENTS = 4096
#: Room for a few fds per read; the daemon sends one per answer.
_ANCILLARY = socket.CMSG_SPACE(8 * array.array("i").itemsize)

#: A message tracer: ``("send", request)`` before each request is written, ``("recv",
#: message)`` for each decoded message (the same hook as the asynchronous client's).
Trace = Callable[[str, dict[str, Any]], None]


class FdChannel:
    """A blocking connection to the daemon's JSON-RPC socket; see the module docstring.

    ``timeout`` (seconds, None: none) bounds connecting and each :meth:`call`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float | None = 10.0,
        *,
        trace: Trace | None = None,
        max_events: int = MAX_EVENTS,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.trace = trace
        self._max_events = max_events
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._events: deque[Notification] = deque()
        self._ids = 0
        self._unanswered: set[int] = set()  # sent with send(), answer not read yet
        self._awaited = 0  # the id call() waits for (0: none)
        self._answer: Response | ErrorReply | None = None
        self._closed = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(self.path)
        except OSError as e:
            self.sock.close()
            raise ConnectError(self.path, e.strerror or str(e), e.errno) from None

    # -- requests --------------------------------------------------------------------------

    def send(self, method: str, params: Mapping[str, Any] | None = None) -> int:
        """Send a request and return its id; its answer is checked when it arrives (an
        error is logged), never waited for."""
        req_id = self._write(method, params)
        self._unanswered.add(req_id)
        return req_id

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, *, take_fd: bool = False
    ) -> tuple[Any, int | None]:
        """Send ``method``, wait for its answer; ``(result, fd)``.

        With ``take_fd`` the answer must have come with an fd, which the caller now owns
        (else :class:`ProtocolError`); otherwise ``fd`` is None. Events that arrive meanwhile
        are queued. Raises :class:`~ramd_client.error.RamdError` when refused,
        :class:`CallTimeout` after :attr:`timeout` seconds, :class:`ConnectionLost`.
        """
        self._awaited = self._write(method, params)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while self._answer is None:
                left = None if deadline is None else deadline - time.monotonic()
                if (left is not None and left <= 0) or not self._read(left):
                    raise CallTimeout(method, self.timeout or 0)
            answer = self._answer
        finally:
            self._awaited, self._answer = 0, None
        if isinstance(answer, ErrorReply):
            raise refusal(answer)
        fd = None
        if take_fd:
            # Only get-fd answers carry fds and one call is answered at a time, so the fd
            # that came with this answer is the oldest one not taken.
            if not self._fds:
                raise ProtocolError(f"{method}: the answer came without an fd")
            fd = self._fds.popleft()
        return answer.result, fd

    # -- events ----------------------------------------------------------------------------

    def next_event(self, timeout: float | None) -> Notification | None:
        """The oldest queued event, reading for up to ``timeout`` seconds (0: only what
        has arrived; None: wait for one) when none is queued; None if none came."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._events:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not self._read(left) and left is not None and left <= 0:
                return None
        return self._events.popleft()

    def fileno(self) -> int:
        """The socket's fd, to wait for input with ``select`` or an event loop."""
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and every received fd nobody took. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())

    # -- internals -------------------------------------------------------------------------

    def _write(self, method: str, params: Mapping[str, Any] | None) -> int:
        if self._closed:
            raise ConnectionLost("the connection is closed")
        self._ids += 1
        obj = request(method, params or {}, self._ids)
        if self.trace is not None:
            self.trace("send", obj)
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(encode_request(obj))
        except TimeoutError:
            raise CallTimeout(method, self.timeout or 0) from None
        except OSError as e:
            raise ConnectionLost(f"connection to the daemon failed: {e}") from None
        return self._ids

    def _read(self, timeout: float | None) -> bool:
        """Read once (waiting up to ``timeout``) and dispatch every complete message;
        False when nothing arrived in time."""
        if self._closed:
            raise ConnectionLost("the connection is closed")
        if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
            return False
        self.sock.settimeout(None)
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                1 << 20, _ANCILLARY, socket.MSG_CMSG_CLOEXEC
            )
        except OSError as e:
            raise ConnectionLost(f"connection to the daemon failed: {e}") from None
        for level, kind, raw in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds = array.array("i")
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
                self._fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("the daemon sent more fds than one answer carries")
        if not data:
            raise ConnectionLost("the daemon closed the connection")
        self._buffer += data
        self._dispatch_lines()
        return True

    def _dispatch_lines(self) -> None:
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            message, raw = decode(line)
            if self.trace is not None:
                self.trace("recv", raw)
            if isinstance(message, Notification):
                if len(self._events) >= self._max_events:
                    raise ProtocolError(
                        f"{self._max_events} events queued on {self.path}: nobody follows them"
                    )
                self._events.append(message)
            elif isinstance(message.id, int) and message.id in self._unanswered:
                self._unanswered.discard(message.id)
                if isinstance(message, ErrorReply):
                    log.warning("request %d refused: %s", message.id, message.message)
            elif message.id is not None and message.id == self._awaited:
                self._answer = message
            elif message.id is None and isinstance(message, ErrorReply):
                raise refusal(message)  # not tied to a request: the daemon refusing us
            else:
                log.debug("answer to a forgotten call %r", message.id)
        if len(self._buffer) > MAX_MESSAGE_SIZE:
            raise ProtocolError(f"a message from the daemon exceeds {MAX_MESSAGE_SIZE} bytes")
