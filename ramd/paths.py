"""Where the daemon's socket is by default: the protocol's rule, shared by daemon and client.

Kept apart from :mod:`ramd.config` so that a client (``ramctl``) can find the socket without
importing pydantic.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_socket_path"]


def default_socket_path() -> Path:
    """Protocol rule: ``$RAMD_SOCKET``, else ``$XDG_RUNTIME_DIR/ramd/ramd.sock``, else
    ``/run/ramd/ramd.sock``. Read from the environment at each call."""
    if env := os.environ.get("RAMD_SOCKET"):
        return Path(env)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "ramd" / "ramd.sock"
    return Path("/run/ramd/ramd.sock")
