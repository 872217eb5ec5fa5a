"""Holders: the processes that hold a RAM block's memory, and the acknowledgements that a
release of that memory waits for (docs/protocol.md §8, §12, §13).

A block's holders are of three kinds:

- ``mapper``: a connection that received an fd of the block; it gets the block's events and
  acknowledges every shrink and removal before the memory goes (``ram-block-ack``);
- ``lease``: an fd holder that speaks no ramd (a program started by ``ramctl exec``); while
  one exists the block cannot shrink or be removed;
- ``vmm``: a VMM the block is attached to; a lease with an attachment behind it.

One :class:`Holders` registry per RAM list keeps them all. The one resize/remove operation
(:mod:`ramd.ramblock.change`) consults it: it refuses what leases forbid and waits, with an
:class:`AckWait`, for the mappers. ``owner`` is opaque here (a session, an attachment): a
holder is identified by its block, owner and kind; the same owner may hold a block both as
mapper and as lease.

File access follows the holders (docs/protocol.md §8): while a holder of another uid holds a
shared block, that uid may open the block's file as its fd allows (read-write, or read-only
when every fd it was given is read-only), through the file's grants
(:class:`~ramd.hostmem.grants.UidGrants`); the grant ends with the uid's last holding. A
block whose memory is freed needs nothing: its grants go with its fd.

Ownership and thread: owned by whoever owns the RAM list; loop thread only. ``on_change``
runs after every change of a block's holders (counts shown in ``RamBlockInfo``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ramd.hostmem.shared import FdMemory

if TYPE_CHECKING:
    from ramd.ramblock.block import RAMBlock

Kind = Literal["mapper", "lease", "vmm"]
KINDS: tuple[Kind, ...] = ("mapper", "lease", "vmm")


@dataclass(eq=False, slots=True)
class Holder:
    """One owner's holding of one block. ``readonly``: every fd it was given is read-only
    (so it can never write the block). ``disconnect`` ends the owner's connection (a mapper
    that did not acknowledge in time)."""

    kind: Kind
    owner: object
    pid: int
    uid: int
    readonly: bool
    disconnect: Callable[[], None]


class AckWait:
    """One release of a block waiting for its mappers' acknowledgements of event ``seq``.

    ``pending`` is who has not acknowledged yet; it shrinks as mappers acknowledge, put
    their fd back or close. ``on_change(n)`` is told the number still awaited.
    """

    def __init__(
        self, block: RAMBlock, seq: int, pending: list[Holder], on_change: Callable[[int], None]
    ) -> None:
        self.block = block
        self.seq = seq
        self.pending = pending
        self._on_change = on_change
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not pending:
            self._done.set_result(None)

    def settle(self, holder: Holder) -> None:
        """``holder`` no longer touches the memory being released."""
        if holder in self.pending:
            self.pending.remove(holder)
            self._on_change(len(self.pending))
        if not self.pending and not self._done.done():
            self._done.set_result(None)

    async def wait(self, timeout: float) -> list[Holder]:
        """Wait up to ``timeout`` seconds; the mappers that did not acknowledge in time."""
        if self.pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._done), timeout)
        return list(self.pending)


class Holders:
    """Who holds which block, and the releases waiting for them."""

    def __init__(self, on_change: Callable[[RAMBlock], None] = lambda block: None) -> None:
        self.on_change = on_change
        self._by_block: dict[RAMBlock, list[Holder]] = {}
        self._by_owner: dict[object, set[RAMBlock]] = {}
        self._waits: dict[RAMBlock, AckWait] = {}

    def of(self, block: RAMBlock, kind: Kind | None = None) -> list[Holder]:
        """The holders of ``block`` (of one ``kind``), oldest first."""
        holders = self._by_block.get(block, [])
        return list(holders) if kind is None else [h for h in holders if h.kind == kind]

    def count(self, block: RAMBlock, kind: Kind) -> int:
        return sum(1 for h in self._by_block.get(block, ()) if h.kind == kind)

    def blocks_of(self, owner: object) -> set[RAMBlock]:
        """The blocks ``owner`` holds (any kind)."""
        return set(self._by_owner.get(owner, ()))

    def find(self, block: RAMBlock, owner: object, kind: Kind) -> Holder | None:
        for h in self._by_block.get(block, ()):
            if h.owner is owner and h.kind == kind:
                return h
        return None

    def add(self, block: RAMBlock, holder: Holder) -> Holder:
        """Record ``holder``; if its owner already holds ``block`` as that kind, that holding
        is kept (and is read-only only while every fd given was)."""
        same = self.find(block, holder.owner, holder.kind)
        if same is not None:
            if same.readonly and not holder.readonly:
                same.readonly = False
                _grant(block, same)
                self.on_change(block)
            return same
        _grant(block, holder)
        self._by_block.setdefault(block, []).append(holder)
        self._by_owner.setdefault(holder.owner, set()).add(block)
        self.on_change(block)
        return holder

    def remove(self, block: RAMBlock, owner: object) -> bool:
        """``owner`` no longer holds ``block`` (any kind); False if it held nothing."""
        holders = self._by_block.get(block)
        if not holders:
            return False
        gone = [h for h in holders if h.owner is owner]
        if not gone:
            return False
        holders[:] = [h for h in holders if h.owner is not owner]
        for h in gone:
            _ungrant(block, h)
        if not holders:
            del self._by_block[block]
        blocks = self._by_owner.get(owner)
        if blocks is not None:
            blocks.discard(block)
            if not blocks:
                del self._by_owner[owner]
        wait = self._waits.get(block)
        if wait is not None:
            for h in gone:
                wait.settle(h)
        self.on_change(block)
        return True

    def drop(self, owner: object) -> None:
        """``owner`` is gone (its connection closed, its VMM exited): it holds nothing."""
        for block in list(self._by_owner.get(owner, ())):
            self.remove(block, owner)

    def forget(self, block: RAMBlock) -> None:
        """``block`` is gone (its memory released): nobody holds it any more."""
        for holder in self._by_block.pop(block, []):
            blocks = self._by_owner.get(holder.owner)
            if blocks is not None:
                blocks.discard(block)
                if not blocks:
                    del self._by_owner[holder.owner]
        self._waits.pop(block, None)
        self.on_change(block)

    def expect(self, block: RAMBlock, seq: int, on_change: Callable[[int], None]) -> AckWait:
        """Start waiting for every current mapper of ``block`` to acknowledge event
        ``seq``; ``on_change(n)`` is told how many are still awaited."""
        wait = AckWait(block, seq, self.of(block, "mapper"), on_change)
        self._waits[block] = wait
        return wait

    def done(self, wait: AckWait) -> None:
        if self._waits.get(wait.block) is wait:
            del self._waits[wait.block]

    def ack(self, owner: object, seq: int) -> bool:
        """``owner`` acknowledges event ``seq``; False if it owed no such acknowledgement."""
        for wait in self._waits.values():
            if wait.seq != seq:
                continue
            for holder in wait.pending:
                if holder.owner is owner:
                    wait.settle(holder)
                    return True
        return False


def _grant(block: RAMBlock, holder: Holder) -> None:
    """``holder``'s uid may open ``block``'s file as its fd allows."""
    if isinstance(block.mem, FdMemory):
        block.mem.grants.hold(holder, holder.uid, not holder.readonly)


def _ungrant(block: RAMBlock, holder: Holder) -> None:
    if isinstance(block.mem, FdMemory) and block.mem.fd >= 0:
        block.mem.grants.unhold(holder)
