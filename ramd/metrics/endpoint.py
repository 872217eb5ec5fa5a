"""Start the metrics endpoint of a running daemon (``metrics-listen``, docs/protocol.md §15).

Imported by :mod:`ramd.process.daemon` only when ``metrics-listen`` is set: it brings in
``prometheus_client``. Loop thread.
"""

from __future__ import annotations

import asyncio
import logging

from ramd.api.service import Service
from ramd.config import Config
from ramd.metrics.collector import registry
from ramd.metrics.figures import LoopFigures, take
from ramd.metrics.http import MetricsServer
from ramd.transport.sockets.server import Server

log = logging.getLogger("ramd.metrics")


def start_endpoint(config: Config, service: Service, server: Server) -> MetricsServer | None:
    """Serve ``GET /metrics`` on ``metrics-listen`` (None when it is unset). ``OSError``
    when the address cannot be bound."""
    address = config.metrics_address()
    if address is None:
        return None
    loop = asyncio.get_running_loop()
    endpoint = MetricsServer(address, registry(LoopFigures(loop, lambda: take(service, server))))
    where = endpoint.start(config.socket_mode, config.socket_gid())
    log.info("metrics: serving GET /metrics on %s", where)
    return endpoint
