"""One QMP connection from the daemon to a VMM's socket, through ``qemu.qmp``'s ``QMPClient``.

The VMM is a peer like any other, so:

- everything it owes has a deadline: connecting, the greeting and negotiation, and each
  command's answer (:meth:`VmmLink.execute`); closing does not wait for it either;
- what it sends is bounded: one message is at most :data:`READ_LIMIT` bytes (a longer one
  ends the connection), and events are never queued: ``qemu.qmp``'s default all-events
  listener (whose queue and history grow without bound) is filtered to accept nothing, and
  :class:`_Router` hands each event to the link's ``on_event`` callback as it is read, which
  must not block;
- its credentials are read before the session starts: the pid from ``SO_PEERCRED`` of the
  socket the daemon connected, the uid from ``/proc/PID/status`` (QEMU's ``-runas`` drops
  privileges after creating its sockets, so the socket's own credentials would be root's).

Ownership and thread: a link is owned by the attachment registry and used on the loop thread
only. ``on_close`` runs once, when the connection ended for any reason but :meth:`close`
and the VMM process exited (a pidfd taken at connect time says when).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping

from qemu.qmp import ConnectError, EventListener, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp.message import Message
from qemu.qmp.protocol import Runstate

from ramd.vmm.errors import VmmGone, VmmRefused, VmmTimeout, VmmUnreachable

log = logging.getLogger(__name__)

#: Longest message accepted from a VMM, in bytes (``query-memory-devices`` with dozens of
#: devices is a few KiB). It also bounds the work between two yields of the reader: asyncio
#: buffers at most twice this much before it stops reading the socket.
READ_LIMIT = 256 * 1024

EventHandler = Callable[[str, Mapping[str, object]], None]


class _Router(EventListener):
    """An event listener that queues nothing: :meth:`accept` passes every event to the
    handler as ``qemu.qmp``'s reader delivers it and answers False (so no queue, no history)."""

    def __init__(self, handler: EventHandler) -> None:
        super().__init__()
        self._handler = handler

    def accept(self, event: Message) -> bool:
        name = event.get("event")
        data = event.get("data", {})
        if isinstance(name, str) and isinstance(data, Mapping):
            try:
                self._handler(name, data)
            except Exception:
                log.exception("VMM event %s not handled", name)
        return False


def _strerror(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return os.strerror(e.errno)
    if isinstance(e, EOFError):
        return "the VMM closed the connection"
    if isinstance(e, ValueError):  # asyncio's readline past the limit
        return f"the VMM sent a message longer than {READ_LIMIT} bytes"
    return str(e) or type(e).__name__


def proc_uid(pid: int) -> int:
    """The filesystem uid process ``pid`` runs as now (``/proc/PID/status``, ``Uid:`` line,
    fourth field: the one the kernel checks when it opens a file). OSError if unknown."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Uid:"):
                return int(line.split()[4])
    raise OSError(errno.ESRCH, f"no Uid line for pid {pid}")


class VmmLink:
    """A negotiated QMP session with the VMM at ``path`` (made by :meth:`open`).

    ``pid`` and ``uid``: the VMM process and the uid it runs as (read at connect time).
    """

    def __init__(
        self, path: str, client: QMPClient, sock: socket.socket, pid: int, uid: int, pidfd: int
    ) -> None:
        self.path = path
        self.pid = pid
        self.uid = uid
        self._pidfd = pidfd
        self._client = client
        self._sock = sock
        self.on_event: EventHandler = lambda name, data: None
        self.on_close: Callable[[VmmLink], None] = lambda link: None
        self._closing = False
        #: Commands run one at a time (see :meth:`add_fd`).
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: str, timeout: float) -> VmmLink:
        """Connect to the QMP socket ``path`` and negotiate, within ``timeout`` seconds.

        Raises :class:`VmmUnreachable` naming the path and the OS error."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        client = QMPClient(f"vmm{sock.fileno()}", readbuflen=READ_LIMIT)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, path)
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                pid = struct.unpack("3i", raw)[0]
                pidfd = os.pidfd_open(pid)
                try:
                    uid = proc_uid(pid)
                    await client.connect(sock)
                except BaseException:
                    os.close(pidfd)
                    raise
        except TimeoutError:
            sock.close()
            raise VmmUnreachable(
                f"Cannot connect to VMM QMP socket '{path}': {os.strerror(errno.ETIMEDOUT)}"
            ) from None
        except ConnectError as e:
            sock.close()
            raise VmmUnreachable(
                f"Cannot connect to VMM QMP socket '{path}': {_strerror(e.exc)}"
            ) from None
        except OSError as e:
            sock.close()
            raise VmmUnreachable(
                f"Cannot connect to VMM QMP socket '{path}': {_strerror(e)}"
            ) from None
        # the default listener would keep every event forever: it accepts none from now on
        client.events.event_filter = lambda event: False
        link = cls(path, client, sock, pid, uid, pidfd)
        client.register_listener(_Router(link._event))
        link._watcher = asyncio.get_running_loop().create_task(link._watch())
        link._watcher.add_done_callback(lambda task: os.close(pidfd))
        return link

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING and not self._closing

    def _event(self, name: str, data: Mapping[str, object]) -> None:
        self.on_event(name, data)

    async def _watch(self) -> None:
        """Wait for the session to end; unless :meth:`close` ended it, finish the disconnect
        (bounded), wait for the VMM process to exit (a VMM whose connection was cut, for
        sending too much, still maps what it was given) and call ``on_close``."""
        client = self._client
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        if self._closing:
            return
        self._closing = True
        await self._disconnect()
        log.info("VMM pid %d at %s: QMP connection closed", self.pid, self.path)
        await self._exited()
        log.info("VMM pid %d exited", self.pid)
        self.on_close(self)

    async def _exited(self) -> None:
        """Return once the VMM process has exited (its pidfd is readable)."""
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(self._pidfd, ready)
        try:
            await gone
        finally:
            loop.remove_reader(self._pidfd)

    async def _disconnect(self) -> None:
        """End the session; a VMM that does not read what is left to send cannot hold it:
        after a second the socket is shut down under the transport."""
        try:
            async with asyncio.timeout(1.0):
                await self._client.disconnect()
        except TimeoutError:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        except Exception as e:
            log.debug("VMM pid %d: disconnect: %s", self.pid, _strerror(e))

    async def close(self) -> None:
        """Close the session (no ``on_close``)."""
        if self._watcher is not None:
            self._watcher.cancel()
        if self._closing:
            return
        self._closing = True
        await self._disconnect()

    async def add_fd(self, fd: int, opaque: str, timeout: float) -> object:
        """Pass ``fd`` (not closed here) and run ``add-fd`` with ``opaque``; its answer.

        The fd goes as ``SCM_RIGHTS`` with one space (whitespace between JSON texts) sent on
        the link's own socket; commands on a link run one at a time, so no other command's
        bytes are half-written when it goes, and QEMU takes it for this ``add-fd``."""
        try:
            async with asyncio.timeout(timeout), self._lock:
                if not self.connected:
                    raise VmmGone("the QMP connection is closed")
                fds = struct.pack("i", fd)
                try:
                    self._sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                except OSError as e:
                    raise VmmGone(f"cannot pass the fd: {_strerror(e)}") from None
                return await self._run("add-fd", {"opaque": opaque})
        except TimeoutError:
            raise VmmTimeout(f"no answer to add-fd within {timeout:g} s") from None

    async def execute(
        self, cmd: str, arguments: Mapping[str, object] | None, timeout: float
    ) -> object:
        """Run ``cmd`` and return its ``return`` value within ``timeout`` seconds (waiting
        for the link's earlier commands included).

        Raises :class:`VmmRefused` (the VMM's error description), :class:`VmmTimeout`, or
        :class:`VmmGone`. On a timeout the VMM may still run the command later: its late
        answer is dropped by ``qemu.qmp`` (unknown id)."""
        try:
            async with asyncio.timeout(timeout), self._lock:
                return await self._run(cmd, arguments)
        except TimeoutError:
            raise VmmTimeout(f"no answer to {cmd} within {timeout:g} s") from None

    async def _run(self, cmd: str, arguments: Mapping[str, object] | None) -> object:
        if not self.connected:
            raise VmmGone("the QMP connection is closed")
        try:
            return await self._client.execute(cmd, arguments)
        except ExecuteError as e:
            raise VmmRefused(e.error.error.desc) from None
        except (ExecInterruptedError, EOFError, OSError) as e:
            raise VmmGone(f"{cmd}: {_strerror(e)}") from None
