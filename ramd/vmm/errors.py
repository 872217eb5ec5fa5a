"""Why driving a VMM failed (:mod:`ramd.vmm.link` raises them).

Apart from the link so that the registry can name them without importing ``qemu.qmp`` (which
imports ``ssl``, mapping OpenSSL): the daemon imports that only at its first attach.
"""

from __future__ import annotations


class VmmError(Exception):
    """The VMM could not be driven; ``str()`` is a sentence for the client."""


class VmmUnreachable(VmmError):
    """No QMP session with the VMM (connecting failed, or it timed out)."""


class VmmRefused(VmmError):
    """The VMM answered a command with an error; ``desc`` is its description."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class VmmTimeout(VmmError):
    """The VMM did not answer within the deadline."""


class VmmGone(VmmError):
    """The connection to the VMM closed before it answered."""
