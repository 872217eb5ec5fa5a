"""The daemon's command-failure exception, shared by every layer below the wire.

A :class:`RamdError` is a refusal the client should see: it carries the QMP error class and
the exact message of the protocol. Anything else raised while serving a command is a bug.
"""

from __future__ import annotations


class RamdError(Exception):
    """A command failure with its QMP ``error_class`` and human ``desc``.

    ``errno`` is set when the failure comes from the kernel (e.g. ENOMEM on a grow).
    """

    def __init__(self, desc: str, error_class: str = "GenericError", errno: int | None = None):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
        self.errno = errno


class DeviceNotFound(RamdError):
    """The named RAM block does not exist."""

    def __init__(self, block_id: str):
        super().__init__(f"RAM block '{block_id}' not found", "DeviceNotFound")
