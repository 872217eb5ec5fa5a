"""Shrinking and removing a block that other processes map: notify, wait for every mapper's
acknowledgement (or ``ack-timeout``), then release (protocol.md §8, QEMU's notifier order
extended across processes).

While it waits the block is pinned ("busy: waiting for N mapper(s)"); other blocks and
clients are not delayed (the wait is an awaitable outcome of this command only). On a
timeout, ``safe`` mode releases nothing: the command fails, and an event restoring the old
view (``RAM_BLOCK_RESIZED`` back to the old size, or ``RAM_BLOCK_ADDED``) is sent so every
mapper's view is whole again; ``hard`` mode disconnects the late mappers (logged with pid and
uid) and releases anyway. Loop thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ramd.api.service import Session
from ramd.errors import RamdError
from ramd.ramblock import RAMBlock

log = logging.getLogger("ramd.release")


def _busy(block: RAMBlock) -> Callable[[int], None]:
    def set_busy(n: int) -> None:
        block.busy = f"waiting for {n} mapper(s)"

    return set_busy


async def _await_mappers(session: Session, block: RAMBlock, mode: str) -> bool:
    """Wait for the acknowledgements of the event just sent; True to release now."""
    service = session.service
    wait = service.mappers.expect(block, _busy(block))
    wait.seq = service.broadcaster.seq
    try:
        late = await wait.wait(service.limits.ack_timeout)
    finally:
        service.mappers.done(wait)
        service.ram.unpin(block)
    if not late:
        return True
    if mode == "safe":
        return False
    for mapper in late:
        log.warning(
            "disconnecting %s: did not acknowledge event %d of RAM block %r in %s s",
            mapper.peer,
            wait.seq,
            block.id,
            service.limits.ack_timeout,
            extra={"fields": {**mapper.peer_fields, "event": "late-mapper", "block": block.id}},
        )
        service.mappers.drop(mapper)
        mapper.closer()
    return True


def _timed_out(block: RAMBlock, n: int) -> RamdError:
    return RamdError(f"Timed out waiting for {n} mapper(s) of RAM block '{block.id}'")


async def shrink(session: Session, block: RAMBlock, new: int, mode: str) -> None:
    """Shrink ``block`` (which has mappers) to ``new`` bytes."""
    ram = session.service.ram
    old = block.size
    ram.shrink_prepare(block, new)
    n = len(session.service.mappers.of(block))
    ram.pin(block, f"waiting for {n} mapper(s)")
    ram.notifiers.notify_resized(block, old, new)
    if not await _await_mappers(session, block, mode):
        ram.notifiers.notify_resized(block, new, old)
        raise _timed_out(block, n)
    ram.shrink_release(block, old, new)
    session.service.infos.refresh(block)  # mapper counts changed while the size was old


async def remove(session: Session, block: RAMBlock, mode: str) -> None:
    """Remove ``block`` (which has mappers)."""
    ram = session.service.ram
    n = len(session.service.mappers.of(block))
    ram.pin(block, f"waiting for {n} mapper(s)")
    ram.notifiers.notify_removed(block)
    if not await _await_mappers(session, block, mode):
        ram.notifiers.notify_added(block)
        raise _timed_out(block, n)
    session.service.mappers.forget(block)
    ram.release_removed(block)
