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
"""

from __future__ import annotations

import logging

from ramd.api.models import (
    CommandInfo,
    RamBlockAddedData,
    RamBlockInfo,
    RamBlockRemovedData,
    RamBlockResizedData,
    StatsResult,
    VersionResult,
)
from ramd_client.client import AsyncClient, connect
from ramd_client.error import (
    ConnectError,
    ConnectionLost,
    EventOverflow,
    ProtocolError,
    RamdClientError,
    RamdError,
)
from ramd_client.events import Event, EventStream
from ramd_client.protocol import Runstate
from ramd_client.state import BlockState, BlockTable, Resync, StateDiff, resync
from ramd_client.sync import Client, EventIterator

__all__ = [
    "AsyncClient",
    "BlockState",
    "BlockTable",
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

logging.getLogger(__name__).addHandler(logging.NullHandler())
