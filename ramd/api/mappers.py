"""Mappers: the sessions that hold an fd of a shared block, and the acknowledgements that a
shrink or removal of that block waits for before its memory is released (protocol.md §8).

A session becomes a mapper of a block when ``ram-block-get-fd`` gives it an fd, and stops at
``ram-block-put-fd`` or when it closes. A release that must wait takes a snapshot of the
block's mappers (:meth:`Mappers.expect`); each one leaves the wait by ``ram-block-ack`` with
the event's ``seq``, by ``ram-block-put-fd``, or by closing. ``RAMBlock.mappers`` is the count
(shown in ``RamBlockInfo``); the block info cache is refreshed whenever it changes.

Ownership and thread: owned by the :class:`~ramd.api.service.Service`; loop thread only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ramd.api import access
from ramd.ramblock import RAMBlock

if TYPE_CHECKING:
    from ramd.api.service import Session


class AckWait:
    """One release waiting for its mappers: ``pending`` is who has not acknowledged yet."""

    def __init__(self, block: RAMBlock, pending: set[Session], on_change: Callable[[], None]):
        self.block = block
        self.pending = pending
        self.seq = 0
        self._on_change = on_change
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def settle(self, session: Session) -> None:
        """``session`` no longer touches the released memory."""
        self.pending.discard(session)
        self._on_change()
        if not self.pending and not self._done.done():
            self._done.set_result(None)

    async def wait(self, timeout: float) -> set[Session]:
        """Wait up to ``timeout`` seconds; the mappers that did not acknowledge in time."""
        if self.pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._done), timeout)
        return set(self.pending)


class Mappers:
    """Who maps which block, and the releases waiting for them."""

    def __init__(self, refresh: Callable[[RAMBlock], None]) -> None:
        self._refresh = refresh
        self._by_block: dict[RAMBlock, set[Session]] = {}
        self._waits: dict[RAMBlock, AckWait] = {}

    def of(self, block: RAMBlock) -> set[Session]:
        return self._by_block.get(block, set())

    def add(self, block: RAMBlock, session: Session) -> None:
        sessions = self._by_block.setdefault(block, set())
        if session not in sessions:
            sessions.add(session)
            session.mapped.add(block)
            self._changed(block)

    def remove(self, block: RAMBlock, session: Session) -> bool:
        """``session`` stops mapping ``block``; False if it did not map it."""
        sessions = self._by_block.get(block)
        if sessions is None or session not in sessions:
            return False
        sessions.discard(session)
        session.mapped.discard(block)
        access.unhold(block, session)
        if not sessions:
            del self._by_block[block]
        self._changed(block)
        wait = self._waits.get(block)
        if wait is not None:
            wait.settle(session)
        return True

    def drop(self, session: Session) -> None:
        """``session`` closed: it maps nothing any more."""
        for block in list(session.mapped):
            self.remove(block, session)

    def forget(self, block: RAMBlock) -> None:
        """``block`` is gone (its memory released)."""
        for session in self._by_block.pop(block, set()):
            session.mapped.discard(block)
        self._waits.pop(block, None)

    def expect(self, block: RAMBlock, busy: Callable[[int], None]) -> AckWait:
        """Start waiting for every current mapper of ``block``; ``busy(n)`` is called with
        the number still awaited whenever it changes."""
        pending = set(self.of(block))
        wait = AckWait(block, pending, lambda: busy(len(pending)))
        busy(len(pending))
        self._waits[block] = wait
        return wait

    def done(self, wait: AckWait) -> None:
        if self._waits.get(wait.block) is wait:
            del self._waits[wait.block]

    def ack(self, session: Session, seq: int) -> bool:
        """``session`` acknowledges event ``seq``; False if it owed no such acknowledgement."""
        for wait in self._waits.values():
            if wait.seq == seq and session in wait.pending:
                wait.settle(session)
                return True
        return False

    def _changed(self, block: RAMBlock) -> None:
        block.mappers = len(self._by_block.get(block, ()))
        self._refresh(block)
