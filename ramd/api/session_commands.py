"""The session and daemon commands: events (subscribe), figures, version, introspection,
HMP pass-through, ``quit``. Loop thread.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable

import ramd
from ramd.api import hmp, quitguard
from ramd.api import models as m
from ramd.api.block_commands import SCAN_INLINE_MAX, resident
from ramd.api.events import added_data, make_event
from ramd.api.service import Session
from ramd.api.table import COMMANDS, Raw, command
from ramd.errors import RamdError
from ramd.ramblock import RAMBlock

#: Replay events queued between two checks of the client's output.
REPLAY_SLICE = 64


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
        return _stats(session, sum(map(resident, blocks)))
    return _stats_scanned(session, blocks)


async def _stats_scanned(session: Session, blocks: list[RAMBlock]) -> m.StatsResult:
    total = await session.service.in_worker(lambda: sum(map(resident, blocks)))
    return _stats(session, total)


def _stats(session: Session, resident_bytes: int) -> m.StatsResult:
    service = session.service
    ram = service.ram
    return m.StatsResult(
        blocks=len(ram),
        reserved=ram.reserved,
        used=ram.used,
        pooled=service.pools.charged,
        resident=resident_bytes,
        clients=len(service.sessions),
        subscribers=sum(1 for _ in service.broadcaster.subscribers()),
        events_emitted=service.broadcaster.emitted,
        commands=service.command_stats.total,
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
    """Shut the daemon down as SIGTERM does, once this answer is sent; refused while blocks
    exist that are not persistent (they would be freed: stop the service instead)."""
    shutdown = session.service.request_shutdown
    if shutdown is None:
        raise RamdError("quit is not available: nothing serves this daemon's shutdown")
    quitguard.refuse_if_blocks_would_be_freed(session.service.ram)
    shutdown()
    return m.Empty()
