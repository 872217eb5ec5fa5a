"""The command table: every command's name, argument model, result model, handler and doc.

A handler takes the calling :class:`~ramd.api.service.Session` and its validated arguments
and returns a result model (or :class:`Raw` JSON text), or an awaitable of one when it must
wait (prealloc, large ``mlock`` and page scans run in a worker thread; a replay waits for the
client to read). It raises :class:`~ramd.errors.RamdError` to refuse. Handlers run on the loop
thread; all block changes are made there, so commands are serialised per block by
construction, and work off the loop thread holds a pin on its block (commands that would
change it answer "busy"). Adding a command is one model plus one handler here.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pybase64
from pydantic import BaseModel

import ramd
from ramd import fdstore
from ramd.api import hmp, release
from ramd.api import models as m
from ramd.api.blockinfo import json_list, with_resident
from ramd.api.events import added_data, make_event
from ramd.api.service import Service, Session
from ramd.errors import RamdError
from ramd.hostmem.libc import host_page_size
from ramd.ramblock import RAMBlock

#: ``mlock`` of more than this many bytes runs in a worker thread (it faults the range in,
#: at a few GiB/s), on a pinned or still invisible block.
LOCK_INLINE_MAX = 64 * 1024 * 1024
#: Page scans (``resident``) of more used bytes than this run in a worker thread (``mincore``
#: reads about 1 GiB of page tables per ms).
SCAN_INLINE_MAX = 1024 * 1024 * 1024
#: Replay events queued between two checks of the client's output.
REPLAY_SLICE = 64

A = TypeVar("A", bound=BaseModel)
Handler = Callable[[Session, Any], Any]


@dataclass(frozen=True, slots=True)
class Command:
    """One entry of the table. ``readonly``: allowed to read-only peers. ``audit``: each
    success is logged as a change, with the peer. ``qmp_result``: the result on the QMP
    dialect when it differs from ``result`` (the handler answers per ``session.dialect``)."""

    name: str
    args: type[m.Args]
    result: type[BaseModel]
    handler: Handler
    doc: str
    readonly: bool
    audit: bool

    def no_args(self) -> m.Args:
        """The arguments when none are given (validated once, then shared: args are frozen)."""
        return _no_args(self.args)

    qmp_result: type[BaseModel] | None = None


@functools.cache
def _no_args(model: type[m.Args]) -> m.Args:
    return model.model_validate({})


@dataclass(frozen=True, slots=True)
class WithFds:
    """A result sent with file descriptors (owned by this object until sent or closed)."""

    result: BaseModel
    fds: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Raw:
    """A result already encoded as ASCII JSON, valid against the command's result model."""

    text: bytes


COMMANDS: dict[str, Command] = {}


def command(
    name: str,
    args: type[A],
    result: type[BaseModel],
    *,
    readonly: bool = False,
    audit: bool = False,
    qmp_result: type[BaseModel] | None = None,
) -> Callable[[Callable[[Session, A], Any]], Callable[[Session, A], Any]]:
    """Register the decorated handler as command ``name``; its docstring is the doc."""

    def register(fn: Callable[[Session, A], Any]) -> Callable[[Session, A], Any]:
        assert issubclass(args, m.Args)
        doc = " ".join((fn.__doc__ or "").split())
        COMMANDS[name] = Command(name, args, result, fn, doc, readonly, audit, qmp_result)
        return fn

    return register


def block_info(session: Session, block: RAMBlock) -> Raw:
    """``RamBlockInfo`` of ``block`` as this session may see it."""
    return Raw(session.service.infos.info(block, not session.readonly))


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _limit(name: str, value: int, detail: str) -> RamdError:
    return RamdError(f"Limit exceeded: {name} is {value}: {detail}")


def _check_add_limits(service: Service, args: m.RamBlockAddArgs) -> None:
    lim, ram = service.limits, service.ram
    page = host_page_size()
    size = _align_up(args.size, page)
    reserve = _align_up(max(args.max_size or size, size), page) + page
    count = len(ram) + ram.pending
    if count >= lim.max_blocks:
        raise _limit("max-blocks", lim.max_blocks, f"{count} blocks exist or are being created")
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


def create_block(service: Service, args: m.RamBlockAddArgs, *, allocate: bool = True) -> RAMBlock:
    """Check the limits and create (not yet commit) the block ``args`` describe
    (``allocate``: see :meth:`ramd.ramblock.RAMList.create`)."""
    _check_add_limits(service, args)
    return service.ram.create(
        args.id,
        args.size,
        args.max_size,
        backend=args.backend,
        hugetlb=args.hugetlb,
        prealloc=args.prealloc,
        merge=args.merge,
        dump=args.dump,
        hugepages=args.hugepages,
        lock=args.lock,
        align=args.align,
        allocate=allocate,
    )


@command("ram-block-add", m.RamBlockAddArgs, m.RamBlockInfo, audit=True)
def ram_block_add(session: Session, args: m.RamBlockAddArgs) -> Raw | Awaitable[Raw]:
    """Create a RAM block of ``size`` bytes; with ``max-size`` it is resizable up to that,
    the rest reserved but inaccessible. ``prealloc`` faults in every page first."""
    ram = session.service.ram
    block = create_block(session.service, args)
    if args.prealloc or (args.lock and block.size > LOCK_INLINE_MAX):
        return _fill_and_commit(session, block)
    try:
        ram.fill(block)
    except BaseException:
        ram.abort(block)
        raise
    ram.commit(block)
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
    ram.commit(block)
    fdstore.push(block)
    return block_info(session, block)


@command("ram-block-del", m.RamBlockDelArgs, m.Empty, audit=True)
def ram_block_del(session: Session, args: m.RamBlockDelArgs) -> m.Empty | Awaitable[m.Empty]:
    """Remove a RAM block and unmap all of its memory (after every mapper acknowledged)."""
    ram = session.service.ram
    block = ram.changeable(args.id)
    session.service.attachments.refuse_change(block, "del")
    if session.service.mappers.of(block):
        return _forget_after(block, release.remove(session, block, args.mode))
    ram.remove(args.id)
    fdstore.forget(block)
    return m.Empty()


async def _forget_after(block: RAMBlock, pending: Awaitable[None]) -> m.Empty:
    await pending
    fdstore.forget(block)
    return m.Empty()


@command("ram-block-resize", m.RamBlockResizeArgs, m.RamBlockInfo, audit=True)
def ram_block_resize(session: Session, args: m.RamBlockResizeArgs) -> Raw | Awaitable[Raw]:
    """Grow or shrink a resizable RAM block in place (no-op at the current size)."""
    service = session.service
    ram = service.ram
    service.attachments.refuse_change(ram.get(args.id), "resize")
    block, new = ram.check_resize(args.id, args.size)
    grow = new - block.size
    lim = service.limits.max_used
    if lim and grow > 0 and ram.used + grow > lim:
        raise _limit("max-used", lim, f"{ram.used} used, {grow} more asked")
    _check_host(service, grow, touch=block.lock, lock=block.lock)
    if block.lock and grow > LOCK_INLINE_MAX:
        return _grow_locked(session, block, new)
    if grow < 0 and service.mappers.of(block):
        return _info_after(session, block, release.shrink(session, block, new, args.mode))
    ram.resize(args.id, args.size)
    return block_info(session, block)


async def _info_after(session: Session, block: RAMBlock, pending: Awaitable[None]) -> Raw:
    await pending
    return block_info(session, block)


async def _grow_locked(session: Session, block: RAMBlock, new: int) -> Raw:
    """Grow a ``lock`` block: map the tail, lock it in a worker thread while the block is
    pinned, then take the new size and notify (QEMU's order: map, then notify)."""
    ram = session.service.ram
    old = block.size
    ram.grow_map(block, old, new)
    ram.pin(block, "it is being locked")
    try:
        await session.service.in_worker(lambda: ram.lock_range(block, old, new - old))
    except BaseException:
        ram.grow_undo(block, old, new)
        raise
    finally:
        ram.unpin(block)
    ram.grow_commit(block, old, new)
    return block_info(session, block)


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
        return Raw(json_list(list(map(with_resident, texts, map(_resident, blocks)))))
    return _with_resident(session, blocks, texts)


async def _with_resident(session: Session, blocks: list[RAMBlock], texts: list[bytes]) -> Raw:
    counts = await session.service.in_worker(lambda: [_resident(b) for b in blocks])
    return Raw(json_list(list(map(with_resident, texts, counts))))


def _resident(block: RAMBlock) -> int:
    """Resident bytes of a block, from a worker thread. ``mincore`` only reads page tables:
    a block unmapped meanwhile by the loop thread gives an error here (counted as 0),
    never a fault."""
    try:
        return block.resident()
    except OSError:
        return 0


@command("ram-block-get-fd", m.GetFdArgs, m.GetFdResult, readonly=True, audit=True)
def ram_block_get_fd(session: Session, args: m.GetFdArgs) -> WithFds:
    """An fd of a shared block's memory, sent with the answer (``SCM_RIGHTS``); this
    connection is then a mapper of the block: it gets the block's events and must
    acknowledge shrinks and removal. Read-only peers get read-only fds."""
    block = session.service.ram.get(args.id)
    if not block.shared:
        raise RamdError(f"RAM block '{block.id}' is not shared (backend {block.backend})")
    readonly = args.readonly or session.readonly
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(f"/proc/self/fd/{block.fd}", flags)
    except OSError as e:
        raise RamdError(f"Cannot open RAM block '{block.id}': {e.strerror}") from None
    session.service.mappers.add(block, session)
    result = m.GetFdResult(
        id=block.id,
        size=block.size,
        max_size=block.max_size,
        page_size=block.page_size,
        readonly=readonly,
    )
    return WithFds(result, (fd,))


@command("ram-block-put-fd", m.BlockIdArgs, m.Empty, readonly=True)
def ram_block_put_fd(session: Session, args: m.BlockIdArgs) -> m.Empty:
    """This connection no longer maps the block (it closed or unmapped its fd)."""
    block = session.service.ram.get(args.id)
    if not session.service.mappers.remove(block, session):
        raise RamdError(f"RAM block '{block.id}' is not mapped by this connection")
    return m.Empty()


@command("ram-block-ack", m.AckArgs, m.Empty, readonly=True)
def ram_block_ack(session: Session, args: m.AckArgs) -> m.Empty:
    """This connection released what event ``seq`` asked it to (the shrunk tail, or the
    whole removed block)."""
    if not session.service.mappers.ack(session, args.seq):
        raise RamdError(f"No acknowledgement of event {args.seq} is awaited from this connection")
    return m.Empty()


#: Named fds one connection may hold (``getfd``).
MAX_NAMED_FDS = 8


@command("getfd", m.FdNameArgs, m.Empty)
def getfd(session: Session, args: m.FdNameArgs) -> m.Empty:
    """Keep the fd sent with this message (``SCM_RIGHTS``) under ``fdname``, as QEMU's
    ``getfd`` (a name already in use is replaced)."""
    if args.fdname not in session.fds and len(session.fds) >= MAX_NAMED_FDS:
        raise _limit("named fds", MAX_NAMED_FDS, "closefd one first")
    fd = session.take_received_fd()
    if fd is None:
        raise RamdError("No file descriptor supplied via SCM_RIGHTS")
    old = session.fds.pop(args.fdname, None)
    if old is not None:
        os.close(old)
    session.fds[args.fdname] = fd
    return m.Empty()


@command("closefd", m.FdNameArgs, m.Empty)
def closefd(session: Session, args: m.FdNameArgs) -> m.Empty:
    """Close the fd named ``fdname`` (QEMU's ``closefd``)."""
    fd = session.fds.pop(args.fdname, None)
    if fd is None:
        raise RamdError(f"File descriptor named '{args.fdname}' not found")
    os.close(fd)
    return m.Empty()


@command("ram-block-read", m.RamBlockReadArgs, m.ReadResult)
def ram_block_read(session: Session, args: m.RamBlockReadArgs) -> Raw:
    """Read ``length`` bytes at ``offset`` of the used range, base64-encoded."""
    _check_io(session.service, args.length)
    data = session.service.ram.read(args.id, args.offset, args.length)
    # base64 needs no JSON escaping: the answer is spliced, never built as a str and encoded
    return Raw(b'{"data":"%s"}' % pybase64.b64encode(data))


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
def subscribe(
    session: Session, args: m.SubscribeArgs
) -> m.SubscribeResult | Awaitable[m.SubscribeResult]:
    """Receive events (all, or those named). With ``replay``, one ``RAM_BLOCK_ADDED`` per
    existing block is sent first, before this command's response."""
    names = session.subscribe(args.events)
    service = session.service
    result = m.SubscribeResult(
        seq=service.broadcaster.seq, events=[n for n in m.EVENT_NAMES if n in names]
    )
    blocks = list(service.ram)
    if not (args.replay and "RAM_BLOCK_ADDED" in names and blocks):
        return result
    return _replay(session, blocks, result)


async def _replay(
    session: Session, blocks: list[RAMBlock], result: m.SubscribeResult
) -> m.SubscribeResult:
    """Queue one replay ``RAM_BLOCK_ADDED`` per block, ``REPLAY_SLICE`` at a time, waiting
    for the client to read its output in between: a replay holds no more memory than a
    subscriber's queue, whatever the number of blocks or of ``subscribe`` calls. A block
    removed meanwhile (its ``RAM_BLOCK_REMOVED`` is already queued) is not replayed."""
    ram = session.service.ram
    for i, block in enumerate(blocks):
        sink = session.sink
        if sink is None:
            break
        if i % REPLAY_SLICE == 0 and i:
            await sink.drained()
        if block.id in ram and ram.get(block.id) is block:
            event = make_event("RAM_BLOCK_ADDED", added_data(block, result.seq, True))
            sink.send_event(event, live=False)
    return result


@command("unsubscribe", m.NoArgs, m.Empty, readonly=True)
def unsubscribe(session: Session, args: m.NoArgs) -> m.Empty:
    """Stop receiving events."""
    session.unsubscribe()
    return m.Empty()


@command("query-stats", m.NoArgs, m.StatsResult, readonly=True)
def query_stats(session: Session, args: m.NoArgs) -> m.StatsResult | Awaitable[m.StatsResult]:
    """Usage figures of the daemon, and its limits."""
    blocks = list(session.service.ram)
    if session.service.ram.used <= SCAN_INLINE_MAX:
        return _stats(session, sum(map(_resident, blocks)))
    return _stats_scanned(session, blocks)


async def _stats_scanned(session: Session, blocks: list[RAMBlock]) -> m.StatsResult:
    resident = await session.service.in_worker(lambda: sum(map(_resident, blocks)))
    return _stats(session, resident)


def _stats(session: Session, resident: int) -> m.StatsResult:
    service = session.service
    ram = service.ram
    return m.StatsResult(
        blocks=len(ram),
        reserved=ram.reserved,
        used=ram.used,
        resident=resident,
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


@command("query-version", m.NoArgs, m.VersionResult, qmp_result=m.QmpVersionResult, readonly=True)
def query_version(session: Session, args: m.NoArgs) -> m.VersionResult | m.QmpVersionResult:
    """The daemon's version. The QMP dialect answers QEMU's shape, ``{"qemu": {"major",
    "minor", "micro"}, "package"}``, as in its greeting."""
    package = f"ramd {ramd.__version__}"
    if session.dialect == "qmp":
        return m.QmpVersionResult(qemu=version_triple(), package=package)
    return m.VersionResult(version=version_triple(), package=package)


@command("query-commands", m.NoArgs, m.CommandInfoList, readonly=True)
def query_commands(session: Session, args: m.NoArgs) -> m.CommandInfoList:
    """The names of every command."""
    return m.CommandInfoList([m.CommandInfo(name=name) for name in COMMANDS])


@command("query-schema", m.NoArgs, m.SchemaResult, readonly=True)
def query_schema(session: Session, args: m.NoArgs) -> m.SchemaResult:
    """The JSON Schema document of every command's arguments and result and every event."""
    from ramd.api.schema import schema_document

    return m.SchemaResult(schema_document())


@command("human-monitor-command", m.HumanMonitorCommandArgs, m.HmpOutput, readonly=True)
def human_monitor_command(session: Session, args: m.HumanMonitorCommandArgs) -> m.HmpOutput:
    """Run an HMP command line and return what it printed, as QEMU does: ``help``,
    ``info``, ``info ramblock`` (QEMU's layout); any other command prints QEMU's
    "unknown command" text."""
    return m.HmpOutput(hmp.run(session, args.command_line))


@command("query-qmp-schema", m.NoArgs, m.SchemaInfoList, readonly=True)
def query_qmp_schema(session: Session, args: m.NoArgs) -> Raw:
    """Every command, event and type in QEMU's introspection format (``SchemaInfo``), with
    readable type names; it describes the QMP dialect's results."""
    from ramd.api.introspect import introspection

    return Raw(introspection())


@command("quit", m.NoArgs, m.Empty, audit=True)
def quit_daemon(session: Session, args: m.NoArgs) -> m.Empty:
    """Shut the daemon down as SIGTERM does, once this answer is sent."""
    shutdown = session.service.request_shutdown
    if shutdown is None:
        raise RamdError("quit is not available: nothing serves this daemon's shutdown")
    shutdown()
    return m.Empty()


# The snapshot and job commands register in the same table (they use the helpers above).
from ramd.api import attach, snapshots  # noqa: E402, F401
