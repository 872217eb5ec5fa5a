"""The command table: every command's name, argument model, result model, handler and doc.

A handler takes the calling :class:`~ramd.api.service.Session` and its validated arguments
and returns a result model, or an awaitable of one when it must wait (prealloc runs in a
worker thread). It raises :class:`~ramd.errors.RamdError` to refuse. Handlers run on the loop
thread; all block changes are made there, so commands are serialised per block by
construction. Adding a command is one model plus one handler here.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel

import ramd
from ramd.api import models as m
from ramd.api.events import added_data, make_event
from ramd.api.service import Service, Session
from ramd.errors import RamdError
from ramd.hostmem.libc import host_page_size
from ramd.ramblock import RAMBlock

A = TypeVar("A", bound=BaseModel)
Handler = Callable[[Session, Any], Any]


@dataclass(frozen=True, slots=True)
class Command:
    """One entry of the table. ``readonly``: allowed to read-only peers."""

    name: str
    args: type[m.Args]
    result: type[BaseModel]
    handler: Handler
    doc: str
    readonly: bool


COMMANDS: dict[str, Command] = {}


def command(
    name: str, args: type[A], result: type[BaseModel], *, readonly: bool = False
) -> Callable[[Callable[[Session, A], Any]], Callable[[Session, A], Any]]:
    """Register the decorated handler as command ``name``; its docstring is the doc."""

    def register(fn: Callable[[Session, A], Any]) -> Callable[[Session, A], Any]:
        assert issubclass(args, m.Args)
        doc = " ".join((fn.__doc__ or "").split())
        COMMANDS[name] = Command(name, args, result, fn, doc, readonly)
        return fn

    return register


def block_info(block: RAMBlock) -> m.RamBlockInfo:
    return m.RamBlockInfo(
        id=block.id,
        size=block.size,
        max_size=block.max_size,
        resizable=block.resizable,
        page_size=block.page_size,
        host=block.host,
        offset=block.offset,
        backend=block.backend,
        prealloc=block.prealloc,
        merge=block.merge,
        dump=block.dump,
        hugepages=block.hugepages,
        lock=block.lock,
        resident=block.resident(),
    )


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _limit(name: str, value: int, detail: str) -> RamdError:
    return RamdError(f"Limit exceeded: {name} is {value}: {detail}")


def _check_add_limits(service: Service, args: m.RamBlockAddArgs) -> None:
    lim, ram = service.limits, service.ram
    page = host_page_size()
    size = _align_up(args.size, page)
    reserve = _align_up(max(args.max_size or size, size), page) + page
    if len(ram) >= lim.max_blocks:
        raise _limit("max-blocks", lim.max_blocks, f"{len(ram)} blocks exist")
    if lim.max_reserved and ram.reserved + reserve > lim.max_reserved:
        raise _limit(
            "max-reserved", lim.max_reserved, f"{ram.reserved} reserved, {reserve} more asked"
        )
    if lim.max_used and ram.used + size > lim.max_used:
        raise _limit("max-used", lim.max_used, f"{ram.used} used, {size} more asked")
    _check_host(service, size, touch=args.prealloc or args.lock, lock=args.lock)


def _check_host(service: Service, more: int, *, touch: bool, lock: bool) -> None:
    """Refuse ``more`` bytes of blocks that the host (cgroup, ``RLIMIT_MEMLOCK``) cannot hold;
    ``touch``: faulted in at once (prealloc, lock)."""
    refusal = service.host.refusal(service.ram.used, more, touch=touch, lock=lock)
    if refusal is not None:
        raise _limit(refusal.name, refusal.value, refusal.detail)


def _check_io(service: Service, length: int) -> None:
    if length > service.limits.io_chunk:
        raise _limit(
            "io-chunk", service.limits.io_chunk, f"{length} bytes asked; split the transfer"
        )


@command("ram-block-add", m.RamBlockAddArgs, m.RamBlockInfo)
def ram_block_add(
    session: Session, args: m.RamBlockAddArgs
) -> m.RamBlockInfo | Awaitable[m.RamBlockInfo]:
    """Create a RAM block of ``size`` bytes; with ``max-size`` it is resizable up to that,
    the rest reserved but inaccessible. ``prealloc`` faults in every page first."""
    service = session.service
    _check_add_limits(service, args)
    ram = service.ram
    block = ram.create(
        args.id,
        args.size,
        args.max_size,
        prealloc=args.prealloc,
        merge=args.merge,
        dump=args.dump,
        hugepages=args.hugepages,
        lock=args.lock,
        align=args.align,
    )
    if not args.prealloc:
        ram.commit(block)
        return block_info(block)
    return _preallocate_and_commit(service, block)


async def _preallocate_and_commit(service: Service, block: RAMBlock) -> m.RamBlockInfo:
    """Fault the block in on a worker thread, then commit it on the loop thread.

    The block stays uncommitted (invisible, its id "busy") while the thread runs. If this
    coroutine is cancelled, the block is freed only once the thread is done with it.
    """
    ram = service.ram
    fut = asyncio.get_running_loop().run_in_executor(None, ram.preallocate, block)
    try:
        await asyncio.shield(fut)
    except BaseException:
        if fut.done():
            ram.abort(block)
        else:
            fut.add_done_callback(lambda _: ram.abort(block))
        raise
    ram.commit(block)
    return block_info(block)


@command("ram-block-del", m.BlockIdArgs, m.Empty)
def ram_block_del(session: Session, args: m.BlockIdArgs) -> m.Empty:
    """Remove a RAM block and unmap all of its memory."""
    session.service.ram.remove(args.id)
    return m.Empty()


@command("ram-block-resize", m.RamBlockResizeArgs, m.RamBlockInfo)
def ram_block_resize(session: Session, args: m.RamBlockResizeArgs) -> m.RamBlockInfo:
    """Grow or shrink a resizable RAM block in place (no-op at the current size)."""
    service = session.service
    block = service.ram.get(args.id)
    lim = service.limits.max_used
    grow = _align_up(args.size, block.page_size) - block.size
    if lim and grow > 0 and service.ram.used + grow > lim:
        raise _limit("max-used", lim, f"{service.ram.used} used, {grow} more asked")
    _check_host(service, grow, touch=block.lock, lock=block.lock)
    return block_info(service.ram.resize(args.id, args.size))


@command("query-ram-blocks", m.QueryRamBlocksArgs, m.RamBlockInfoList, readonly=True)
def query_ram_blocks(session: Session, args: m.QueryRamBlocksArgs) -> m.RamBlockInfoList:
    """List the RAM blocks in creation order, or only the one named ``id``."""
    ram = session.service.ram
    blocks = [ram.get(args.id)] if args.id is not None else list(ram)
    return m.RamBlockInfoList([block_info(b) for b in blocks])


@command("ram-block-read", m.RamBlockReadArgs, m.ReadResult)
def ram_block_read(session: Session, args: m.RamBlockReadArgs) -> m.ReadResult:
    """Read ``length`` bytes at ``offset`` of the used range, base64-encoded."""
    _check_io(session.service, args.length)
    data = session.service.ram.read(args.id, args.offset, args.length)
    return m.ReadResult(data=base64.b64encode(data).decode("ascii"))


@command("ram-block-write", m.RamBlockWriteArgs, m.WriteResult)
def ram_block_write(session: Session, args: m.RamBlockWriteArgs) -> m.WriteResult:
    """Write base64 ``data`` at ``offset`` of the used range."""
    _check_io(session.service, len(args.data))
    return m.WriteResult(written=session.service.ram.write(args.id, args.offset, args.data))


@command("ram-block-discard", m.RamBlockDiscardArgs, m.Empty)
def ram_block_discard(session: Session, args: m.RamBlockDiscardArgs) -> m.Empty:
    """Drop the pages of a page-aligned range: it reads back as zeros, its memory is freed."""
    session.service.ram.discard(args.id, args.offset, args.length)
    return m.Empty()


@command("subscribe", m.SubscribeArgs, m.SubscribeResult, readonly=True)
def subscribe(session: Session, args: m.SubscribeArgs) -> m.SubscribeResult:
    """Receive events (all, or those named). With ``replay``, one ``RAM_BLOCK_ADDED`` per
    existing block is sent first, before this command's response."""
    names = session.subscribe(args.events)
    service = session.service
    seq = service.broadcaster.seq
    if args.replay and "RAM_BLOCK_ADDED" in names:
        for block in service.ram:
            event = make_event("RAM_BLOCK_ADDED", added_data(block, seq, True))
            session.sink.send_event(event, live=False)
    return m.SubscribeResult(seq=seq, events=[n for n in m.EVENT_NAMES if n in names])


@command("unsubscribe", m.NoArgs, m.Empty, readonly=True)
def unsubscribe(session: Session, args: m.NoArgs) -> m.Empty:
    """Stop receiving events."""
    session.unsubscribe()
    return m.Empty()


@command("query-stats", m.NoArgs, m.StatsResult, readonly=True)
def query_stats(session: Session, args: m.NoArgs) -> m.StatsResult:
    """Usage figures of the daemon, and its limits."""
    service = session.service
    ram = service.ram
    return m.StatsResult(
        blocks=len(ram),
        reserved=ram.reserved,
        used=ram.used,
        resident=sum(b.resident() for b in ram),
        clients=len(service.sessions),
        subscribers=sum(1 for _ in service.broadcaster.subscribers()),
        events_emitted=service.broadcaster.emitted,
        dropped_subscribers=service.dropped_subscribers,
        uptime=round(time.monotonic() - service.started, 3),
        limits=service.limits.model_dump(by_alias=True),
    )


@functools.cache
def version_triple() -> m.VersionTriple:
    major, minor, micro = (int(x) for x in ramd.__version__.split(".")[:3])
    return m.VersionTriple(major=major, minor=minor, micro=micro)


@command("query-version", m.NoArgs, m.VersionResult, readonly=True)
def query_version(session: Session, args: m.NoArgs) -> m.VersionResult:
    """The daemon's version."""
    return m.VersionResult(version=version_triple(), package=f"ramd {ramd.__version__}")


@command("query-commands", m.NoArgs, m.CommandInfoList, readonly=True)
def query_commands(session: Session, args: m.NoArgs) -> m.CommandInfoList:
    """The names of every command."""
    return m.CommandInfoList([m.CommandInfo(name=name) for name in COMMANDS])


@command("query-schema", m.NoArgs, m.SchemaResult, readonly=True)
def query_schema(session: Session, args: m.NoArgs) -> m.SchemaResult:
    """The JSON Schema document of every command's arguments and result and every event."""
    from ramd.api.schema import schema_document

    return m.SchemaResult(schema_document())
