"""``ramctl``'s output: JSON documents, tables, ``key: value`` lines, event lines, and
:class:`Failure` (a local error the main function reports).

Everything goes to stdout and is flushed at once (``watch`` output reaches a pipe line by
line). Sizes are shown by :func:`ramd.sizes.format_size` (powers of 1024: ``KiB``, ``MiB``).
The models are only annotations here: this module imports no pydantic.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ramd.sizes import format_size

if TYPE_CHECKING:
    from ramd.api import models as m
    from ramd_client.events import Event

__all__ = [
    "EXIT_CONNECT",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Failure",
    "block_details",
    "block_table",
    "emit",
    "emit_json",
    "event_line",
    "pairs",
    "table",
]


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3


class Failure(Exception):
    """A local failure with its exit status, error class (for ``--json``) and message."""

    def __init__(self, status: int, message: str, error_class: str = "LocalError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_class = error_class


_SIZE_FIELDS = frozenset({"size", "max-size", "old-size", "new-size", "page-size"})


def emit(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def emit_json(data: Any) -> None:
    emit(json.dumps(data, indent=2))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, headers first."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


def pairs(items: Sequence[tuple[str, str]]) -> str:
    """``key: value`` lines, values aligned."""
    width = max(len(k) for k, _ in items) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}" for k, v in items)


def _reported(block: m.RamBlockInfo, name: str) -> Any:
    """Field ``name`` of ``block`` when this daemon and client report it, else None: the
    holder fields (``leases``, ``sealed``, ``holders``, docs/protocol.md §12, §14) are newer than
    ``mappers``, and an older daemon's or model's block has none."""
    return getattr(block, name, None)


def _flags(block: m.RamBlockInfo) -> str:
    names = [
        name
        for name, on in (
            ("resizable", block.resizable),
            ("persistent", block.persistent),
            ("sealed", bool(_reported(block, "sealed"))),
            ("prealloc", block.prealloc),
            ("merge", block.merge),
            ("nodump", not block.dump),
            ("hugepages", block.hugepages),
            ("hugetlb", block.hugetlb),
            ("lock", block.lock),
        )
        if on
    ]
    return ",".join(names) or "-"


def block_table(blocks: Sequence[m.RamBlockInfo]) -> str:
    """One row per block; a LEASES column when a block has leases (``info`` shows them
    always)."""
    leases = any(_reported(b, "leases") for b in blocks)
    headers = ["ID", "SIZE", "MAX-SIZE", "RESIDENT", "BACKEND", "MAPPERS"]
    headers += ["LEASES"] if leases else []
    headers += ["PAGE", "OFFSET", "FLAGS"]
    rows = []
    for b in blocks:
        row = [
            b.id,
            format_size(b.size),
            format_size(b.max_size),
            "-" if b.resident is None else format_size(b.resident),
            b.backend,
            str(b.mappers),
        ]
        if leases:
            n = _reported(b, "leases")
            row.append("-" if n is None else str(n))
        row += [format_size(b.page_size), hex(b.offset), _flags(b)]
        rows.append(row)
    return table(headers, rows)


def _holders(holders: Sequence[Any]) -> str:
    """``kind pid/uid`` of each holder (objects or dicts), comma-separated."""

    def field(h: Any, name: str) -> Any:
        return h.get(name) if isinstance(h, dict) else getattr(h, name, None)

    shown = [f"{field(h, 'kind')} pid {field(h, 'pid')} uid {field(h, 'uid')}" for h in holders]
    return ", ".join(shown) or "-"


def block_details(b: m.RamBlockInfo) -> str:
    """``key: value`` lines; the holder fields only when the daemon reports them."""

    def yes(v: bool) -> str:
        return "yes" if v else "no"

    def size(n: int) -> str:
        return f"{format_size(n)} ({n})"

    items = [
        ("id", b.id),
        ("size", size(b.size)),
        ("max-size", size(b.max_size)),
        ("resizable", yes(b.resizable)),
        ("page-size", format_size(b.page_size)),
        ("resident", "-" if b.resident is None else size(b.resident)),
        ("host", "-" if b.host is None else hex(b.host)),
        ("offset", hex(b.offset)),
        ("backend", b.backend),
        ("shared", yes(b.shared)),
        ("persistent", yes(b.persistent)),
    ]
    if b.path is not None:
        items.append(("path", b.path))
    items.append(("mappers", str(b.mappers)))
    for name in ("leases", "sealed", "holders"):
        value = _reported(b, name)
        if value is None:
            continue
        if isinstance(value, bool):
            items.append((name, yes(value)))
        elif name == "holders":
            items.append((name, _holders(value)))
        else:
            items.append((name, str(value)))
    items += [
        ("prealloc", yes(b.prealloc)),
        ("merge", yes(b.merge)),
        ("dump", yes(b.dump)),
        ("hugepages", yes(b.hugepages)),
        ("hugetlb", yes(b.hugetlb)),
        ("lock", yes(b.lock)),
    ]
    return pairs(items)


def event_line(event: Event) -> str:
    """One human line per event: time, name, seq, id, then its other fields."""
    stamp = event.timestamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    data = event.data.model_dump(by_alias=True)
    parts = [stamp, event.name, f"seq={data.pop('seq')}", f"id={data.pop('id')}"]
    replay = data.pop("replay", False)
    for key, value in data.items():
        if key in _SIZE_FIELDS:
            parts.append(f"{key}={format_size(value)}")
        elif key == "host":
            parts.append(f"host={value:#x}")
        elif isinstance(value, bool):
            parts.append(f"{key}={'yes' if value else 'no'}")
        else:
            parts.append(f"{key}={value}")
    if replay:
        parts.append("(replay)")
    return " ".join(parts)
