"""Where the daemon's socket and directories are by default: rules shared by daemon and client.

Kept apart from :mod:`ramd.config` (and free of pathlib) so that a client (``ramctl``) can
find the socket without importing pydantic; :mod:`ramd.config` turns these into
:class:`~pathlib.Path` defaults. Every function reads the environment at each call.

The socket and ``memory-dir`` share one runtime directory (tmpfs): ``$XDG_RUNTIME_DIR/ramd``
for a user with a login session, else ``/run/ramd``, which only root can create (systemd's
``RuntimeDirectory=ramd`` makes it for the unit's user), so no other user can take it first.
``state-dir`` follows systemd's ``StateDirectory=``, else the user's XDG state directory; root
without systemd keeps ``/var/lib/ramd``.
"""

from __future__ import annotations

import os
import pwd

__all__ = [
    "SYSTEM_RUNTIME_DIR",
    "SYSTEM_STATE_DIR",
    "default_memory_dir",
    "default_socket",
    "default_state_dir",
    "runtime_dir",
]

#: The runtime directory when ``XDG_RUNTIME_DIR`` is unset (root, or the unit's user).
SYSTEM_RUNTIME_DIR = "/run/ramd"
#: ``state-dir`` of root when systemd's ``StateDirectory=`` sets nothing.
SYSTEM_STATE_DIR = "/var/lib/ramd"


def runtime_dir() -> str:
    """``$XDG_RUNTIME_DIR/ramd``, else ``/run/ramd``."""
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(xdg, "ramd")
    return SYSTEM_RUNTIME_DIR


def default_socket() -> str:
    """Protocol rule: ``$RAMD_SOCKET``, else ``$XDG_RUNTIME_DIR/ramd/ramd.sock``, else
    ``/run/ramd/ramd.sock``."""
    if env := os.environ.get("RAMD_SOCKET"):
        return env
    return os.path.join(runtime_dir(), "ramd.sock")


def default_memory_dir() -> str:
    """``memory-dir``: ``memory`` in the socket's runtime directory,
    ``$XDG_RUNTIME_DIR/ramd/memory``, else ``/run/ramd/memory``."""
    return os.path.join(runtime_dir(), "memory")


def default_state_dir() -> str:
    """``state-dir``: ``$STATE_DIRECTORY`` (its first entry: systemd's ``StateDirectory=``);
    else ``/var/lib/ramd`` for root; else ``$XDG_STATE_HOME/ramd`` (when absolute, as the XDG
    specification requires), else ``~/.local/state/ramd``. ``~`` is ``$HOME`` (when absolute),
    else the home of the effective uid's passwd entry; a user with neither gets
    ``/var/lib/ramd``, which the daemon then reports unusable at start."""
    if env := os.environ.get("STATE_DIRECTORY", "").split(":")[0]:
        return env
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "ramd")
    home = _home()
    if home is None:
        return SYSTEM_STATE_DIR
    return os.path.join(home, ".local", "state", "ramd")


def _home() -> str | None:
    """``$HOME`` when absolute, else the passwd entry's home of the effective uid."""
    home = os.environ.get("HOME", "")
    if os.path.isabs(home):
        return home
    try:
        entry = pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        return None
    return entry if os.path.isabs(entry) else None
