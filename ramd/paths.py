"""Where the daemon's socket is by default: the protocol's rule, shared by daemon and client.

Kept apart from :mod:`ramd.config` (and free of pathlib) so that a client (``ramctl``) can
find the socket without importing pydantic; :func:`ramd.config.default_socket_path` is the
same rule as a :class:`~pathlib.Path`.
"""

from __future__ import annotations

import os

__all__ = ["default_socket"]


def default_socket() -> str:
    """Protocol rule: ``$RAMD_SOCKET``, else ``$XDG_RUNTIME_DIR/ramd/ramd.sock``, else
    ``/run/ramd/ramd.sock``. Read from the environment at each call."""
    if env := os.environ.get("RAMD_SOCKET"):
        return env
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(xdg, "ramd", "ramd.sock")
    return "/run/ramd/ramd.sock"
