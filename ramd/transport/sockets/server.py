"""Listeners and the set of live connections: bind, admit, shut down.

A listener is a Unix stream socket, either bound here (and removed at shutdown) or
inherited from systemd (never removed). Ownership and thread: the :class:`Server` owns the
listeners and the connections, on the loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ramd.api.service import Service
from ramd.config import Config
from ramd.logs import LogBudget
from ramd.process.fdbudget import connection_refusal
from ramd.transport.sockets.admission import Admission, refusal_reason
from ramd.transport.sockets.connection import Connection, DialectFactory, read_buffer
from ramd.transport.sockets.fdflight import FdFlight
from ramd.transport.sockets.peer import PeerCredentials
from ramd.transport.sockets.unixbind import BoundSocket, bind_unix

log = logging.getLogger("ramd.server")

#: At shutdown, seconds between two looks at the connections whose peers read nothing.
UNREAD_CHECK = 1.0
#: Seconds between two log lines about ``accept`` failing for lack of fds or memory.
RESOURCE_LOG_INTERVAL = 10.0
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Refused connections kept half-open at once (so their peers read the refusal); more are
#: closed at once.
MAX_LINGERING = 64


@dataclass(frozen=True)
class Listener:
    """Where to listen: a path to bind, or an inherited fd. ``dialect`` names the protocol."""

    dialect: str
    path: Path | None = None
    fd: int | None = None


def adopt_fd(fd: int) -> socket.socket:
    """A listening socket inherited from systemd."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise OSError(errno.EINVAL, f"inherited fd {fd} is not a Unix stream socket")
    sock.setblocking(False)
    return sock


class Server:
    """All listeners of the daemon and their connections."""

    def __init__(
        self,
        service: Service,
        config: Config,
        listeners: list[Listener],
        dialects: Mapping[str, DialectFactory],
    ) -> None:
        self.service = service
        self.config = config
        self.listeners = listeners
        self.dialects = dialects
        self.connections: set[Connection] = set()
        #: Where every connection's reads land (loop thread only; see read_buffer).
        self.read_buffer = read_buffer()
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._created: list[BoundSocket] = []
        self.admission = Admission(config, service.limits)
        service.fd_budget.reserve = self.admission.reserve
        self._lingering: set[Connection] = set()
        #: fds sent to peers that have not read them yet, over every connection.
        self.fd_flight = FdFlight()
        self._refusal_log: dict[int, LogBudget] = {}
        #: Refused connections by short reason
        #: (:func:`~ramd.transport.sockets.admission.refusal_reason`).
        self.refused: dict[str, int] = {}
        self._resource_log = LogBudget(rate=1 / RESOURCE_LOG_INTERVAL, burst=1)

    async def start(self) -> None:
        """Bind or adopt every listener and start accepting."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_exception)
        for lst in self.listeners:
            if lst.fd is not None:
                sock = adopt_fd(lst.fd)
            else:
                assert lst.path is not None
                bound = bind_unix(lst.path, self.config.socket_mode, self.config.socket_gid())
                self._created.append(bound)
                sock = bound.sock
            factory = self.dialects[lst.dialect]
            srv = await loop.create_unix_server(partial(Connection, self, factory), sock=sock)
            self._servers.append(srv)
            log.info("listening (%s) on %s", lst.dialect, lst.path or f"fd {lst.fd}")

    def resource_error(self, what: str, error: OSError) -> None:
        """Log that the daemon ran out of fds or memory taking connections, at most once per
        ``RESOURCE_LOG_INTERVAL`` (each try of the loop, each peer would log again)."""
        if self._resource_log.allow():
            log.error(
                "%s: %s%s",
                what,
                error,
                self._resource_log.suppressed_note(),
                extra={"fields": {"event": "accept-failed", "errno": error.errno}},
            )

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's error report: ``accept`` failing for lack of fds or memory (the
        loop retries it) goes to :meth:`resource_error`, everything else to the default."""
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
            self.resource_error("cannot accept connections", error)
        else:
            loop.default_exception_handler(context)

    def admit(self, conn: Connection, peer: PeerCredentials) -> tuple[str, str | None]:
        """Access class of a new peer and, if it must be refused, why (the rules and the
        connection slots are those of :class:`~ramd.transport.sockets.admission.Admission`)."""
        if self.stopping:
            return "full", "the daemon is shutting down"
        access, refusal = self.admission.admit(conn, peer)
        if refusal is None:
            refusal = connection_refusal(self.service, peer.uid == 0)
            if refusal is None:
                self.connections.add(conn)
                self.service.fd_budget.connections += 1
            else:
                self.admission.release(conn)
        return access, refusal

    def refusal(self, conn: Connection, reason: str) -> None:
        """Count a refused connection, and log it at most a few lines per second per uid."""
        key = refusal_reason(reason)
        self.refused[key] = self.refused.get(key, 0) + 1
        budget = self._refusal_log.get(conn.uid)
        if budget is None:
            if len(self._refusal_log) >= 1024:
                self._refusal_log.clear()
            budget = self._refusal_log[conn.uid] = LogBudget()
        if budget.allow():
            log.warning(
                "refused connection %s: %s%s",
                conn.peer,
                reason,
                budget.suppressed_note(),
                extra={"fields": {**conn.fields, "event": "refused", "reason": reason}},
            )

    def linger(self, conn: Connection) -> bool:
        """Whether a refused connection may stay half-open until its peer reads the
        refusal (bounded by ``MAX_LINGERING``)."""
        if len(self._lingering) >= MAX_LINGERING:
            return False
        self._lingering.add(conn)
        return True

    def forget(self, conn: Connection) -> None:
        if conn in self.connections:
            self.service.fd_budget.connections -= 1
        self.connections.discard(conn)
        self._lingering.discard(conn)
        self.admission.release(conn)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let each command in flight finish (up to ``grace`` seconds; any
        command still running then is logged as abandoned), close every connection, and
        remove the socket files bound here (never inherited ones).

        The grace is for commands doing work, not for peers: a connection whose output is
        backed up at two checks ``UNREAD_CHECK`` seconds apart (its peer did not catch up in
        between) is dropped, and a command waiting to send it more (a replay) ends with it.
        So a peer that stops reading cannot hold the daemon's exit."""
        self.stopping = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.wake()
        tasks = {c.task: c for c in self.connections if c.task is not None}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        unread: set[Connection] = set()
        while tasks:
            left = deadline - loop.time()
            if left <= 0:
                break
            done, _ = await asyncio.wait(tasks, timeout=min(UNREAD_CHECK, left))
            for task in done:
                del tasks[task]
            backed_up = {c for c in tasks.values() if c.backed_up}
            for conn in backed_up & unread:
                conn.drop_unread()
            unread = backed_up
        for task, conn in tasks.items():
            if not task.done():
                log.error(
                    "abandoned the command in flight of %s: still running after %s s",
                    conn.peer,
                    grace,
                    extra={"fields": {**conn.fields, "event": "abandoned"}},
                )
        for conn in list(self.connections) + list(self._lingering):
            conn.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        for bound in self._created:
            bound.remove()
        self._created.clear()
