"""``ramctl``'s progress bars: tqdm on stderr, only when stderr is a terminal.

Two kinds: a byte counter (:func:`progress_bar`, for transfers and jobs, which report their
bytes) and, for one long call that reports nothing until it answers (an ``add --prealloc``
of a few GiB faults every page in before it answers), the time it has taken so far
(:func:`waiting`).

tqdm's own byte formatting divides the counts by ``unit_divisor`` but the rate always by
1000, and labels both with SI prefixes; this bar shows counts and rate with
:func:`ramd.sizes.format_size` instead (``12.5 MiB``, ``310 MiB/s``: powers of 1024, labelled
so).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

from tqdm import tqdm  # type: ignore[import-untyped]

from ramd.sizes import format_size

__all__ = ["WITH_TOTAL", "progress_bar", "waiting"]

T = TypeVar("T")
#: Seconds between two redraws of :func:`waiting`'s line.
TICK = 0.5

WITH_TOTAL = "{desc}: {percentage:3.0f}%|{bar}| {done}/{whole} [{elapsed}<{remaining}, {speed}]"
_WITHOUT_TOTAL = "{desc}: {done} [{elapsed}, {speed}]"


class _ByteBar(tqdm):  # type: ignore[misc]
    """A tqdm whose ``bar_format`` fields ``done``, ``whole`` and ``speed`` are sizes in
    powers of 1024."""

    @property
    def format_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().format_dict
        n, total, elapsed, rate = d["n"], d["total"], d["elapsed"], d["rate"]
        if rate is None and elapsed:
            rate = n / elapsed
        d["done"] = format_size(int(n))
        d["whole"] = "?" if total is None else format_size(int(total))
        d["speed"] = "? B/s" if not rate else f"{format_size(int(rate))}/s"
        return d


def progress_bar(total: int | None, desc: str) -> Any:
    """A byte counter on stderr (``update(n)`` per chunk), disabled unless stderr is a
    terminal; a context manager that clears its line when done."""
    return _ByteBar(
        total=total,
        desc=desc,
        unit="B",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
        bar_format=WITH_TOTAL if total is not None else _WITHOUT_TOTAL,
    )


async def waiting(call: Awaitable[T], what: str) -> T:
    """Await ``call`` while a line on stderr (a terminal only) says ``what`` and how long it
    has taken (``add vm1: preallocating 4 GiB [00:07]``); the line is cleared when it ends."""
    with tqdm(
        desc=what,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        leave=False,
        bar_format="{desc} [{elapsed}]",
    ) as bar:
        task = asyncio.ensure_future(call)
        while True:
            done, _ = await asyncio.wait([task], timeout=TICK)
            if done:
                return task.result()
            bar.refresh()
