"""A mirror of the daemon's block table kept from events, and :func:`resync` to recover it.

Events are the one consistent view of the table: a subscription with ``replay`` returns the
table as of its ``seq`` and every change after it, with nothing missed and nothing twice.
When that chain breaks (the connection is lost, the daemon restarts, a consumer overflows),
:func:`resync` reconnects, subscribes again with replay, and reports what changed compared
to the table the caller had::

    table = BlockTable()
    while True:
        r = await ramd_client.resync(table, path)
        table = r.table                     # the daemon's table now; r.diff says what changed
        try:
            async for event in r.events:
                table.apply(event)
        except (ramd_client.ConnectionLost, ramd_client.EventOverflow):
            await r.client.close()          # and go round: resync again
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ramd.api.models import (
    EVENT_NAMES,
    RamBlockAddedData,
    RamBlockInfo,
    RamBlockRemovedData,
    RamBlockResizedData,
)
from ramd_client.client import AsyncClient, connect
from ramd_client.error import CallTimeout, ConnectError, ConnectionLost
from ramd_client.events import MAX_QUEUE, Event, EventStream

__all__ = ["BlockState", "BlockTable", "Resync", "StateDiff", "resync"]


@dataclass(frozen=True, slots=True)
class BlockState:
    """What the events tell about one block (a subset of ``RamBlockInfo``)."""

    id: str
    size: int
    max_size: int
    resizable: bool
    page_size: int
    host: int | None
    offset: int
    backend: str

    @classmethod
    def from_added(cls, data: RamBlockAddedData) -> BlockState:
        return cls(
            data.id,
            data.size,
            data.max_size,
            data.resizable,
            data.page_size,
            data.host,
            data.offset,
            data.backend,
        )

    @classmethod
    def from_info(cls, info: RamBlockInfo) -> BlockState:
        return cls(
            info.id,
            info.size,
            info.max_size,
            info.resizable,
            info.page_size,
            info.host,
            info.offset,
            info.backend,
        )

    def same_block(self, other: BlockState) -> bool:
        """True when ``other`` is this very block (possibly resized), not one deleted and
        created again under the same id: same mapping, same reservation."""
        return (self.host, self.offset, self.max_size, self.page_size, self.resizable) == (
            other.host,
            other.offset,
            other.max_size,
            other.page_size,
            other.resizable,
        )


@dataclass(frozen=True, slots=True)
class StateDiff:
    """How a table changed, by block id (each id in at most one tuple, in table order).

    ``resized``: the same block with another size; ``replaced``: the id names another block
    now (removed and added again: other mapping, contents lost).
    """

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    resized: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.resized or self.replaced)


class BlockTable:
    """Block id -> :class:`BlockState`, in creation order, updated by :meth:`apply`.

    ``seq`` is the seq of the last event applied (None for an empty new table). A plain
    object: owned by one task, no locking.
    """

    def __init__(self, blocks: Iterable[BlockState] = (), seq: int | None = None) -> None:
        self.blocks: dict[str, BlockState] = {b.id: b for b in blocks}
        self.seq = seq

    @classmethod
    def from_infos(cls, infos: Iterable[RamBlockInfo]) -> BlockTable:
        """A table of ``query-ram-blocks`` results."""
        return cls(BlockState.from_info(i) for i in infos)

    def apply(self, event: Event) -> None:
        """Update the table with one event (replayed or live)."""
        data = event.data
        if isinstance(data, RamBlockAddedData):
            self.blocks[data.id] = BlockState.from_added(data)
        elif isinstance(data, RamBlockResizedData):
            old = self.blocks.get(data.id)
            if old is not None:
                self.blocks[data.id] = BlockState(
                    old.id,
                    data.new_size,
                    data.max_size,
                    old.resizable,
                    old.page_size,
                    data.host,
                    old.offset,
                    old.backend,
                )
        elif isinstance(data, RamBlockRemovedData):
            self.blocks.pop(data.id, None)
        self.seq = event.seq

    def diff(self, new: BlockTable | Mapping[str, BlockState]) -> StateDiff:
        """What changed from this table to ``new``."""
        after = new.blocks if isinstance(new, BlockTable) else new
        added, resized, replaced = [], [], []
        for block_id, block in after.items():
            old = self.blocks.get(block_id)
            if old is None:
                added.append(block_id)
            elif not old.same_block(block):
                replaced.append(block_id)
            elif old.size != block.size:
                resized.append(block_id)
        removed = [block_id for block_id in self.blocks if block_id not in after]
        return StateDiff(tuple(added), tuple(removed), tuple(resized), tuple(replaced))

    def __len__(self) -> int:
        return len(self.blocks)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self.blocks

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockTable):
            return NotImplemented
        return list(self.blocks.items()) == list(other.blocks.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"BlockTable({list(self.blocks.values())!r}, seq={self.seq})"


@dataclass(slots=True)
class Resync:
    """The outcome of :func:`resync`: a fresh ``client`` and its subscribed ``events``
    (positioned after the replay: the next event is the first change after ``seq``), the
    daemon's ``table`` as of ``seq``, and the ``diff`` from the table the caller knew."""

    client: AsyncClient
    events: EventStream
    table: BlockTable
    diff: StateDiff
    seq: int
    attempts: int = field(default=1)


async def resync(
    known: BlockTable | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    max_queue: int = MAX_QUEUE,
    call_timeout: float | None = None,
) -> Resync:
    """Reconnect (retrying until ``timeout`` seconds), subscribe to every event with replay,
    rebuild the table from the replay and return it with its difference from ``known``.

    Retries while the socket is missing, refuses or does not answer (a daemon restarting),
    waiting ``interval`` seconds, doubled up to 1 s, between attempts; raises the last
    :class:`~ramd_client.error.ConnectError` after ``timeout``. ``call_timeout`` is the new
    client's ``timeout`` (:func:`ramd_client.connect`): each connection attempt and each call
    give up after that long. ``known`` is not modified. Caller side.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    attempts = 0
    while True:
        attempts += 1
        try:
            client = await connect(path, timeout=call_timeout)
        except ConnectError:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        try:
            events = client.events(EVENT_NAMES, replay=True, max_queue=max_queue)
            seq = await events.subscribe()
            table = BlockTable(seq=seq)
            for _ in range(events.replayed):
                table.apply(await anext(events))
        except (ConnectionLost, CallTimeout):
            await client.close()
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        except BaseException:
            await client.close()
            raise
        table.seq = seq
        diff = (known or BlockTable()).diff(table)
        return Resync(client, events, table, diff, seq, attempts)
