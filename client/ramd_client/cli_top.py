"""``ramctl top``: a live view of the daemon, refreshed like ``top``: its figures, the rates
of commands and events, and each block with its sizes and holders.

Each frame is one ``query-stats`` and one ``query-ram-blocks``. Rates: the first frame shows
the averages since the daemon started (``top``'s first frame does the same); each later one,
those over the interval since the frame before, less the two commands the view itself sent.
On a terminal each frame replaces the one before (the screen is cleared); otherwise frames
are separated by an empty line, and with ``--json`` each frame is one JSON object on one line.
``--once`` (``-n 1``) or ``-n N`` stop after N frames; otherwise it runs until SIGINT (exit 0).

Light at import (neither asyncio nor pydantic): :mod:`ramd_client.cli_parser` imports
:func:`add_parser` for every ramctl command line, ``version`` included, so asyncio is imported
by the coroutines that run the view (as :mod:`ramd_client.cli` does).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ramd.sizes import format_size
from ramd_client.cli_holders import holder_count
from ramd_client.cli_output import EXIT_OK, emit, table

if TYPE_CHECKING:
    from ramd_client.client import AsyncClient

__all__ = ["add_parser", "cmd_top"]

#: Seconds between frames unless ``-d`` says otherwise (top's default is 3).
DEFAULT_DELAY = 2.0
#: Commands each frame sends (``query-stats``, ``query-ram-blocks``): not counted in the rate.
OWN_COMMANDS = 2
_CLEAR = "\x1b[H\x1b[2J"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: more than 0 expected")
    return value


def _frames(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: 1 or more expected")
    return value


def add_parser(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add ``top`` through ramctl's ``command(name, help)`` helper."""
    p = command("top", "show the daemon's blocks, holders and rates, refreshed until interrupted")
    p.add_argument(
        "-d",
        "--delay",
        metavar="SECONDS",
        type=_positive,
        default=DEFAULT_DELAY,
        help=f"seconds between frames (default {DEFAULT_DELAY:g})",
    )
    p.add_argument(
        "-n",
        "--frames",
        metavar="N",
        type=_frames,
        help="stop after N frames (default: run until interrupted)",
    )
    p.add_argument("--once", action="store_true", help="show one frame and exit (-n 1)")


@dataclass(frozen=True)
class _Sample:
    at: float
    commands: int
    events: int


def _rates(stats: Any, now: float, before: _Sample | None) -> tuple[float, float, str]:
    """Commands/s and events/s, and what they are measured over."""
    if before is None:
        span = max(float(stats.uptime), 1e-9)
        return stats.commands / span, stats.events_emitted / span, "since start"
    span = max(now - before.at, 1e-9)
    commands = max(stats.commands - before.commands - OWN_COMMANDS, 0)
    return commands / span, (stats.events_emitted - before.events) / span, f"last {span:.1f} s"


def _frame_json(stats: Any, blocks: list[Any], rates: tuple[float, float, str]) -> str:
    data = {
        "stats": stats.model_dump(mode="json", by_alias=True, exclude={"limits"}),
        "rates": {"commands": rates[0], "events": rates[1], "over": rates[2]},
        "blocks": [
            {
                "id": b.id,
                "backend": b.backend,
                "size": b.size,
                "max-size": b.max_size,
                "holders": holder_count(b),
            }
            for b in blocks
        ],
    }
    return json.dumps(data, separators=(",", ":"))


def _frame_text(stats: Any, blocks: list[Any], rates: tuple[float, float, str]) -> str:
    head = (
        f"ramd: {stats.blocks} blocks, used {format_size(stats.used)}, "
        f"reserved {format_size(stats.reserved)}, {stats.clients} clients, "
        f"{stats.subscribers} subscribers, up {stats.uptime:.0f} s\n"
        f"commands/s: {rates[0]:.1f}  events/s: {rates[1]:.1f}  ({rates[2]})"
    )
    rows = [
        (
            b.id,
            b.backend,
            format_size(b.size),
            format_size(b.max_size),
            f"{100 * b.size // b.max_size}%" if b.max_size else "-",
            str(holder_count(b)),
        )
        for b in blocks
    ]
    return head + "\n\n" + table(("ID", "BACKEND", "SIZE", "MAX-SIZE", "USE", "HOLDERS"), rows)


async def _show(client: AsyncClient, args: argparse.Namespace) -> None:
    import asyncio

    frames = 1 if args.once else args.frames
    tty = not args.json and sys.stdout.isatty()
    before: _Sample | None = None
    shown = 0
    while True:
        stats = await client.query_stats()
        now = time.monotonic()
        blocks = await client.query_ram_blocks()
        rates = _rates(stats, now, before)
        before = _Sample(now, stats.commands, stats.events_emitted)
        if args.json:
            emit(_frame_json(stats, blocks, rates))
        else:
            text = _frame_text(stats, blocks, rates)
            emit(_CLEAR + text if tty else ("\n" if shown else "") + text)
        shown += 1
        if frames is not None and shown >= frames:
            return
        await asyncio.sleep(args.delay)


async def cmd_top(client: AsyncClient, args: argparse.Namespace) -> int:
    """Show frames until ``-n``/``--once`` are done or SIGINT (exit 0 either way)."""
    from ramd_client.cli_sigint import until_sigint

    await until_sigint(_show(client, args))
    return EXIT_OK
