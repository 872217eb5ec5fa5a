"""A harness playing systemd's service manager with an fd store (not systemd): the daemon's
``FDSTORE=1`` messages are kept by ``FDNAME`` and passed back at the next start."""

from __future__ import annotations

import array
import os
import socket
import sys
from pathlib import Path

from daemon import Daemon

#: Execs the daemon command line after ``--`` with the fds given before it as fds 3, 4, ...
#: and ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` set, as systemd would (LISTEN_PID must
#: be the daemon's own pid, hence a wrapper that execs it).
WRAPPER = """
import fcntl, os, sys
args = sys.argv[1:]
sep = args.index("--")
names, fds, cmd = args[0], [int(a) for a in args[1:sep]], args[sep + 1:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
os.execv(cmd[0], cmd)
"""


class FakeManager:
    """The service manager's side of ``sd_notify`` with an fd store: a datagram socket at
    ``NOTIFY_SOCKET`` that keeps the fds of ``FDSTORE=1`` messages by ``FDNAME`` and drops
    them at ``FDSTOREREMOVE=1``. A test harness, not systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.stored: dict[str, int] = {}
        self.messages: list[dict[str, str]] = []

    def drain(self, quiet: float = 1.0) -> None:
        """Take every message until none came for ``quiet`` seconds."""
        self.sock.settimeout(quiet)
        while True:
            try:
                msg, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            except TimeoutError:
                return
            fds = array.array("i")
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            fields = dict(x.split("=", 1) for x in msg.decode().split("\n") if "=" in x)
            self.messages.append(fields)
            name = fields.get("FDNAME", "")
            if fields.get("FDSTORE") == "1" and len(fds) == 1:
                old = self.stored.pop(name, None)
                if old is not None:
                    os.close(old)
                self.stored[name] = fds[0]
                continue
            if fields.get("FDSTOREREMOVE") == "1" and name in self.stored:
                os.close(self.stored.pop(name))
            for fd in fds:
                os.close(fd)

    def start(self, tmp: Path, config: str = "") -> Daemon:
        """Start the daemon with the stored fds passed back."""
        tmp.mkdir()
        names, fds = list(self.stored), list(self.stored.values())
        wrap = [sys.executable, "-c", WRAPPER, ":".join(names), *map(str, fds), "--"]
        return Daemon(tmp, config, wrap=wrap, pass_fds=fds)

    def close(self) -> None:
        for fd in self.stored.values():
            os.close(fd)
        self.sock.close()
