"""``ramctl``'s progress bar: tqdm on stderr, only when stderr is a terminal.

tqdm's own byte formatting divides the counts by ``unit_divisor`` but the rate always by
1000, and labels both with SI prefixes; this bar shows counts and rate with
:func:`ramd.sizes.format_size` instead (``12.5 MiB``, ``310 MiB/s``: powers of 1024, labelled
so).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm  # type: ignore[import-untyped]

from ramd.sizes import format_size

__all__ = ["WITH_TOTAL", "progress_bar"]

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
