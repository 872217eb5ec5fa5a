"""A ``qemu.qmp`` client on a daemon's QMP socket, for the tests that talk QMP as QEMU's own
tooling does."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from qemu.qmp import QMPClient


@contextlib.asynccontextmanager
async def qmp_client(path: Path | None) -> AsyncIterator[QMPClient]:
    """A connected :class:`QMPClient` (capabilities negotiated), disconnected at the end, also
    when the daemon hung up first (``quit``)."""
    if path is None:
        raise ValueError("the daemon has no QMP socket (start it with qmp=True)")
    client = QMPClient("ramd-test")
    await client.connect(str(path))
    try:
        yield client
    finally:
        with contextlib.suppress(EOFError):
            await client.disconnect()
