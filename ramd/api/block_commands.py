"""The block commands: add, delete, resize, list, read, write, discard (docs/protocol.md §5).

Resize and delete go through the block layer's one operation (:mod:`ramd.ramblock.change`),
which takes every pin it needs before a handler returns its awaitable. Loop thread.
"""

from __future__ import annotations

from collections.abc import Awaitable

import pybase64

from ramd.api import models as m
from ramd.api.blockinfo import json_list, with_resident
from ramd.api.limits import check_block_count, check_grow, check_io, create_block
from ramd.api.service import Session
from ramd.api.table import Raw, block_info, command
from ramd.errors import RamdError
from ramd.process import fdstore
from ramd.ramblock import RAMBlock, access, change
from ramd.ramblock.change import LOCK_INLINE_MAX
from ramd.ramblock.pins import Pin

#: Page scans (``resident``) of more used bytes than this run in a worker thread (``mincore``
#: reads about 1 GiB of page tables per ms).
SCAN_INLINE_MAX = 1024 * 1024 * 1024


@command("ram-block-add", m.RamBlockAddArgs, m.RamBlockInfo, audit=True)
def ram_block_add(session: Session, args: m.RamBlockAddArgs) -> Raw | Awaitable[Raw]:
    """Create a RAM block of ``size`` bytes; with ``max-size`` it is resizable up to that,
    the rest reserved but inaccessible. ``prealloc`` faults in every page first. With
    ``pool`` (and no other argument), take a ready block of that pool at once."""
    if args.pool is not None:
        return _add_from_pool(session, args, args.pool)
    ram = session.service.ram
    block = create_block(session.service, args)
    if args.prealloc or (args.lock and block.size > LOCK_INLINE_MAX):
        return _fill_and_commit(session, block)
    try:
        ram.fill(block)
    except BaseException:
        ram.abort(block)
        raise
    return _commit(session, block)


def _add_from_pool(session: Session, args: m.RamBlockAddArgs, pool: str) -> Raw:
    """``ram-block-add {id, pool}``: a ready block of ``pool`` committed as ``id`` at once
    (no allocation here), or a refusal at once when the pool is empty."""
    extra = sorted(args.model_fields_set - {"id", "pool"})
    if extra:
        given = ", ".join(f"'{name.replace('_', '-')}'" for name in extra)
        raise RamdError(f"A block from pool '{pool}' takes only 'id' (also given: {given})")
    check_block_count(session.service)
    block = session.service.pools.take(pool, args.id)
    fdstore.push(block)
    return block_info(session, block)


async def _fill_and_commit(session: Session, block: RAMBlock) -> Raw:
    """Lock and fault the block in on a worker thread, then commit it on the loop thread.

    The block stays uncommitted (invisible, its id "busy") while the thread runs; it is
    freed if that fails, and only once the thread is done with it.
    """
    ram = session.service.ram
    try:
        await session.service.in_worker(lambda: ram.fill(block))
    except BaseException:
        ram.abort(block)
        raise
    return _commit(session, block)


def _commit(session: Session, block: RAMBlock) -> Raw:
    """Make a filled block visible (``added`` notified), hand its fd to the fd store, and
    answer its ``RamBlockInfo``."""
    session.service.ram.commit(block)
    fdstore.push(block)
    return block_info(session, block)


@command("ram-block-del", m.RamBlockDelArgs, m.Empty, audit=True)
def ram_block_del(session: Session, args: m.RamBlockDelArgs) -> m.Empty | Awaitable[m.Empty]:
    """Remove a RAM block and unmap all of its memory (after every mapper acknowledged)."""
    service = session.service
    pending = change.remove(service.ram, args.id, mode=args.mode, waiting=service.waiting)
    if pending is None:
        return m.Empty()
    return _empty_after(pending)


async def _empty_after(pending: Awaitable[None]) -> m.Empty:
    await pending
    return m.Empty()


@command("ram-block-resize", m.RamBlockResizeArgs, m.RamBlockInfo, audit=True)
def ram_block_resize(session: Session, args: m.RamBlockResizeArgs) -> Raw | Awaitable[Raw]:
    """Grow or shrink a resizable RAM block in place (no-op at the current size). A block
    attached as virtio-mem: ask the guest to plug ``size`` bytes (0 included); the answer
    comes at once, the size follows what the guest plugs (``RAM_BLOCK_RESIZED``)."""
    service = session.service
    result = change.resize(
        service.ram,
        args.id,
        args.size,
        mode=args.mode,
        waiting=service.waiting,
        check_grow=lambda block, grow: check_grow(service, block, grow),
    )
    if isinstance(result, RAMBlock):
        return block_info(session, result)
    return _info_after(session, result)


async def _info_after(session: Session, pending: Awaitable[RAMBlock]) -> Raw:
    return block_info(session, await pending)


@command("query-ram-blocks", m.QueryRamBlocksArgs, m.RamBlockInfoList, readonly=True)
def query_ram_blocks(session: Session, args: m.QueryRamBlocksArgs) -> Raw | Awaitable[Raw]:
    """List the RAM blocks in creation order, or only the one named ``id``. ``resident``
    adds the bytes of each block resident in RAM (a scan of its pages)."""
    ram, infos = session.service.ram, session.service.infos
    with_host = not session.readonly
    if args.id is None and not args.resident:
        return Raw(infos.listing(with_host))
    blocks = [ram.get(args.id)] if args.id is not None else list(ram)
    texts = [infos.info(b, with_host) for b in blocks]
    if not args.resident:
        return Raw(json_list(texts))
    if sum(b.size for b in blocks) <= SCAN_INLINE_MAX:
        return Raw(json_list(list(map(with_resident, texts, map(resident, blocks)))))
    return _with_resident(session, blocks, texts)


async def _with_resident(session: Session, blocks: list[RAMBlock], texts: list[bytes]) -> Raw:
    counts = await session.service.in_worker(lambda: [resident(b) for b in blocks])
    return Raw(json_list(list(map(with_resident, texts, counts))))


def resident(block: RAMBlock) -> int:
    """Resident bytes of a block, from a worker thread. ``mincore`` only reads page tables:
    a block unmapped meanwhile by the loop thread gives an error here (counted as 0),
    never a fault."""
    try:
        return block.resident()
    except OSError:
        return 0


@command("ram-block-read", m.RamBlockReadArgs, m.ReadResult)
def ram_block_read(session: Session, args: m.RamBlockReadArgs) -> Raw:
    """Read ``length`` bytes at ``offset`` of the used range, base64-encoded."""
    check_io(session.service, args.length)
    data = session.service.ram.read(args.id, args.offset, args.length)
    # base64 needs no JSON escaping: the answer is spliced, never built as a str and encoded
    return Raw(b'{"data":"%s"}' % pybase64.b64encode(data))


@command("ram-block-write", m.RamBlockWriteArgs, m.WriteResult)
def ram_block_write(session: Session, args: m.RamBlockWriteArgs) -> m.WriteResult:
    """Write base64 ``data`` at ``offset`` of the used range."""
    check_io(session.service, len(args.data))
    return m.WriteResult(written=session.service.ram.write(args.id, args.offset, args.data))


@command("ram-block-discard", m.RamBlockDiscardArgs, m.Empty)
def ram_block_discard(
    session: Session, args: m.RamBlockDiscardArgs
) -> m.Empty | Awaitable[m.Empty]:
    """Drop the pages of a page-aligned range: it reads back as zeros, its memory is freed."""
    service = session.service
    block = access.check_discard(service.ram, args.id, args.offset, args.length)
    if not (block.lock and args.length > LOCK_INLINE_MAX):
        access.drop_range(block, args.offset, args.length)
        return m.Empty()
    # a locked range is faulted in again: off the loop thread, the block pinned meanwhile
    pin = block.pins.take("a range of it is being discarded")
    return service.waiting.spawn(_drop_pinned(session, block, pin, args.offset, args.length))


async def _drop_pinned(
    session: Session, block: RAMBlock, pin: Pin, offset: int, length: int
) -> m.Empty:
    try:
        await session.service.in_worker(lambda: access.drop_range(block, offset, length))
    finally:
        pin.release()
    return m.Empty()
