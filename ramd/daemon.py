"""The daemon's lifetime: build the service, create configured blocks, listen, serve until
SIGTERM/SIGINT, then shut down in order. Runs on one asyncio loop (the main thread)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sys

from ramd import systemd
from ramd.api import dispatch
from ramd.api.service import Service, Session
from ramd.config import Config, ConfigError, default_socket_path
from ramd.errors import RamdError
from ramd.hostlimits import HostMemory, meminfo_total
from ramd.transport.connection import DialectFactory
from ramd.transport.jsonrpc import JsonRpcDialect
from ramd.transport.qmp import QmpDialect
from ramd.transport.server import Listener, Server

log = logging.getLogger("ramd")

DIALECTS: dict[str, DialectFactory] = {"jsonrpc": JsonRpcDialect, "qmp": QmpDialect}


class _NoSink:
    """Event sink of the start-up session: nobody listens yet."""

    def send_event(self, event: object, live: bool = True) -> None:
        return None


async def create_config_blocks(service: Service, config: Config) -> None:
    """Create every ``[[block]]`` through the ``ram-block-add`` command; ConfigError on the
    first failure, naming the block."""
    session = Session(service, _NoSink())
    try:
        for i, block in enumerate(config.block):
            params = block.model_dump(by_alias=True, exclude_none=True)
            try:
                result = dispatch.call(session, "ram-block-add", params)
                if inspect.isawaitable(result):
                    await result
            except dispatch.ArgumentError as e:
                raise ConfigError(f"config: block[{i}].{e.message()}") from None
            except RamdError as e:
                raise ConfigError(f"config: block[{i}]: {e.desc}") from None
    finally:
        session.close()


def listeners_for(config: Config) -> list[Listener]:
    """Inherited sockets (systemd) first; bind paths for dialects that got none."""
    out: list[Listener] = []
    for fd, name in systemd.listen_fds():
        out.append(Listener("qmp" if name == "qmp" else "jsonrpc", fd=fd))
    have = {lst.dialect for lst in out}
    if "jsonrpc" not in have:
        out.append(Listener("jsonrpc", path=config.socket or default_socket_path()))
    if "qmp" not in have and config.qmp_socket is not None:
        out.append(Listener("qmp", path=config.qmp_socket))
    return [lst for lst in out if lst.dialect in DIALECTS]


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    """Run the daemon until ``stop`` is set (by SIGTERM/SIGINT when not given)."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    # json.loads recurses once per nesting level; let it reach the configured depth (the
    # splitter refuses anything deeper before it is parsed).
    sys.setrecursionlimit(max(sys.getrecursionlimit(), config.limits.max_depth + 1000))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = HostMemory()
    service = Service(host.effective(config.limits), host=host)
    server: Server | None = None
    try:
        await create_config_blocks(service, config)
        server = Server(service, config, listeners_for(config), DIALECTS)
        await server.start()
        systemd.notify(f"READY=1\nSTATUS=serving {len(service.ram)} RAM blocks")
        log.info(
            "ready: %d RAM blocks, %s event loop",
            len(service.ram),
            type(loop).__module__.split(".")[0],
        )
        log.info(
            "limits: max-reserved %d, max-used %d (host memory %d, cgroup limits %s)",
            service.limits.max_reserved,
            service.limits.max_used,
            meminfo_total(),
            ", ".join(f"{c.cgroup} {c.limit}" for c in host.cgroup_limits()) or "none",
        )
        watchdog = _start_watchdog()
        await stop.wait()
        if watchdog is not None:
            watchdog.cancel()
        systemd.notify("STOPPING=1\nSTATUS=shutting down")
        log.info("shutting down")
    finally:
        if server is not None:
            await server.shutdown()
        service.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _start_watchdog() -> asyncio.Task[None] | None:
    interval = systemd.watchdog_interval()
    if interval is None:
        return None

    async def ping() -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    return asyncio.get_running_loop().create_task(ping())
