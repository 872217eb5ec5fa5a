"""Per-command counts and latencies, kept by the one function that dispatches commands.

Cost: :meth:`CommandStats.record` is a few dict operations and one bisection, on the loop
thread, with no lock: the figures are loop-owned like every other piece of daemon state, and
the metrics endpoint reads them through a snapshot taken on the loop
(:mod:`ramd.metrics.figures`), never from its own thread.

Bounded: the command label is a command of the table or :data:`UNKNOWN` (names clients make
up are never kept), and outcomes are the four of :data:`OUTCOMES`.
"""

from __future__ import annotations

from bisect import bisect_left

#: ``ramd_command_seconds``'s bucket bounds (seconds): most commands answer in well under a
#: millisecond; prealloc, lock and acknowledged releases take up to ``ack-timeout`` and more.
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_FIRST = BUCKETS[0]
#: The command label of calls of a command that does not exist.
UNKNOWN = "(unknown)"
#: ``ok``: answered; ``refused``: a command error (``GenericError``, ``DeviceNotFound``, ...);
#: ``invalid``: bad input (arguments, unknown command); ``internal``: a bug in the daemon.
OUTCOMES = ("ok", "refused", "invalid", "internal")


class Tally:
    """One command's figures: calls per outcome (indexed like :data:`OUTCOMES`), calls per
    latency bucket (not cumulative; the last one is above every bound), and the sum of the
    latencies in seconds."""

    __slots__ = ("buckets", "outcomes", "seconds")

    def __init__(self) -> None:
        self.outcomes = [0] * len(OUTCOMES)
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0


class CommandStats:
    """Each command's :class:`Tally`, and the calls of all. Loop thread only."""

    __slots__ = ("by_command", "total")

    def __init__(self) -> None:
        self.by_command: dict[str, Tally] = {}
        #: Every call recorded, whatever its outcome (``query-stats`` ``commands``).
        self.total = 0

    def record(self, command: str, outcome: int, seconds: float) -> None:
        """Count one finished call of ``command`` (a table name or :data:`UNKNOWN`) that
        came to ``OUTCOMES[outcome]`` in ``seconds``."""
        tally = self.by_command.get(command)
        if tally is None:
            tally = self.by_command[command] = Tally()
        tally.outcomes[outcome] += 1
        # Most calls fall in the first bucket: skip the bisection for them.
        tally.buckets[0 if seconds <= _FIRST else bisect_left(BUCKETS, seconds)] += 1
        tally.seconds += seconds
        self.total += 1
