"""Listeners and the set of live connections: bind, admit, shut down.

A listener is a Unix stream socket, either bound here (and removed at shutdown) or
inherited from systemd (never removed). Ownership and thread: the :class:`Server` owns the
listeners and the connections, on the loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ramd.api.service import Service
from ramd.config import Config
from ramd.logs import LogBudget
from ramd.transport.connection import Connection, DialectFactory
from ramd.transport.peer import Credentials

log = logging.getLogger("ramd.server")

#: Refused connections kept half-open at once (so their peers read the refusal); more are
#: closed at once.
MAX_LINGERING = 64


class AlreadyRunning(Exception):
    """Another daemon serves the socket path."""


@dataclass(frozen=True)
class Listener:
    """Where to listen: a path to bind, or an inherited fd. ``dialect`` names the protocol."""

    dialect: str
    path: Path | None = None
    fd: int | None = None


def bind_unix(path: Path, mode: int, group: str | int | None = None) -> socket.socket:
    """Bind a listening Unix socket at ``path`` with ``mode`` (and group).

    Refuses (:class:`AlreadyRunning`) if a live server answers on ``path``; replaces a stale
    socket file left by a dead one; creates the parent directory.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        else:
            raise AlreadyRunning(f"another daemon is already listening on {path}")
        finally:
            probe.close()
    elif path.exists() or path.is_symlink():
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if group is not None:
        gid = group if isinstance(group, int) else grp.getgrnam(group).gr_gid
        os.chown(path, -1, gid)
    sock.listen(128)
    sock.setblocking(False)
    return sock


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
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._created: list[Path] = []
        self._lingering: set[Connection] = set()
        self._refusal_log: dict[int, LogBudget] = {}

    async def start(self) -> None:
        """Bind or adopt every listener and start accepting."""
        loop = asyncio.get_running_loop()
        for lst in self.listeners:
            if lst.fd is not None:
                sock = adopt_fd(lst.fd)
            else:
                assert lst.path is not None
                sock = bind_unix(lst.path, self.config.socket_mode, self.config.socket_group)
                self._created.append(lst.path)
            factory = self.dialects[lst.dialect]
            srv = await loop.create_unix_server(partial(Connection, self, factory), sock=sock)
            self._servers.append(srv)
            log.info("listening (%s) on %s", lst.dialect, lst.path or f"fd {lst.fd}")

    def admit(self, conn: Connection, cred: Credentials) -> tuple[str, str | None]:
        """Access class of a new peer and, if it must be refused, why."""
        cfg = self.config
        uid, gid = cred.uid, cred.gid
        if self.stopping:
            return "full", "the daemon is shutting down"
        if len(self.connections) >= self.service.limits.max_connections:
            limit = self.service.limits.max_connections
            return "full", f"Limit exceeded: max-connections is {limit}"
        readonly = uid in cfg.readonly_uids or gid in cfg.readonly_gids
        allowed = (
            not (cfg.allow_uids or cfg.allow_gids) or uid in cfg.allow_uids or gid in cfg.allow_gids
        )
        if not readonly and not allowed:
            return "full", f"Permission denied: uid {uid} gid {gid} is not allowed"
        self.connections.add(conn)
        return ("readonly" if readonly else "full"), None

    def refusal(self, conn: Connection, reason: str) -> None:
        """Log a refused connection, at most a few lines per second per uid."""
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
        self.connections.discard(conn)
        self._lingering.discard(conn)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let each command in flight finish (up to ``grace`` seconds; any
        command still running then is logged as abandoned), close every connection, and
        remove the socket files bound here (never inherited ones)."""
        self.stopping = True
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            conn.wake()
        tasks = {c.task: c for c in self.connections if c.task is not None}
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                log.error(
                    "abandoned the command in flight of %s: still running after %s s",
                    tasks[task].peer,
                    grace,
                    extra={"fields": {**tasks[task].fields, "event": "abandoned"}},
                )
        for conn in list(self.connections) + list(self._lingering):
            conn.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 1.0)
        for path in self._created:
            path.unlink(missing_ok=True)
        self._created.clear()
