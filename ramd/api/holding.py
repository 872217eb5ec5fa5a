"""Sessions as holders of blocks: ``ram-block-get-fd`` makes a connection a mapper (or, with
``lease``, a lease holder) of a block, ``ram-block-put-fd`` or closing ends it, and
``ram-block-ack`` settles what a release waits for (docs/protocol.md §8, §12).

The holders themselves live in the block layer (:class:`~ramd.ramblock.holders.Holders`,
owned by the RAM list); this adapter only turns a session into a holder (its peer's pid and
uid, its read-only fds, how to disconnect it) and back (the sessions that get a block's
events). Ownership and thread: owned by the :class:`~ramd.api.service.Service`; loop thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from ramd.ramblock import RAMBlock
from ramd.ramblock.holders import Holder, Holders

if TYPE_CHECKING:
    from ramd.api.service import Session


class SessionHolders:
    """The sessions' view of the block layer's holders."""

    def __init__(self, holders: Holders) -> None:
        self._holders = holders

    def of(self, block: RAMBlock) -> list[Session]:
        """The sessions that map ``block`` (they get its events and acknowledge)."""
        return [cast("Session", h.owner) for h in self._holders.of(block, "mapper")]

    def hold(self, block: RAMBlock, session: Session, *, lease: bool, readonly: bool) -> None:
        """``session`` received an fd of ``block``: it maps it (or leases it)."""
        holder = Holder(
            "lease" if lease else "mapper",
            session,
            session.pid,
            session.uid,
            readonly,
            session.closer,
        )
        self._holders.add(block, holder)

    def put(self, block: RAMBlock, session: Session) -> bool:
        """``session`` no longer holds ``block``; False if it did not."""
        return self._holders.remove(block, session)

    def ack(self, session: Session, seq: int) -> bool:
        """``session`` acknowledges event ``seq``; False if it owed no such acknowledgement."""
        return self._holders.ack(session, seq)

    def drop(self, session: Session) -> None:
        """``session`` closed: it holds nothing any more (which counts as acknowledging)."""
        self._holders.drop(session)

    def holds_any(self, session: Session) -> bool:
        return bool(self._holders.blocks_of(session))
