"""The complete command table: importing this module registers every command.

Each command module registers its commands in :data:`ramd.api.table.COMMANDS` with the
:func:`~ramd.api.table.command` decorator; this module imports them all, in the order
``query-commands`` lists them, and is what the dialects and the schema read.
"""

from __future__ import annotations

from ramd.api import (
    attach,
    block_commands,
    fd_commands,
    images,
    session_commands,
    snapshots,
    template_commands,
)
from ramd.api.session_commands import version_triple
from ramd.api.table import COMMANDS, Command, Raw, WithFds

__all__ = [
    "COMMANDS",
    "Command",
    "Raw",
    "WithFds",
    "attach",
    "block_commands",
    "fd_commands",
    "images",
    "session_commands",
    "snapshots",
    "template_commands",
    "version_triple",
]
