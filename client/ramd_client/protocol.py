"""The generic asynchronous JSON-RPC connection: one socket, one reader task, bounded.

:class:`JsonRpcProtocol` knows the wire (via :mod:`ramd_client.message`) but no command.
:class:`~ramd_client.client.AsyncClient` builds the typed commands and the event streams on
top of it through two hooks, :meth:`JsonRpcProtocol._on_notification` and
:meth:`JsonRpcProtocol._on_disconnect`.

Two sides of the loop, as in ``qemu.qmp``:

- the **caller side**: public coroutines (:meth:`JsonRpcProtocol.call`,
  :meth:`JsonRpcProtocol.disconnect`) run in the task of whoever awaits them; any number of
  tasks may call concurrently (pipelining: every request gets its own ``id`` and its answer
  is matched by that ``id``, whatever the order);
- the **reader side**: one task per connection reads every message, resolves the waiting
  call or hands the event to the hooks. Code on this side never awaits anything but the
  socket, so a slow consumer can never stall the answers of other calls.

Bounds: at most ``max_pending`` calls are in flight (more callers wait for a slot); one
message is at most ``max_message_size`` bytes (the stream reader's buffer is bounded by it, a
longer one ends the connection); writes wait for the socket to drain. Nothing grows with
what the daemon or the callers do.

Time: with a ``timeout``, :meth:`JsonRpcProtocol.open` (connecting and the first answer) and
each :meth:`JsonRpcProtocol.call` (waiting for a slot, sending, the answer) give up after that
many seconds, so a stopped daemon or a socket nobody answers cannot hang the caller.
:meth:`JsonRpcProtocol.disconnect` never waits for the peer.

Runstate: ``IDLE`` (not connected yet, or closed) -> ``CONNECTING`` -> ``RUNNING`` ->
``DISCONNECTING`` -> ``IDLE``. A protocol object connects once; make a new one to reconnect.
All methods must be used from the event loop that connected it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ramd_client.error import (
    CallTimeout,
    ConnectError,
    ConnectionLost,
    ProtocolError,
    RamdClientError,
    RamdError,
)
from ramd_client.message import (
    ErrorReply,
    Message,
    Notification,
    Response,
    decode,
    plain,
    refusal,
    request,
    request_parts,
)

__all__ = ["MAX_MESSAGE_SIZE", "MAX_PENDING", "JsonRpcProtocol", "Runstate", "Trace"]

log = logging.getLogger(__name__)
# The package's logger stays silent unless the application configures logging. Set here,
# not in the package's __init__: every module that logs imports this one, and ``ramctl
# version`` (which logs nothing) does not pay for importing logging.
logging.getLogger("ramd_client").addHandler(logging.NullHandler())

#: Default bound of one incoming message (a 4 MiB read is about 5.6 MiB of base64).
MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: Default bound of calls in flight on one connection.
MAX_PENDING = 64

#: Send buffer asked for on the socket (the kernel caps it at ``net.core.wmem_max``): a bulk
#: write's request of several MiB goes to the kernel in a few writes, not hundreds of turns.
SEND_BUFFER = 4 * 1024 * 1024
_VIEW_FROM = 64 * 1024

#: A message tracer: called with ``"send"`` and each request object just before it is
#: written (caller side), and with ``"recv"`` and each decoded message (reader side).
Trace = Callable[[str, dict[str, Any]], None]


class Runstate(Enum):
    """Where a connection is in its life."""

    IDLE = "idle"
    CONNECTING = "connecting"
    RUNNING = "running"
    DISCONNECTING = "disconnecting"


@dataclass(slots=True)
class _Pending:
    """A call waiting for its answer. ``on_result`` runs on the reader side, with the result,
    before any later message is read."""

    future: asyncio.Future[Any]
    on_result: Callable[[Any], None] | None


class JsonRpcProtocol:
    """A JSON-RPC 2.0 connection to the daemon; see the module docstring."""

    def __init__(
        self,
        *,
        max_pending: int = MAX_PENDING,
        max_message_size: int = MAX_MESSAGE_SIZE,
        timeout: float | None = None,
    ) -> None:
        if max_pending < 1 or max_message_size < 1:
            raise ValueError("max_pending and max_message_size must be positive")
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive (or None: wait forever)")
        self.max_message_size = max_message_size
        #: Seconds :meth:`open` and each :meth:`call` may take, or None (no limit).
        self.timeout = timeout
        #: The message tracer (see :data:`Trace`), or None.
        self.trace: Trace | None = None
        self._runstate = Runstate.IDLE
        self._path = ""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[int, _Pending] = {}
        self._slots = asyncio.Semaphore(max_pending)
        self._ids = itertools.count(1)
        self._lost: ConnectionLost | None = None
        self._closing = False
        self._last_refusal: str | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def runstate(self) -> Runstate:
        return self._runstate

    @property
    def path(self) -> str:
        """The socket path this connection was made to."""
        return self._path

    @property
    def connected(self) -> bool:
        return self._runstate is Runstate.RUNNING

    # -- caller side -----------------------------------------------------------------------

    async def _connect(self, path: str | os.PathLike[str]) -> None:
        """Open the socket and start the reader task. Caller side.

        Raises :class:`ConnectError` (with the path and the OS reason) on failure.
        """
        if self._runstate is not Runstate.IDLE or self._lost is not None:
            raise RuntimeError("a protocol object connects only once")
        self._path = os.fspath(path)
        self._runstate = Runstate.CONNECTING
        try:
            reader, writer = await asyncio.open_unix_connection(
                self._path, limit=self.max_message_size
            )
        except OSError as e:
            self._runstate = Runstate.IDLE
            self._lost = ConnectionLost("never connected")
            raise ConnectError(self._path, e.strerror or str(e), e.errno) from None
        self._reader, self._writer = reader, writer
        with contextlib.suppress(OSError, AttributeError):
            sock = writer.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._runstate = Runstate.RUNNING
        self._reader_task = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"ramd_client reader {self._path}"
        )
        log.debug("connected to %s", self._path)

    async def open(self, path: str | os.PathLike[str]) -> Any:
        """Connect to ``path`` and ask ``query-version``; return its result (raw JSON data).
        Caller side.

        The first answer proves the socket is ramd's JSON-RPC one. The whole exchange takes
        at most :attr:`timeout` seconds. Raises :class:`ConnectError` naming the path (no
        socket, nobody listening, no permission, no answer in time, not ramd), or
        :class:`~ramd_client.error.RamdError` when the daemon answers by refusing the
        connection (past ``max-connections``, a peer it does not allow). On any failure the
        connection is closed.
        """
        where = os.fspath(path)
        try:
            async with asyncio.timeout(self.timeout):
                await self._connect(where)
                return await self._call("query-version", None, None)
        except TimeoutError:
            await self.disconnect()
            raise ConnectError(where, f"no answer within {self.timeout:g} s") from None
        except ConnectError:
            raise
        except RamdClientError as e:
            refused = self._last_refusal
            await self.disconnect()
            if refused is not None:
                raise RamdError("GenericError", refused) from None
            raise ConnectError(where, str(e)) from None
        except BaseException:
            await self.disconnect()
            raise

    async def call(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        on_result: Callable[[Any], None] | None = None,
    ) -> Any:
        """Send request ``method`` and return its ``result`` (raw JSON data). Caller side.

        Waits for a free slot when ``max_pending`` calls are in flight. ``on_result``, if
        given, runs on the reader side with the result as soon as the answer is read, before
        any later message (used to switch event streams at the exact point of the answer).

        Raises :class:`~ramd_client.error.RamdError` when the daemon refuses,
        :class:`ConnectionLost` when the connection is (or goes) down before the answer,
        :class:`~ramd_client.error.CallTimeout` when :attr:`timeout` seconds pass first.
        Cancelling the caller (or the timeout) forgets the answer, not the request: it may
        still run.
        """
        if self.timeout is None:
            return await self._call(method, params, on_result)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._call(method, params, on_result)
        except TimeoutError:
            raise CallTimeout(method, self.timeout) from None

    async def _call(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        on_result: Callable[[Any], None] | None,
    ) -> Any:
        """:meth:`call` without the timeout."""
        async with self._slots:
            writer = self._writer
            if self._runstate is not Runstate.RUNNING or writer is None:
                raise ConnectionLost(self._lost.reason if self._lost else "not connected")
            req_id = next(self._ids)
            obj = request(method, params or {}, req_id)
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending[req_id] = _Pending(future, on_result)
            try:
                if self.trace is not None:
                    self.trace("send", plain(obj))
                for part in request_parts(obj):
                    # a view: the transport then copies only what the socket did not take
                    writer.write(memoryview(part) if len(part) > _VIEW_FROM else part)
                # A failed write: the reader side sees the end too and fails the future.
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.drain()
                return await future
            finally:
                self._pending.pop(req_id, None)

    async def disconnect(self) -> None:
        """Close the connection and wait until the reader task is gone. Caller side.

        Calls still in flight get :class:`ConnectionLost`; event streams end cleanly.
        Never waits for the peer: requests not yet sent (only calls still in flight have any)
        are dropped, so a stopped daemon cannot hold the close. Idempotent.
        """
        if self._runstate is Runstate.RUNNING:
            self._runstate = Runstate.DISCONNECTING
            self._closing = True
            if self._writer is not None:
                if self._writer.transport.get_write_buffer_size():
                    self._writer.transport.abort()
                else:
                    self._writer.close()
        task = self._reader_task
        if task is not None and asyncio.current_task() is not task:
            if not task.done():
                task.cancel()
            await asyncio.wait([task])  # its own outcome is not ours to raise
        if self._writer is not None:
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()

    # -- reader side -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Read and dispatch messages until the connection ends. Reader side."""
        reader = self._reader
        assert reader is not None
        reason = "the daemon closed the connection"
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    reason = f"a message from the daemon exceeds {self.max_message_size} bytes"
                    break
                if not line.endswith(b"\n"):
                    if line:
                        reason = "the daemon closed the connection in the middle of a message"
                    break
                message, raw = decode(line)
                if self.trace is not None:
                    self.trace("recv", raw)
                self._dispatch(message)
        except ProtocolError as e:
            reason = str(e)
            log.warning("protocol error from %s: %s", self._path, e)
        except (ConnectionError, OSError) as e:
            reason = f"connection to the daemon failed: {e}"
        except asyncio.CancelledError:
            self._closing = True
            raise
        except Exception as e:  # a bug, or a trace hook that raised: end, don't hang
            log.exception("reader of %s failed", self._path)
            reason = f"the client's reader failed: {e!r}"
        finally:
            if self._closing:
                reason = "connection closed by the client"
            elif self._last_refusal is not None:
                reason = f"{reason}: {self._last_refusal}"
            self._teardown(ConnectionLost(reason))

    def _dispatch(self, message: Message) -> None:
        """Route one message: answer a call, or hand an event to the hook. Reader side."""
        if isinstance(message, Notification):
            try:
                self._on_notification(message)
            except Exception:
                log.exception("event hook failed on %s", message.method)
            return
        pending = self._pending.get(message.id) if isinstance(message.id, int) else None
        if pending is None:
            if isinstance(message, ErrorReply) and message.id is None:
                # Not tied to a request: the daemon refusing this connection, or a parse
                # error it could not pin on a request. Kept to explain a close that follows.
                self._last_refusal = message.message
                log.warning("daemon error without id: %s", message.message)
            else:
                log.debug("answer to a forgotten call %r", message.id)
            return
        future = pending.future
        if future.done():
            return
        if isinstance(message, Response):
            if pending.on_result is not None:
                try:
                    pending.on_result(message.result)
                except Exception as e:
                    future.set_exception(e)
                    return
            future.set_result(message.result)
        else:
            future.set_exception(refusal(message))

    def _teardown(self, lost: ConnectionLost) -> None:
        """Fail every pending call with ``lost`` and run the disconnect hook. Reader side."""
        voluntary = self._closing
        self._lost = lost
        self._runstate = Runstate.IDLE
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(ConnectionLost(lost.reason))
        self._pending.clear()
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()
        log.debug("disconnected from %s: %s", self._path, lost)
        try:
            self._on_disconnect(None if voluntary else lost)
        except Exception:
            log.exception("disconnect hook failed")

    # -- hooks for subclasses (reader side, must not block) --------------------------------

    def _on_notification(self, note: Notification) -> None:
        """An event arrived. Reader side: must return at once, never await or raise."""
        log.debug("event %s ignored: nobody listens", note.method)

    def _on_disconnect(self, lost: ConnectionLost | None) -> None:
        """The connection ended: ``lost`` explains why, None when the client closed it.
        Reader side."""
