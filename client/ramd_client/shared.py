"""Shared blocks mapped in this process: :func:`get_fd`, :class:`SharedBlock` (blocking) and
:class:`AsyncSharedBlock` (asyncio), docs/protocol.md §8.

::

    from ramd_client.shared import SharedBlock

    with SharedBlock(socket_path, "ram0") as block:   # its own connection, fd, mapping
        block.view[0:5] = b"hello"                    # other mappers see it at once
        while running:
            block.poll(1.0)                           # follow resizes, acknowledge shrinks

A mapper follows the daemon's order (QEMU's notifier order across processes): on a grow the
daemon has already mapped and extended the file when ``RAM_BLOCK_RESIZED`` arrives, and the
block maps the new tail; on a shrink (``"ack": true``) the block reserves the tail
inaccessible again, **then** sends ``ram-block-ack`` with the event's ``seq``, and only then
does the daemon release the memory and answer the resizer; on ``RAM_BLOCK_REMOVED`` it
unmaps everything, then acknowledges. Until the owner calls :meth:`SharedBlock.poll`, a shrink
or remove of the block waits (up to the daemon's ``ack-timeout``; then ``safe`` mode rolls back
and ``hard`` mode disconnects this block's connection), so poll regularly.

The view: :attr:`SharedBlock.view` is a memoryview of ``[0, size)`` (read-only when the fd
is). Fetch it again after every resize: the one fetched before is released (when nothing
exported from it), and memory past a shrink is ``PROT_NONE``, so a slice kept from before a
shrink faults the process if touched (as a pointer would in C). The start address never
moves while the block stays mapped.

Thread: a :class:`SharedBlock` belongs to one thread, which calls :meth:`SharedBlock.poll`
and :meth:`SharedBlock.close`; the memory itself may be read and written from any thread
(it is plain shared memory) as long as that thread also stops touching a range before the
owner polls the shrink that drops it. :class:`AsyncSharedBlock` follows events on the event
loop (a reader on the socket) and does the blocking steps (open, close) in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ramd_client.error import RamdClientError
from ramd_client.fdchannel import FdChannel, Trace
from ramd_client.mapping import Mapping
from ramd_client.message import Notification

__all__ = ["AsyncSharedBlock", "SharedBlock", "get_fd"]

log = logging.getLogger(__name__)


def get_fd(
    path: str | os.PathLike[str],
    id: str,
    readonly: bool = False,
    *,
    timeout: float | None = 10.0,
    trace: Trace | None = None,
) -> tuple[int, dict[str, Any], FdChannel]:
    """``ram-block-get-fd`` on a new connection of its own: ``(fd, info, conn)``.

    ``info`` is the answer (``id``, ``size``, ``max-size``, ``page-size``, ``readonly``).
    The caller owns ``fd`` (close-on-exec) and ``conn``, which is now a mapper of the block:
    it receives the block's events, must acknowledge those with ``"ack": true``
    (``conn.send("ram-block-ack", {"seq": seq})``), and stops being a mapper at
    ``ram-block-put-fd`` or when closed. Raises :class:`~ramd_client.error.RamdError` when
    the daemon refuses (no such block, an anonymous block) and the connection errors of
    :class:`~ramd_client.fdchannel.FdChannel`.
    """
    conn = FdChannel(path, timeout, trace=trace)
    try:
        info, fd = conn.call("ram-block-get-fd", {"id": id, "readonly": readonly}, take_fd=True)
    except BaseException:
        conn.close()
        raise
    assert fd is not None
    return fd, info, conn


class SharedBlock:
    """Block ``id`` mapped in this process and kept in step with the daemon; see the module
    docstring. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        id: str,
        readonly: bool = False,
        *,
        timeout: float | None = 10.0,
        trace: Trace | None = None,
    ) -> None:
        self.id = id
        self.fd, info, self.conn = get_fd(path, id, readonly, timeout=timeout, trace=trace)
        #: Whether the fd (and the mapping) is read-only (always, for a read-only peer).
        self.readonly: bool = info["readonly"]
        self.page_size: int = info["page-size"]
        #: True once the daemon removed the block (the memory is unmapped here).
        self.removed = False
        self.closed = False
        self._view: memoryview | None = None
        try:
            self._mapping = Mapping(
                self.fd, info["size"], info["max-size"], self.page_size, self.readonly
            )
        except BaseException:
            os.close(self.fd)
            self.conn.close()
            raise

    # -- the memory ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes mapped now (0 once removed or closed)."""
        return self._mapping.size

    @property
    def max_size(self) -> int:
        return self._mapping.max_size

    @property
    def address(self) -> int:
        """The start of the mapping in this process (0 when unmapped)."""
        return self._mapping.base

    @property
    def view(self) -> memoryview:
        """``[0, size)`` as a memoryview; fetch it again after each resize."""
        if self._view is None:
            if self.closed or self.removed:
                raise ValueError(f"RAM block '{self.id}' is not mapped")
            self._view = self._mapping.view()
        return self._view

    # -- events ----------------------------------------------------------------------------

    def poll(self, timeout: float | None = 0.0) -> list[Notification]:
        """Handle the events that have arrived, waiting up to ``timeout`` seconds for the
        first (0: none; None: until one comes); the events handled, in order.

        Raises :class:`~ramd_client.error.ConnectionLost` when the daemon closed the
        connection (e.g. ``hard`` mode after a missed ``ack-timeout``), and ``OSError`` when
        the kernel refuses to map a grown tail (the mapping keeps its old size).
        """
        handled: list[Notification] = []
        event = self.conn.next_event(timeout)
        while event is not None:
            self._handle(event)
            handled.append(event)
            event = self.conn.next_event(0)
        return handled

    def _handle(self, event: Notification) -> None:
        data = event.params.get("data")
        if not isinstance(data, dict) or data.get("id") != self.id:
            return
        if event.method == "RAM_BLOCK_RESIZED" and not self.removed:
            self._drop_view()
            self._mapping.resize(data["new-size"])
        elif event.method == "RAM_BLOCK_REMOVED" and not self.removed:
            self._drop_view()
            self._mapping.unmap()
            self.removed = True
        elif event.method == "RAM_BLOCK_ADDED" and self.removed:
            # A removal rolled back (safe mode: another mapper was late): map it again.
            self._mapping = Mapping(
                self.fd, data["size"], data["max-size"], data["page-size"], self.readonly
            )
            self.removed = False
        if data.get("ack") is True:
            self.conn.send("ram-block-ack", {"seq": data["seq"]})

    def _drop_view(self) -> None:
        if self._view is not None:
            with contextlib.suppress(BufferError):  # something still exports it
                self._view.release()
            self._view = None

    # -- life ------------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap, tell the daemon (``ram-block-put-fd``, unless the block was removed) and
        close the fd and the connection. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._drop_view()
        self._mapping.unmap()
        try:
            if not self.removed:
                self.conn.call("ram-block-put-fd", {"id": self.id})
        except RamdClientError as e:  # the connection is going anyway: it ends the mapping
            log.debug("ram-block-put-fd %s: %s", self.id, e)
        finally:
            os.close(self.fd)
            self.conn.close()

    def __enter__(self) -> SharedBlock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncSharedBlock:
    """A :class:`SharedBlock` whose events are followed on the running event loop.

    ``await AsyncSharedBlock.open(path, id)``; events are handled as they arrive (a reader
    on the connection's socket, on the loop thread) and then passed to ``on_event``; a
    failure while following (the connection lost) stops following, is kept in
    :attr:`error` and sets :attr:`failed`. ``await block.close()``. Loop thread only.
    """

    def __init__(
        self, block: SharedBlock, on_event: Callable[[Notification], None] | None = None
    ) -> None:
        self.block = block
        self.on_event = on_event
        self.error: BaseException | None = None
        self.failed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(block.conn.fileno(), self._readable)
        self._following = True

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        id: str,
        readonly: bool = False,
        *,
        timeout: float | None = 10.0,
        on_event: Callable[[Notification], None] | None = None,
    ) -> AsyncSharedBlock:
        block = await asyncio.to_thread(SharedBlock, path, id, readonly, timeout=timeout)
        return cls(block, on_event)

    @property
    def view(self) -> memoryview:
        return self.block.view

    @property
    def size(self) -> int:
        return self.block.size

    def _readable(self) -> None:
        try:
            events = self.block.poll(0)
        except (RamdClientError, OSError) as e:
            self.error = e
            self._stop()
            self.failed.set()
            return
        if self.on_event is not None:
            for event in events:
                self.on_event(event)

    def _stop(self) -> None:
        if self._following:
            self._following = False
            self._loop.remove_reader(self.block.conn.fileno())

    async def close(self) -> None:
        """Stop following and close the block (in a worker thread). Idempotent."""
        self._stop()
        await asyncio.to_thread(self.block.close)

    async def __aenter__(self) -> AsyncSharedBlock:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
