"""Who holds a block, as ``ramctl info`` and ``ramctl top`` show it (docs/protocol.md §12).

A daemon whose ``RamBlockInfo`` carries ``holders`` (``[{"kind", "pid", "uid"}]``, full-access
peers only) is shown holder by holder; otherwise the counts it does report are shown
(``mappers``, and ``leases`` where present). Light: no pydantic; a block is any object with
those attributes (the models, or a ``query-ram-blocks`` entry read by attribute).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from ramd_client.cli_output import table

__all__ = ["Holder", "holder_count", "holder_kinds", "holders", "holders_text"]

#: ``(kind, pid, uid)``.
Holder = tuple[str, int, int]


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


def holders(block: Any) -> list[Holder] | None:
    """The block's holders one by one, or None when the daemon does not list them."""
    listed = getattr(block, "holders", None)
    if listed is None:
        return None
    return [(str(_field(h, "kind")), int(_field(h, "pid")), int(_field(h, "uid"))) for h in listed]


def holder_kinds(block: Any) -> dict[str, int]:
    """Holders by kind, from the list when there is one, else from the counts."""
    listed = holders(block)
    if listed is not None:
        return dict(Counter(kind for kind, _pid, _uid in listed))
    counts = {"mapper": int(getattr(block, "mappers", 0) or 0)}
    leases = getattr(block, "leases", None)
    if leases is not None:
        counts["lease"] = int(leases)
    return {kind: n for kind, n in counts.items() if n}


def holder_count(block: Any) -> int:
    return sum(holder_kinds(block).values())


def holders_text(block: Any) -> str:
    """``holders: N (kind n, ...)``, then a KIND/PID/UID table when the daemon lists them."""
    kinds = holder_kinds(block)
    total = sum(kinds.values())
    line = f"holders: {total}"
    if kinds:
        line += " (" + ", ".join(f"{kind} {n}" for kind, n in kinds.items()) + ")"
    listed = holders(block)
    if not listed:
        return line
    rows = [(kind, str(pid), str(uid)) for kind, pid, uid in listed]
    return line + "\n" + table(("KIND", "PID", "UID"), rows)
