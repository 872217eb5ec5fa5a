"""Hand-written systemd integration: ``sd_notify``, ``sd_listen_fds`` and the watchdog interval.

No libsystemd: the three protocols are a few environment variables and one datagram.

- :func:`notify` sends a state string (``"READY=1"``, ``"STOPPING=1"``, ``"WATCHDOG=1"``,
  ``"STATUS=..."``) to ``$NOTIFY_SOCKET``. It never raises on a send failure: systemd
  integration is best effort and must not take the daemon down.
- :func:`listen_fds` takes the sockets systemd passed on socket activation. They are the
  consecutive fds ``3 .. 3+LISTEN_FDS-1``, meant for the process whose pid is ``LISTEN_PID``;
  on return each has ``FD_CLOEXEC`` set, so they do not leak into children. The caller owns
  them from then on.
- :func:`watchdog_interval` says how often to send ``WATCHDOG=1``, if at all.

All three only read the process environment (``listen_fds`` may also unset variables) and
hold no state; they are meant to be called from the main thread at start-up (``listen_fds``,
``watchdog_interval``) and from the event loop thread afterwards (``notify``).
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Sequence

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify", "watchdog_interval"]

logger = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
"""The first fd that systemd passes on socket activation."""

_NOTIFY_TIMEOUT = 2.0
"""Longest a :func:`notify` call may block when the manager's receive queue is full."""

_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def notify(message: str, fds: Sequence[int] = ()) -> bool:
    """Send ``message`` to the service manager; return whether it was sent.

    Returns ``False`` without doing anything when ``$NOTIFY_SOCKET`` is unset or empty (not
    running under systemd, or ``Type=`` without notification), or names an address family
    other than a Unix socket path (``/...``) or abstract name (``@...``). A send failure is
    logged at debug level and returns ``False``; it never raises. Each call uses its own
    short-lived socket, so it is safe from any thread; it blocks at most
    ``_NOTIFY_TIMEOUT`` seconds.

    ``fds`` go with the message as ``SCM_RIGHTS`` (``FDSTORE=1``); the caller keeps them.

    Raises :class:`ValueError` only for a caller bug: an empty ``message``.
    """
    if not message:
        raise ValueError("empty sd_notify message")
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        logger.debug("NOTIFY_SOCKET=%r: unsupported address, not notifying", address)
        return False

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_NOTIFY_TIMEOUT)
            if fds:
                sock.sendmsg(
                    [message.encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                    0,
                    address,
                )
            else:
                sock.sendto(message.encode(), address)
    except OSError as exc:
        logger.debug("sd_notify %r to %r failed: %s", message, address, exc)
        return False
    return True


def listen_fds(unset_environment: bool = True) -> list[tuple[int, str]]:
    """Return the ``(fd, name)`` pairs passed by socket activation, in fd order.

    The fds are ``3, 4, ...`` (:data:`SD_LISTEN_FDS_START`), as many as ``$LISTEN_FDS``, and
    only if ``$LISTEN_PID`` is this process's pid: the variables may have been inherited
    from a parent they were meant for, whose fds this process must not touch. Otherwise (or
    when the variables are unset) the result is ``[]``. Names come from the colon-separated
    ``$LISTEN_FDNAMES`` (``FileDescriptorName=`` in the socket unit); a missing or empty
    name is ``"unknown"``, extra names are ignored.

    Each returned fd gets ``FD_CLOEXEC``. With ``unset_environment`` (the default) the three
    variables are removed from ``os.environ`` on every path, even when they were not meant for
    us or were malformed, so a child process can never mistake them for its own.

    Raises :class:`ValueError` when ``$LISTEN_PID`` or ``$LISTEN_FDS`` is not a valid
    number (systemd never sets such values) and :class:`OSError` when an announced fd is not
    open.
    """
    try:
        return _listen_fds()
    finally:
        if unset_environment:
            for name in _LISTEN_ENV:
                os.environ.pop(name, None)


def _listen_fds() -> list[tuple[int, str]]:
    """Parse the ``LISTEN_*`` variables and mark the fds close-on-exec (see :func:`listen_fds`)."""
    pid_text = os.environ.get("LISTEN_PID")
    if not pid_text:
        return []
    pid = _parse_positive("LISTEN_PID", pid_text)
    if pid != os.getpid():
        logger.debug("LISTEN_PID=%d is not our pid %d: ignoring LISTEN_FDS", pid, os.getpid())
        return []

    count_text = os.environ.get("LISTEN_FDS")
    if not count_text:
        return []
    count = _parse_positive("LISTEN_FDS", count_text, allow_zero=True)
    if count > os.sysconf("SC_OPEN_MAX"):
        raise ValueError(f"LISTEN_FDS={count_text!r}: more fds than this process may hold")

    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    result: list[tuple[int, str]] = []
    for index in range(count):
        fd = SD_LISTEN_FDS_START + index
        os.set_inheritable(fd, False)  # sets FD_CLOEXEC; raises OSError(EBADF) if not open
        name = names[index] if index < len(names) else ""
        result.append((fd, name or "unknown"))
    return result


def watchdog_interval() -> float | None:
    """Return the seconds between two ``WATCHDOG=1`` pings, or ``None`` for no watchdog.

    The interval is half of ``$WATCHDOG_USEC`` (``WatchdogSec=``), as ``sd_watchdog_enabled``
    advises, so one late ping is not fatal. It is ``None`` when ``$WATCHDOG_USEC`` is unset or
    empty, or when ``$WATCHDOG_PID`` is set to another process's pid.

    Raises :class:`ValueError` when either variable is set but is not a positive number.
    """
    usec_text = os.environ.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = os.environ.get("WATCHDOG_PID")
    if pid_text and _parse_positive("WATCHDOG_PID", pid_text) != os.getpid():
        return None
    usec = _parse_positive("WATCHDOG_USEC", usec_text)
    return usec / 2 / 1_000_000


def _parse_positive(variable: str, text: str, *, allow_zero: bool = False) -> int:
    """Parse ``text`` as a plain decimal integer > 0 (>= 0 with ``allow_zero``)."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{variable}={text!r}: not a decimal number")
    if len(text.lstrip("0")) > 20:
        raise ValueError(f"{variable}={text!r}: out of range")
    value = int(text)
    if value == 0 and not allow_zero:
        raise ValueError(f"{variable}={text!r}: must be positive")
    return value
