"""The daemon's lifetime: build the service, create configured blocks, listen, serve until
SIGTERM/SIGINT, then shut down in order. Runs on one asyncio loop (the main thread)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ramd.api import dispatch
from ramd.api.outcome import BadArguments, Failed, Internal, Pending
from ramd.api.service import Service, Session
from ramd.config import Config, ConfigError, default_socket_path
from ramd.hostlimits import HostLimits, meminfo_total
from ramd.hostmem.dirlock import MemoryDirInUse
from ramd.process import adoption, datadirs, fdstore, heap, systemd
from ramd.process.fdbudget import raise_nofile_limit
from ramd.process.paths import SYSTEM_RUNTIME_DIR
from ramd.sizes import format_size
from ramd.transport.protocol.jsonrpc import JsonRpcDialect
from ramd.transport.protocol.qmp import QmpDialect
from ramd.transport.sockets.connection import DialectFactory
from ramd.transport.sockets.server import Listener, Server
from ramd.transport.sockets.unixbind import AlreadyRunning
from ramd.vmm import records

if TYPE_CHECKING:
    from ramd.metrics.http import MetricsServer
from ramd.ramblock.pools import Pools, PoolSpec

log = logging.getLogger("ramd")

DIALECTS: dict[str, DialectFactory] = {"jsonrpc": JsonRpcDialect, "qmp": QmpDialect}


class CannotStart(Exception):
    """The daemon cannot start (it exits 1); the message names the path at fault and what
    to do about it."""


class _NoSink:
    """Event sink of the start-up session: nobody listens yet."""

    def send_event(self, event: object, live: bool = True) -> None:
        return None

    async def drained(self) -> None:
        return None


async def create_config_blocks(
    service: Service, config: Config, kept: frozenset[str] = frozenset()
) -> None:
    """Create every ``[[block]]`` but those ``kept`` (adopted) through the ``ram-block-add``
    command; ConfigError on the first failure, naming the block."""
    session = Session(service, _NoSink())
    try:
        for i, block in enumerate(config.block):
            if block.id in kept:
                continue
            params = block.model_dump(by_alias=True, exclude_none=True)
            outcome = dispatch.call(session, "ram-block-add", params)
            if isinstance(outcome, Pending):
                outcome = await outcome.result
            if isinstance(outcome, BadArguments):
                raise ConfigError(f"config: block[{i}].{outcome.message()}")
            if isinstance(outcome, Failed):
                raise ConfigError(f"config: block[{i}]: {outcome.desc}")
            if isinstance(outcome, Internal):
                raise ConfigError(f"config: block[{i}]: internal error (see the log)")
    finally:
        session.close()


def start_pools(service: Service, config: Config) -> None:
    """Charge every ``[[pool]]`` against ``max-used`` and start filling them (in worker
    threads); ConfigError naming the first pool that does not fit."""
    for i, cfg in enumerate(config.pool):
        spec = PoolSpec(cfg.name, cfg.size, cfg.count, cfg.backend, cfg.hugetlb, cfg.max_size)
        try:
            charge = Pools.charge_of(spec)
        except OSError as e:  # no hugetlbfs in this kernel
            raise ConfigError(f"config: pool[{i}].hugetlb: {e.strerror or e}") from None
        if not service.fits_used(charge):
            raise ConfigError(
                f"config: pool[{i}]: pool '{cfg.name}' ({cfg.count} x {cfg.size} bytes) does"
                f" not fit max-used {service.limits.max_used} ({service.ram.used} used by"
                f" blocks, {service.pools.charged} charged to other pools)"
            )
        service.pools.add(spec)
    service.pools.kick()


def listeners_for(config: Config, passed: list[tuple[int, str]]) -> list[Listener]:
    """Inherited sockets (systemd's ``passed`` fds) first; bind paths for dialects that
    got none."""
    out: list[Listener] = []
    for fd, name in passed:
        out.append(Listener("qmp" if name == "qmp" else "jsonrpc", fd=fd))
    have = {lst.dialect for lst in out}
    if "jsonrpc" not in have:
        out.append(Listener("jsonrpc", path=config.socket or default_socket_path()))
    if "qmp" not in have and config.qmp_socket is not None:
        out.append(Listener("qmp", path=config.qmp_socket))
    return [lst for lst in out if lst.dialect in DIALECTS]


async def serve(
    config: Config,
    stop: asyncio.Event | None = None,
    reread: Callable[[], Config] | None = None,
) -> None:
    """Run the daemon until ``stop`` is set (by SIGTERM/SIGINT when not given). SIGHUP
    applies what can change while running from ``reread()`` (see :func:`reload`)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    # json.loads recurses once per nesting level; let it reach the configured depth (the
    # splitter refuses anything deeper before it is parsed).
    sys.setrecursionlimit(max(sys.getrecursionlimit(), config.limits.max_depth + 1000))
    heap.keep_large_buffers()
    # What exists now (modules, their classes and validators, the config) lives as long as
    # the daemon: keep it out of every later full collection, whose pause grows with the
    # objects it walks (about 7 ms for these alone).
    gc.freeze()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    raise_nofile_limit()
    host = HostLimits()
    memory_hint = datadirs.memory_dir_hint("memory_dir" not in config.model_fields_set)
    ram = datadirs.MemoryDirRAMList(config.memory_dir, memory_hint)
    service = Service(
        host.effective(config.limits),
        ram,
        host=host,
        state_dir=str(config.state_dir),
    )
    service.request_shutdown = stop.set
    server: Server | None = None
    metrics: MetricsServer | None = None
    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: reload(server, reread))
        passed, stored_attachments = records.take_stored(systemd.listen_fds())
        _adopt_memory_dir(ram, service.limits.max_used)
        stored = [p for p in passed if fdstore.is_block_name(p[1])]
        fdstore.adopt_stored(service.ram, stored, service.limits.max_used)
        await service.attachments.resume(
            list(service.ram), stored_attachments, service.limits.ack_timeout
        )
        kept = adoption.kept_config_blocks(service.ram, config.block)
        await create_config_blocks(service, config, kept)
        start_pools(service, config)
        sockets = [p for p in passed if not fdstore.is_block_name(p[1])]
        server = Server(service, config, listeners_for(config, sockets), DIALECTS)
        await _start_server(server, config)
        _check_state_dir(config)
        if config.metrics_listen is not None:
            from ramd.metrics.endpoint import start_endpoint  # prometheus_client: only if used

            metrics = start_endpoint(config, service, server)
        systemd.notify(f"READY=1\nSTATUS=serving {len(service.ram)} RAM blocks")
        log.info(
            "ready: %d RAM blocks, %s event loop",
            len(service.ram),
            type(loop).__module__.split(".")[0],
        )
        log.info("directories: memory-dir %s, state-dir %s", config.memory_dir, config.state_dir)
        log.info(
            "limits: max-reserved %s, max-used %s (host memory %s, cgroup limits %s),"
            " RLIMIT_NOFILE %d (fd budget %d)",
            format_size(service.limits.max_reserved),
            format_size(service.limits.max_used),
            format_size(meminfo_total()),
            ", ".join(f"{c.cgroup} {format_size(c.limit)}" for c in host.cgroup_limits()) or "none",
            service.fd_budget.limit,
            service.fd_budget.budget,
        )
        heap.trim()  # what start-up allocated and freed (imports, adoption) goes back
        watchdog = _start_watchdog()
        await stop.wait()
        if watchdog is not None:
            watchdog.cancel()
        systemd.notify("STOPPING=1\nSTATUS=shutting down")
        log.info("shutting down")
    finally:
        # One grace for everything: jobs are cancelled now, while the connections finish
        # their commands in flight, and get what is left of it.
        deadline = loop.time() + config.stop_timeout
        if service.jobs is not None:
            service.jobs.stop()
        if metrics is not None:
            metrics.close()
        if server is not None:
            await server.shutdown(config.stop_timeout)
        if service.jobs is not None:
            abandoned = await service.jobs.shutdown(max(0.0, deadline - loop.time()))
            if abandoned:
                log.warning("jobs abandoned at exit: %s", ", ".join(abandoned))
        await service.attachments.close()
        service.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _adopt_memory_dir(ram: datadirs.MemoryDirRAMList, max_used: int) -> None:
    """Adopt the ``file`` blocks of ``memory-dir`` (:mod:`ramd.process.adoption`; up to ``max_used``
    bytes) when it can be used; a bad ``memory-dir`` is logged with what to do and its
    entries are left alone.

    Raises :class:`CannotStart` when another daemon holds it (docs/protocol.md §9: exit 1)."""
    problem = datadirs.probe(Path(ram.memory_dir), own=True)
    if problem is not None:
        log.warning("memory-dir %s cannot be used: %s; %s", ram.memory_dir, problem, ram.hint)
        return
    try:
        adoption.adopt_memory_dir(ram, max_used)
    except MemoryDirInUse as e:
        raise CannotStart(
            f"{e}: stop that daemon, or give this one another memory-dir (--config FILE)"
        ) from e
    except OSError as e:
        log.warning("memory-dir %s: nothing adopted: %s", ram.memory_dir, e)


async def _start_server(server: Server, config: Config) -> None:
    """Bind or adopt the listeners; :class:`CannotStart` saying what to do when one fails
    (its ``__cause__`` is the error of the bind: ``AlreadyRunning``, ``UnsafeDirectory``,
    ``OSError``)."""
    try:
        await server.start()
    except AlreadyRunning as e:
        raise CannotStart(
            f"{e}: stop that daemon first, or give this one another socket (--socket PATH)"
        ) from e
    except OSError as e:
        raise CannotStart(f"{e.strerror or e}; {_socket_hint(config)}") from e


def _socket_hint(config: Config) -> str:
    """What to do when a socket cannot be created."""
    if (
        os.geteuid() != 0
        and config.socket is None
        and not os.environ.get("RAMD_SOCKET")
        and not os.environ.get("XDG_RUNTIME_DIR")
    ):
        return (
            f"XDG_RUNTIME_DIR is not set, so the socket goes to {SYSTEM_RUNTIME_DIR}, which only"
            " root (or ramd.service) can create: set XDG_RUNTIME_DIR or RAMD_SOCKET, or give"
            " --socket PATH"
        )
    return "choose another path: --socket PATH, --qmp-socket PATH, or RAMD_SOCKET"


def _check_state_dir(config: Config) -> None:
    """Log a warning, with what to do, when ``state-dir`` cannot be used (saves to files
    would fail); the daemon serves anyway."""
    problem = datadirs.probe(config.state_dir, own=False)
    if problem is not None:
        hint = datadirs.state_dir_hint("state_dir" not in config.model_fields_set)
        log.warning("state-dir %s cannot be used: %s; %s", config.state_dir, problem, hint)


#: Keys SIGHUP applies to the running daemon; any other change needs a restart.
RELOADABLE = ("log_level", "allow_uids", "allow_gids", "readonly_uids", "readonly_gids")


def reload(server: Server | None, reread: Callable[[], Config] | None) -> None:
    """Re-read the configuration: apply the log level and the access lists (to connections
    accepted from now on), and log every other changed key as needing a restart."""
    if server is None or reread is None:
        log.info("SIGHUP: no configuration file to reload")
        return
    try:
        new = reread()
    except ConfigError as e:
        log.error("SIGHUP: configuration not reloaded, the running one is kept: %s", e)
        return
    except Exception:
        log.exception("SIGHUP: configuration not reloaded, the running one is kept")
        return
    old = server.config
    update = {k: getattr(new, k) for k in RELOADABLE}
    changed = [k for k in RELOADABLE if getattr(old, k) != update[k]]
    fixed = [
        k
        for k in type(old).model_fields
        if k not in RELOADABLE and getattr(old, k) != getattr(new, k)
    ]
    server.config = server.admission.config = old.model_copy(update=update)
    logging.getLogger().setLevel(new.log_level.upper())
    log.info(
        "SIGHUP: configuration reloaded: %s%s",
        ", ".join(_kebab(k) for k in changed) or "nothing changed",
        f"; changes to {', '.join(map(_kebab, fixed))} need a restart" if fixed else "",
    )


def _kebab(key: str) -> str:
    return key.replace("_", "-")


def _start_watchdog() -> asyncio.Task[None] | None:
    interval = systemd.watchdog_interval()
    if interval is None:
        return None

    async def ping() -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(ping())
