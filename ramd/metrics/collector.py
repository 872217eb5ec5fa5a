"""The daemon's figures as Prometheus metric families (protocol.md §15), through
``prometheus_client``'s public collector API: a :class:`RamdCollector` registered in a private
``CollectorRegistry``, rendered by ``generate_latest``.

Each :meth:`RamdCollector.collect` takes one snapshot (:mod:`ramd.metrics.figures`) and builds
the families from it, so a scrape reports one consistent state; a block deleted before the
snapshot has no series in it. Runs on the scraping thread; touches no daemon state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import accumulate

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from ramd.metrics.counters import BUCKETS
from ramd.metrics.figures import HOLDER_KINDS, Figures


def families(figures: Figures | None) -> Iterator[Metric]:
    """Every metric family, with the samples of ``figures`` (None: no samples, the
    families' names and types only)."""
    f = figures

    def gauge(name: str, doc: str, value: int | None) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)

    yield gauge("ramd_blocks", "RAM blocks", None if f is None else len(f.blocks))
    yield gauge(
        "ramd_reserved_bytes",
        "Address space reserved by all blocks (max-size plus a guard page each)",
        None if f is None else f.reserved,
    )
    yield gauge(
        "ramd_used_bytes",
        "Sum of the blocks' sizes (query-stats used)",
        None if f is None else f.used,
    )
    size = GaugeMetricFamily("ramd_block_size_bytes", "Used size of a block", labels=["id"])
    max_size = GaugeMetricFamily(
        "ramd_block_max_size_bytes", "Maximum size of a block", labels=["id"]
    )
    holders = GaugeMetricFamily(
        "ramd_block_holders", "Holders of a block, by kind (protocol.md §12)", labels=["id", "kind"]
    )
    for block_id, block_size, block_max_size, counts in f.blocks if f is not None else ():
        size.add_metric([block_id], block_size)
        max_size.add_metric([block_id], block_max_size)
        for kind, count in zip(HOLDER_KINDS, counts, strict=True):
            holders.add_metric([block_id, kind], count)
    yield from (size, max_size, holders)
    connections = GaugeMetricFamily(
        "ramd_connections", "Open client connections, by socket", labels=["socket"]
    )
    for socket, count in f.connections if f is not None else ():
        connections.add_metric([socket], count)
    yield connections
    commands = CounterMetricFamily(
        "ramd_commands", "Commands answered, by command and outcome", labels=["command", "outcome"]
    )
    for (command, outcome), calls in f.commands if f is not None else ():
        commands.add_metric([command, outcome], calls)
    yield commands
    seconds = HistogramMetricFamily(
        "ramd_command_seconds",
        "Time from a command's call to its outcome, by command",
        labels=["command"],
    )
    bounds = [repr(b) for b in BUCKETS] + ["+Inf"]
    for lat in f.latencies if f is not None else ():
        cumulative = list(accumulate(lat.buckets))
        seconds.add_metric(
            [lat.command], list(zip(bounds, cumulative, strict=True)), lat.total_seconds
        )
    yield seconds
    for name, doc, label, pairs in (
        ("ramd_events", "Events emitted, by name", "event", f and f.events),
        (
            "ramd_refused_connections",
            "Connections refused, by reason",
            "reason",
            f and f.refused_connections,
        ),
        ("ramd_job_bytes", "Bytes processed by jobs, by job type", "type", f and f.job_bytes),
    ):
        counter = CounterMetricFamily(name, doc, labels=[label])
        for key, value in pairs or ():
            counter.add_metric([key], value)
        yield counter
    pools = GaugeMetricFamily(
        "ramd_pool_ready", "Blocks ready in a pool (protocol.md §14)", labels=["pool"]
    )
    for pool, ready in f.pools if f is not None else ():
        pools.add_metric([pool], ready)
    yield pools


class RamdCollector:
    """A ``prometheus_client`` collector of the daemon's figures; ``snapshot`` gives them
    (it may raise, and the scrape then fails)."""

    def __init__(self, snapshot: Callable[[], Figures]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        """The families without samples: what the registry checks names with."""
        return families(None)

    def collect(self) -> Iterator[Metric]:
        return families(self._snapshot())


def registry(snapshot: Callable[[], Figures]) -> CollectorRegistry:
    """A private registry (not the library's global one) holding only the daemon's
    collector."""
    reg = CollectorRegistry(auto_describe=True)
    reg.register(RamdCollector(snapshot))
    return reg
