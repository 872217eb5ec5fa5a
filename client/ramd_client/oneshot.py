"""One blocking JSON-RPC exchange without asyncio: ``ramctl version`` and ``ramctl call``.

Importing asyncio costs more than everything else these commands do, so they talk over a
plain blocking socket instead of :class:`~ramd_client.protocol.JsonRpcProtocol`. The wire
format is :mod:`ramd_client.message`'s and the errors are the asynchronous client's, in the
same situations:

- connecting and the first answer (``query-version``, the proof that the socket is ramd's
  JSON-RPC one): :class:`~ramd_client.error.ConnectError` naming the path (no socket, nobody
  listening, no permission, no answer within ``timeout``, not ramd), or
  :class:`~ramd_client.error.RamdError` when the daemon refuses the connection;
- then one call: its result, :class:`~ramd_client.error.RamdError` when refused,
  :class:`~ramd_client.error.CallTimeout` after ``timeout`` seconds,
  :class:`~ramd_client.error.ConnectionLost` when the daemon goes away first.

One request is in flight at a time; a line from the daemon is at most ``max_message_size``
bytes (past that, ProtocolError). Events are never subscribed, so none arrive. Not thread-safe:
one caller owns an :class:`Exchange`.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from ramd_client.error import (
    CallTimeout,
    ConnectError,
    ConnectionLost,
    ProtocolError,
    RamdClientError,
    RamdError,
)
from ramd_client.message import ErrorReply, Response, decode, encode_request, refusal, request

__all__ = ["Exchange"]

#: The largest line accepted from the daemon (the asynchronous client's default).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class _Expired(Exception):
    """The deadline of the current step passed."""


class Exchange:
    """A blocking connection for a few sequential calls; see the module docstring.

    ``Exchange(path, timeout)`` connects and reads the daemon's version (``version``, raw).
    Use it as a context manager; :meth:`close` is idempotent.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        timeout: float | None,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._ids = 0
        self._refusal: str | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.version: Any = self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> Any:
        deadline = self._deadline()
        try:
            self._sock.settimeout(self.timeout)
            self._sock.connect(self.path)
            return self._call("query-version", None, deadline)
        except _Expired:
            raise ConnectError(self.path, f"no answer within {self.timeout:g} s") from None
        except TimeoutError:  # connect() itself (a full backlog)
            raise ConnectError(self.path, f"no answer within {self.timeout:g} s") from None
        except OSError as e:
            raise ConnectError(self.path, e.strerror or str(e), e.errno) from None
        except RamdError:
            raise
        except RamdClientError as e:
            if self._refusal is not None:
                raise RamdError("GenericError", self._refusal) from None
            raise ConnectError(self.path, str(e)) from None

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Send ``method`` and return its result (raw JSON data); see the module docstring."""
        try:
            return self._call(method, params, self._deadline())
        except _Expired:
            raise CallTimeout(method, self.timeout or 0) from None
        except OSError as e:
            raise ConnectionLost(f"connection to the daemon failed: {e}") from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Exchange:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _call(self, method: str, params: Mapping[str, Any] | None, deadline: float | None) -> Any:
        self._ids += 1
        req_id = self._ids
        self._sock.settimeout(self._left(deadline))
        try:
            self._sock.sendall(encode_request(request(method, params or {}, req_id)))
        except TimeoutError:
            raise _Expired from None
        except OSError:
            # The daemon closed first (e.g. refusing the connection): what it said before
            # closing is still to be read, and the end of the stream follows.
            pass
        while True:
            message, _ = decode(self._line(deadline))
            if isinstance(message, Response) and message.id == req_id:
                return message.result
            if isinstance(message, ErrorReply):
                if message.id == req_id:
                    raise refusal(message)
                if message.id is None:  # the daemon refusing this connection; it closes
                    self._refusal = message.message

    def _line(self, deadline: float | None) -> bytes:
        """The next line from the daemon, newline included."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > self.max_message_size:
                raise ProtocolError(
                    f"a message from the daemon exceeds {self.max_message_size} bytes"
                )
            self._sock.settimeout(self._left(deadline))
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                raise _Expired from None
            except ConnectionResetError:  # closed with our request unread: the end too
                chunk = b""
            if not chunk:
                reason = "the daemon closed the connection"
                if self._refusal is not None:
                    reason = f"{reason}: {self._refusal}"
                raise ConnectionLost(reason)
            self._buffer += chunk

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        """Seconds to the deadline (None: no deadline); _Expired once it has passed."""
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Expired
        return left
