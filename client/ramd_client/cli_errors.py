"""What ``ramctl`` adds to the errors it reports: sizes in the units the CLI takes, and what
a timeout leaves behind.

The daemon's messages are fixed by the protocol (``Size too large: vm1: 0x80000000 >
0x40000000: Invalid argument``, ``Limit exceeded: max-used is 1073741824: ...``): they stay
as they are, and :func:`with_human_sizes` appends their sizes in powers of 1024 (``(2 GiB >
1 GiB)``). Light: no pydantic, no asyncio (the raw commands report errors too).
"""

from __future__ import annotations

import argparse
import re

from ramd.sizes import format_size

__all__ = ["timeout_hints", "with_human_sizes"]

#: Limits whose values are sizes in bytes (the others count blocks, connections, fds).
_SIZE_LIMITS = (
    "max-used",
    "max-reserved",
    "max-message-size",
    "io-chunk",
    "cgroup",
    "RLIMIT_MEMLOCK",
)
_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b")
_DECIMAL = re.compile(r"(?<![\w.-])\d+(?![\w.])")
_SIZE_LIMIT = re.compile(r"^Limit exceeded: (?:" + "|".join(map(re.escape, _SIZE_LIMITS)) + r")\b")


def _human(match: re.Match[str]) -> str:
    text = match.group(0)
    return format_size(int(text, 16) if text.startswith(("0x", "0X")) else int(text))


def with_human_sizes(desc: str) -> str:
    """``desc`` followed by its sizes in powers of 1024, in parentheses, or ``desc`` alone
    when it holds none: hexadecimal numbers (the protocol's sizes and offsets) anywhere, and
    decimal numbers in a refusal of a size limit. The part of the message from the first
    size to the last, widened to whole ``: ``-separated parts, is repeated with each size
    replaced (``Size too large: vm1: 0x80000000 > 0x40000000: Invalid argument`` gives
    ``(2 GiB > 1 GiB)``)."""
    pattern = _DECIMAL if _SIZE_LIMIT.match(desc) else _HEX
    found = list(pattern.finditer(desc))
    if not found:
        return desc
    start = desc.rfind(": ", 0, found[0].start())
    end = desc.find(": ", found[-1].end())
    span = desc[start + 2 if start >= 0 else 0 : end if end >= 0 else len(desc)]
    return f"{desc} ({pattern.sub(_human, span)})"


#: How to see whether a command that timed out completed anyway, by ``ramctl`` command.
_CHECKS = {
    "add": "ramctl info {id}",
    "resize": "ramctl info {id}",
    "del": "ramctl info {id}",
    "write": "ramctl info {id}",
    "discard": "ramctl info {id}",
    "save": "ramctl jobs",
    "load": "ramctl jobs",
    "rm-image": "ramctl images",
    "jobs": "ramctl jobs",
}


def timeout_hints(args: argparse.Namespace, method: str) -> list[str]:
    """What to tell the user after ``method`` (the JSON-RPC command) got no answer in time:
    for a command that changes something, or a ``save``/``load`` following its job, that the
    daemon may still complete it and how to check; always how to wait longer."""
    hints = []
    if args.command in ("save", "load"):
        hints.append(
            f"the {args.command} job goes on in the daemon: `ramctl jobs` shows it, "
            "`ramctl jobs cancel JOB` stops it"
        )
    elif not method.startswith("query-") and method != "subscribe":
        check = _CHECKS.get(args.command, "ramctl list").format(id=getattr(args, "id", ""))
        hints.append(
            f"the daemon may still complete {method}: it is not cancelled; check with `{check}`"
        )
    hints.append("wait longer with --timeout SECONDS (0: no limit)")
    return hints
