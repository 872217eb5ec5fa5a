"""ramd_client: the Python client library of ramd.

Asynchronous::

    import ramd_client

    async with await ramd_client.connect() as client:      # $RAMD_SOCKET, XDG, /run rule
        block = await client.ram_block_add("ram0", 64 << 20, max_size=1 << 30)
        async with client.events(replay=False) as events:
            await client.ram_block_resize("ram0", 128 << 20)
            async for event in events:                     # typed, bounded, in seq order
                print(event.name, event.seq, event.data)
                break

Blocking, for scripts::

    with ramd_client.Client() as client:
        print(client.query_ram_blocks())

Layers, each knowing only the one below: :mod:`~ramd_client.error` (exceptions, rooted at
:class:`RamdClientError`), :mod:`~ramd_client.message` (the JSON-RPC messages),
:mod:`~ramd_client.protocol` (one connection, one reader task, pipelined calls),
:mod:`~ramd_client.client` (typed commands) with :mod:`~ramd_client.events` (event
streams), then :mod:`~ramd_client.state` (block table mirror, :func:`resync`),
:mod:`~ramd_client.transfer` (chunked reads and writes), :mod:`~ramd_client.sync`
(:class:`Client`) and :mod:`~ramd_client.cli` (``ramctl``).

The package logs to the ``ramd_client`` logger, which has a ``NullHandler``: configure
logging in the application to see it.

The names below are imported on first use (PEP 562), so ``import ramd_client`` and the
light ``ramctl`` commands do not pay for pydantic and the models until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ramd.api.models import (
        CommandInfo,
        RamBlockAddedData,
        RamBlockInfo,
        RamBlockRemovedData,
        RamBlockResizedData,
        StatsResult,
        VersionResult,
    )
    from ramd_client.client import (
        AsyncClient,
        connect,
    )
    from ramd_client.error import (
        CallTimeout,
        ConnectError,
        ConnectionLost,
        EventOverflow,
        ProtocolError,
        RamdClientError,
        RamdError,
    )
    from ramd_client.events import (
        Event,
        EventStream,
    )
    from ramd_client.protocol import (
        Runstate,
    )
    from ramd_client.state import (
        BlockState,
        BlockTable,
        Resync,
        StateDiff,
        resync,
    )
    from ramd_client.sync import (
        Client,
        EventIterator,
    )

__all__ = [
    "AsyncClient",
    "BlockState",
    "BlockTable",
    "CallTimeout",
    "Client",
    "CommandInfo",
    "ConnectError",
    "ConnectionLost",
    "Event",
    "EventIterator",
    "EventOverflow",
    "EventStream",
    "ProtocolError",
    "RamBlockAddedData",
    "RamBlockInfo",
    "RamBlockRemovedData",
    "RamBlockResizedData",
    "RamdClientError",
    "RamdError",
    "Resync",
    "Runstate",
    "StateDiff",
    "StatsResult",
    "VersionResult",
    "connect",
    "resync",
]

#: Where each public name is defined.
_HOME: dict[str, str] = {
    "CommandInfo": "ramd.api.models",
    "RamBlockAddedData": "ramd.api.models",
    "RamBlockInfo": "ramd.api.models",
    "RamBlockRemovedData": "ramd.api.models",
    "RamBlockResizedData": "ramd.api.models",
    "StatsResult": "ramd.api.models",
    "VersionResult": "ramd.api.models",
    "AsyncClient": "ramd_client.client",
    "connect": "ramd_client.client",
    "CallTimeout": "ramd_client.error",
    "ConnectError": "ramd_client.error",
    "ConnectionLost": "ramd_client.error",
    "EventOverflow": "ramd_client.error",
    "ProtocolError": "ramd_client.error",
    "RamdClientError": "ramd_client.error",
    "RamdError": "ramd_client.error",
    "Event": "ramd_client.events",
    "EventStream": "ramd_client.events",
    "Runstate": "ramd_client.protocol",
    "BlockState": "ramd_client.state",
    "BlockTable": "ramd_client.state",
    "Resync": "ramd_client.state",
    "StateDiff": "ramd_client.state",
    "resync": "ramd_client.state",
    "Client": "ramd_client.sync",
    "EventIterator": "ramd_client.sync",
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use and keep it (PEP 562)."""
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
