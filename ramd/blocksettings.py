"""The settings a RAM block is created with: one list for every place that takes, records
or restores them (``ram-block-add`` and ``[[block]]``, the RAM list, images, a ``file``
block's metadata, the systemd fd store's names).

A setting applies to every backend, or to anonymous memory only (``merge``, ``hugepages``:
KSM and THP advice); only the boolean settings that apply to shared blocks are kept beside
their memory (metadata, fd store), each with its letter in an fd store name. Immutable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its name (the wire's and the attribute's), its default, and, when a
    shared block's memory keeps it, its letter in an fd store name."""

    name: str
    default: bool | None
    letter: str = ""

    @property
    def kept(self) -> bool:
        """Kept beside a shared block's memory (metadata, fd store)."""
        return bool(self.letter)


SETTINGS: tuple[Setting, ...] = (
    Setting("hugetlb", False, "h"),
    Setting("prealloc", False, "p"),
    Setting("merge", False),
    Setting("dump", True, "n"),
    Setting("hugepages", False),
    Setting("lock", False, "l"),
    Setting("align", None),
)
#: Every setting's name, in the order images record them.
NAMES: tuple[str, ...] = tuple(s.name for s in SETTINGS)
#: The settings a shared block's memory keeps (``file`` metadata, fd store names).
KEPT: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.kept)


def of(obj: Any) -> dict[str, Any]:
    """Every setting of ``obj`` (a block, or ``ram-block-add``'s arguments), by name."""
    return {s.name: getattr(obj, s.name) for s in SETTINGS}


def kept_of(obj: Any) -> dict[str, bool]:
    """The settings of ``obj`` that a shared block's memory keeps, by name."""
    return {s.name: bool(getattr(obj, s.name)) for s in KEPT}
