"""The daemon's figures as Prometheus metric families (docs/protocol.md §15), through
``prometheus_client``'s public collector API: a :class:`RamdCollector` registered in a private
``CollectorRegistry``, rendered by ``generate_latest``.

Each :meth:`RamdCollector.collect` takes one snapshot (:mod:`ramd.metrics.figures`) and builds
the families from it, so a scrape reports one consistent state; a block deleted before the
snapshot has no series in it. Runs on the scraping thread; touches no daemon state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from ramd.metrics.counters import BUCKETS
from ramd.metrics.figures import HOLDER_KINDS, Figures


def families(f: Figures) -> Iterator[Metric]:
    """Every metric family, with the samples of ``f``."""
    yield GaugeMetricFamily("ramd_blocks", "RAM blocks", value=len(f.blocks))
    yield GaugeMetricFamily(
        "ramd_reserved_bytes",
        "Address space reserved by all blocks (max-size plus a guard page each)",
        value=f.reserved,
    )
    yield GaugeMetricFamily(
        "ramd_used_bytes", "Sum of the blocks' sizes (query-stats used)", value=f.used
    )
    size = GaugeMetricFamily("ramd_block_size_bytes", "Used size of a block", labels=["id"])
    max_size = GaugeMetricFamily(
        "ramd_block_max_size_bytes", "Maximum size of a block", labels=["id"]
    )
    holders = GaugeMetricFamily(
        "ramd_block_holders",
        "Holders of a block, by kind (docs/protocol.md §12)",
        labels=["id", "kind"],
    )
    for block_id, block_size, block_max_size, counts in f.blocks:
        size.add_metric([block_id], block_size)
        max_size.add_metric([block_id], block_max_size)
        for kind, count in zip(HOLDER_KINDS, counts, strict=True):
            holders.add_metric([block_id, kind], count)
    yield from (size, max_size, holders)
    yield _labelled(
        GaugeMetricFamily, "ramd_connections", "Open client connections", "socket", f.connections
    )
    commands = CounterMetricFamily(
        "ramd_commands", "Commands answered, by command and outcome", labels=["command", "outcome"]
    )
    for (command, outcome), calls in f.commands:
        commands.add_metric([command, outcome], calls)
    yield commands
    seconds = HistogramMetricFamily(
        "ramd_command_seconds",
        "Time from a command's call to its outcome, by command",
        labels=["command"],
    )
    for lat in f.latencies:
        cumulative = accumulate(lat.buckets)
        seconds.add_metric(
            [lat.command], list(zip(_BOUNDS, cumulative, strict=True)), lat.total_seconds
        )
    yield seconds
    yield _labelled(CounterMetricFamily, "ramd_events", "Events emitted", "event", f.events)
    yield _labelled(
        CounterMetricFamily,
        "ramd_refused_connections",
        "Connections refused",
        "reason",
        f.refused_connections,
    )
    yield _labelled(
        CounterMetricFamily, "ramd_job_bytes", "Bytes processed by jobs", "type", f.job_bytes
    )
    yield _labelled(
        GaugeMetricFamily,
        "ramd_pool_ready",
        "Blocks ready in a pool (docs/protocol.md §14)",
        "pool",
        f.pools,
    )


#: ``le`` of each bucket of ``ramd_command_seconds``.
_BOUNDS = [repr(b) for b in BUCKETS] + ["+Inf"]
_Family = TypeVar("_Family", GaugeMetricFamily, CounterMetricFamily)


def _labelled(
    kind: type[_Family], name: str, doc: str, label: str, pairs: Iterable[tuple[str, int]]
) -> _Family:
    """A family of one label: a sample per ``(label value, value)`` pair."""
    family = kind(name, f"{doc}, by {label}", labels=[label])
    for key, value in pairs:
        family.add_metric([key], value)
    return family


#: What :meth:`RamdCollector.describe` renders: no block, no connection, no count.
_EMPTY = Figures((), 0, 0, (), (), (), (), (), (), ())


class RamdCollector:
    """A ``prometheus_client`` collector of the daemon's figures; ``snapshot`` gives them
    (it may raise, and the scrape then fails)."""

    def __init__(self, snapshot: Callable[[], Figures]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        """The families (with the samples of an empty daemon): the registry reads their
        names."""
        return families(_EMPTY)

    def collect(self) -> Iterator[Metric]:
        return families(self._snapshot())


def registry(snapshot: Callable[[], Figures]) -> CollectorRegistry:
    """A private registry (not the library's global one) holding only the daemon's
    collector."""
    reg = CollectorRegistry(auto_describe=True)
    reg.register(RamdCollector(snapshot))
    return reg
