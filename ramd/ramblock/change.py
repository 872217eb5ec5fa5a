"""The one resize/remove operation of a RAM block: checks, pin, map or wait for the holders,
notify, release or roll back (QEMU's ``qemu_ram_resize`` and ``qemu_ram_free``, extended
across processes by docs/protocol.md §8, §12 and §13).

Every resize and removal goes through :func:`resize` or :func:`remove`, whoever asks (a
command, a load, an in-process caller), and every size a VMM reports through :func:`follow`:
nothing else assembles the steps of :class:`~ramd.ramblock.RAMList`. The order is QEMU's:
grow = map the tail, then notify; shrink = notify, then release the tail; remove = notify,
then unmap.

A block sized by a VMM (:attr:`RAMBlock.sized_by`, an attached virtio-mem device) is resized
by its guest, not by the daemon: :func:`resize` becomes a request to the VMM (its limits
checked, the block pinned while the VMM answers; the size does not change), and
:func:`follow` takes each size the VMM reports as bookkeeping and a notification, with no
acknowledgement awaited and nothing released (the VMM freed the memory itself). Guards and
leases do not apply to either: the VMM that holds the lease is the one resizing.

- Refusals come first and change nothing: unknown block, pinned ("busy"), QEMU's size rules,
  the RAM list's guards (attachments, seals), leases (a leased block cannot shrink or be
  removed), the caller's limits (``check_grow``).
- A sealed block (:mod:`ramd.ramblock.seal`) cannot be resized, and is removed at once
  whatever its leases and mappers: its memory can never change, so nobody has anything to
  release first (processes that map it keep their mappings).
- A step that must wait — a large grow of a ``lock`` block (``mlock`` in a worker thread), a
  shrink or removal of a block that mappers hold (their acknowledgements) — pins the block
  *before* anything is returned, then returns an awaitable; the work runs to its end in a
  task of its own (:meth:`Waiting.spawn`) even if whoever asked goes away, and releases the
  pin exactly once. Without a :class:`Waiting` (in-process callers, a load's prepare step)
  nothing waits: the lock runs inline and a shrink or removal that mappers hold is refused.
- On an acknowledgement timeout, ``safe`` mode releases nothing if a mapper with a writable
  fd is late: it rolls the event back (``resized`` to the old size, or ``added``) and fails
  naming the late mappers' number; late read-only mappers never veto: they are disconnected
  and the release goes on. ``hard`` mode disconnects every late mapper and releases. Each
  late mapper is logged with its pid and uid, in both modes.

Thread: the loop thread that owns the RAM list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ramd.errors import RamdError
from ramd.ramblock.block import RAMBlock
from ramd.ramblock.holders import AckWait, Holder
from ramd.ramblock.pins import Pin

if TYPE_CHECKING:
    from ramd.ramblock.registry import RAMList

log = logging.getLogger("ramd.release")

T = TypeVar("T")
Mode = Literal["safe", "hard"]

#: ``mlock`` of a grown tail larger than this runs in a worker thread (it faults the range
#: in, at a few GiB/s), with the block pinned.
LOCK_INLINE_MAX = 64 * 1024 * 1024


class Waiting:
    """What the daemon lets a change wait for: acknowledgements within ``ack_timeout()``
    seconds of the event numbered ``last_seq()`` (the one just notified), and worker
    threads (``in_worker``). Keeps a reference to every change in progress."""

    def __init__(
        self,
        ack_timeout: Callable[[], float],
        last_seq: Callable[[], int],
        in_worker: Callable[[Callable[[], None]], Awaitable[None]],
    ) -> None:
        self.ack_timeout = ack_timeout
        self.last_seq = last_seq
        self.in_worker = in_worker
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, T]) -> Awaitable[T]:
        """Run ``work`` to its end in a task of its own; its result, for whoever waits (if
        that waiter is cancelled, the work goes on and still releases what it holds)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return asyncio.shield(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here: a waiter that went away cannot

    @property
    def in_progress(self) -> int:
        return len(self._tasks)


def resize(
    ram: RAMList,
    block_id: str,
    size: int,
    *,
    mode: Mode = "safe",
    waiting: Waiting | None = None,
    check_grow: Callable[[RAMBlock, int], None] | None = None,
) -> RAMBlock | Awaitable[RAMBlock]:
    """Resize block ``block_id`` to ``size`` (rounded up to its page size); the block, or
    an awaitable of it when the change must wait (see the module's docstring). For a block
    sized by a VMM: the awaitable of the request (:func:`_request`)."""
    block, new = ram.check_resize(block_id, size)
    if block.sized_by is not None:
        return _request(ram, block, new, waiting, check_grow)
    old = block.size
    if new == old:
        return block
    for guard in ram.guards:
        guard(block, new)
    if new > old:
        if check_grow is not None:
            check_grow(block, new - old)
        return _grow(ram, block, old, new, waiting)
    _refuse_leased(ram, block)
    ram.shrink_prepare(block, new)
    mappers = ram.holders.of(block, "mapper")
    if not mappers:
        ram.notifiers.notify_resized(block, old, new)
        ram.shrink_release(block, old, new)
        return block
    waiting = _must_wait(block, mappers, waiting)
    pin = block.pins.take(_waiting_for(len(mappers)), releasing=True)
    ram.notifiers.notify_resized(block, old, new)
    wait = _expect(ram, block, pin, waiting)
    return waiting.spawn(_finish_shrink(ram, block, pin, wait, old, new, mode, waiting))


def remove(
    ram: RAMList, block_id: str, *, mode: Mode = "safe", waiting: Waiting | None = None
) -> Awaitable[None] | None:
    """Remove block ``block_id``: notify ``removed``, then drop it, unmap it and delete
    its file (a ``file`` block's name goes too); None when done, or an awaitable when its
    mappers must acknowledge first."""
    block = ram.changeable(block_id)
    for guard in ram.guards:
        guard(block, None)
    if block.sealed:
        # its memory can never change: holders keep their own mappings, nobody must ack
        ram.notifiers.notify_removed(block)
        ram.release_removed(block)
        return None
    _refuse_leased(ram, block)
    mappers = ram.holders.of(block, "mapper")
    if not mappers:
        ram.notifiers.notify_removed(block)
        ram.release_removed(block)
        return None
    waiting = _must_wait(block, mappers, waiting)
    pin = block.pins.take(_waiting_for(len(mappers)), releasing=True)
    ram.notifiers.notify_removed(block)
    wait = _expect(ram, block, pin, waiting)
    return waiting.spawn(_finish_remove(ram, block, pin, wait, mode, waiting))


def follow(ram: RAMList, block: RAMBlock, new: int) -> None:
    """The VMM sizing ``block`` reports ``new`` bytes plugged (a multiple of the page size,
    at most ``max_size``: else :class:`RamdError`, nothing changed): the block takes that
    size, notified after a grow and before a shrink. No-op at the current size, or when no
    VMM sizes the block any more. Pins do not hold it back: the guest has changed the
    memory already, and the daemon's reads and writes of the file (``max_size`` long while
    a VMM sizes it) cannot fail for it."""
    old = block.size
    if block.sized_by is None or new == old:
        return
    if not 0 <= new <= block.max_size or new % block.page_size:
        raise RamdError(
            f"RAM block '{block.id}': the VMM reports an invalid size 0x{new:x} (max-size"
            f" 0x{block.max_size:x}, page size 0x{block.page_size:x})"
        )
    if new > old:
        ram.follow_size(block, new)
        ram.notifiers.notify_resized(block, old, new)
    else:
        ram.notifiers.notify_resized(block, old, new)
        ram.follow_size(block, new)


# -- a request to the VMM that sizes the block -------------------------------------------------


def _request(
    ram: RAMList,
    block: RAMBlock,
    new: int,
    waiting: Waiting | None,
    check_grow: Callable[[RAMBlock, int], None] | None,
) -> Awaitable[RAMBlock]:
    """Ask the VMM sizing ``block`` for ``new`` bytes: what the block counts as used may
    grow to ``new`` at once (``check_grow``); the block is pinned until the VMM answered,
    then ``requested_size`` is ``new``."""
    owner = block.sized_by
    if owner is None:
        raise RuntimeError(f"RAM block '{block.id}' is not sized by a VMM")
    if waiting is None:
        raise RamdError(
            f"RAM block '{block.id}' is sized by its VMM: a resize is a request to the VMM,"
            " which this caller cannot wait for"
        )
    grow = max(block.size, new) - block.charged
    if grow > 0 and check_grow is not None:
        check_grow(block, grow)
    pin = block.pins.take("its VMM is being asked to resize it")
    try:
        pending = owner.request(block, new)
    except BaseException:
        pin.release()
        raise
    return waiting.spawn(_requested(ram, block, pin, pending, new))


async def _requested(
    ram: RAMList, block: RAMBlock, pin: Pin, pending: Awaitable[None], new: int
) -> RAMBlock:
    try:
        await pending
    finally:
        pin.release()
    owner = block.sized_by
    if owner is not None:
        ram.request_size(block, new)
        owner.requested(block)
    return block


# -- grow --------------------------------------------------------------------------------------


def _grow(
    ram: RAMList, block: RAMBlock, old: int, new: int, waiting: Waiting | None
) -> RAMBlock | Awaitable[RAMBlock]:
    """Map ``[old, new)``, lock it if the block asks, then take the size and notify."""
    if block.lock and new - old > LOCK_INLINE_MAX and waiting is not None:
        pin = block.pins.take("it is being locked")
        try:
            ram.grow_map(block, old, new)
        except BaseException:
            pin.release()
            raise
        return waiting.spawn(_lock_grown(ram, block, pin, old, new, waiting))
    ram.grow_map(block, old, new)
    if block.lock:
        try:
            ram.lock_range(block, old, new - old)
        except BaseException:
            ram.grow_undo(block, old, new)
            raise
    ram.grow_commit(block, old, new)
    return block


async def _lock_grown(
    ram: RAMList, block: RAMBlock, pin: Pin, old: int, new: int, waiting: Waiting
) -> RAMBlock:
    try:
        await waiting.in_worker(lambda: ram.lock_range(block, old, new - old))
    except BaseException:
        ram.grow_undo(block, old, new)
        raise
    finally:
        pin.release()
    ram.grow_commit(block, old, new)
    return block


# -- shrink and remove: wait for the mappers ---------------------------------------------------


def _refuse_leased(ram: RAMList, block: RAMBlock) -> None:
    leases = ram.holders.count(block, "lease")
    if leases:
        raise RamdError(
            f"RAM block '{block.id}' is leased by {leases} process(es): it cannot shrink or be"
            " removed"
        )


def _must_wait(block: RAMBlock, mappers: list[Holder], waiting: Waiting | None) -> Waiting:
    """The means to wait for ``mappers``; refused when the caller cannot wait."""
    if waiting is None:
        raise RamdError(
            f"RAM block '{block.id}' is busy: {len(mappers)} mapper(s) must acknowledge first"
        )
    return waiting


def _waiting_for(n: int) -> str:
    return f"waiting for {n} mapper(s)"


def _expect(ram: RAMList, block: RAMBlock, pin: Pin, waiting: Waiting) -> AckWait:
    """Start waiting for the acknowledgements of the event just notified."""

    def still(n: int) -> None:
        pin.why = _waiting_for(n)

    return ram.holders.expect(block, waiting.last_seq(), still)


async def _settle(
    ram: RAMList, block: RAMBlock, pin: Pin, wait: AckWait, mode: Mode, waiting: Waiting
) -> int:
    """Wait for the acknowledgements; disconnect the late mappers that cannot veto. The
    number of late mappers that veto the release (0: release now)."""
    timeout = waiting.ack_timeout()
    try:
        late = await wait.wait(timeout)
    finally:
        ram.holders.done(wait)
        pin.release()
    vetoing = [h for h in late if mode == "safe" and not h.readonly]
    for holder in late:
        if holder in vetoing:
            _log_late(holder, wait, timeout, "kept (safe mode: nothing is released)")
        else:
            _log_late(holder, wait, timeout, "disconnected")
            ram.holders.remove(block, holder.owner)
            holder.disconnect()
    return len(vetoing)


def _log_late(holder: Holder, wait: AckWait, timeout: float, outcome: str) -> None:
    block_id = wait.block.id
    log.warning(
        "mapper pid %d uid %d did not acknowledge event %d of RAM block %r in %s s: %s",
        holder.pid,
        holder.uid,
        wait.seq,
        block_id,
        timeout,
        outcome,
        extra={
            "fields": {
                "event": "late-mapper",
                "block": block_id,
                "pid": holder.pid,
                "uid": holder.uid,
                "readonly": holder.readonly,
                "outcome": outcome,
            }
        },
    )


def _timed_out(block: RAMBlock, n: int) -> RamdError:
    return RamdError(f"Timed out waiting for {n} mapper(s) of RAM block '{block.id}'")


async def _finish_shrink(
    ram: RAMList,
    block: RAMBlock,
    pin: Pin,
    wait: AckWait,
    old: int,
    new: int,
    mode: Mode,
    waiting: Waiting,
) -> RAMBlock:
    vetoing = await _settle(ram, block, pin, wait, mode, waiting)
    if vetoing:
        ram.notifiers.notify_resized(block, new, old)
        raise _timed_out(block, vetoing)
    ram.shrink_release(block, old, new)
    return block


async def _finish_remove(
    ram: RAMList, block: RAMBlock, pin: Pin, wait: AckWait, mode: Mode, waiting: Waiting
) -> None:
    vetoing = await _settle(ram, block, pin, wait, mode, waiting)
    if vetoing:
        ram.notifiers.notify_added(block)
        raise _timed_out(block, vetoing)
    ram.release_removed(block)
