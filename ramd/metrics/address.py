"""``metrics-listen``: where ``GET /metrics`` is served (docs/protocol.md §15).

``"unix:PATH"``: a Unix stream socket at PATH, created like the daemon's other sockets (mode
``socket-mode``, group ``socket-group``). ``"HOST:PORT"``: TCP; HOST is an IP address (IPv6
in brackets: ``"[::1]:9187"``) or ``localhost``, and must be a loopback address unless
``metrics-remote = true`` (then any address or host name). PORT 0 takes a free port (the
log says which). Imports nothing of ``prometheus_client``: the config reads this module.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

UNIX_PREFIX = "unix:"


@dataclass(frozen=True)
class MetricsAddress:
    """A parsed ``metrics-listen``: ``path`` for a Unix socket, else ``host`` and ``port``."""

    path: Path | None = None
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.path is not None:
            return f"{UNIX_PREFIX}{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_metrics_address(text: str, *, remote: bool) -> MetricsAddress:
    """``text`` as a :class:`MetricsAddress`; ``ValueError`` (a message for the user) when
    it is malformed, or names a host that is not loopback and ``remote`` is false."""
    if text.startswith(UNIX_PREFIX):
        path = text.removeprefix(UNIX_PREFIX)
        if not path or "\0" in path:
            raise ValueError(f'{text!r}: "unix:" must be followed by a socket path')
        return MetricsAddress(path=Path(path))
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f'{text!r}: expected "unix:PATH" or "HOST:PORT"')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets: [ADDRESS]:PORT")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    if not remote and not _is_loopback(host):
        raise ValueError(
            f"{text!r}: {host} is not a loopback address (127.0.0.1, ::1, localhost); "
            "set metrics-remote = true to serve metrics to other hosts"
        )
    return MetricsAddress(host=host, port=int(port_text))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
