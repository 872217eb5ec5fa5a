"""In-process RAM block notifiers, after QEMU's ``hw/core/numa.c``.

A notifier is any object with ``added(block)`` and ``removed(block)``, and optionally
``resized(block, old_size, new_size)``. All calls happen synchronously on the thread that
owns the :class:`~ramd.ramblock.RAMList` (the asyncio loop thread in the daemon), in
registration order, at these points:

- add: the block is mapped (and preallocated), then ``added``;
- grow: the new tail is mapped and ``block.size`` is the new size, then ``resized``;
- shrink: ``resized`` while ``block.size`` is still the old size and the tail is still
  accessible, then the tail is released;
- remove: ``removed`` while the block is still mapped, then it is unmapped.

Registering replays ``added`` for every existing block, in creation order.

Safety net (the series' rule, made symmetric for a daemon where blocks come and go): a
notifier without ``resized`` cannot be registered while a resizable block exists, and a
resizable block cannot be created while such a notifier is registered. Both refusals raise
:class:`~ramd.errors.RamdError`.

Failure rule: a notifier cannot veto or interrupt a memory operation. If one raises, the
exception is logged, the remaining notifiers are still called and the operation completes,
so the block list and the mappings always agree.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, TypeGuard, runtime_checkable

from ramd.errors import RamdError

if TYPE_CHECKING:
    from ramd.ramblock import RAMBlock

log = logging.getLogger(__name__)


@runtime_checkable
class RamBlockNotifier(Protocol):
    """Receives ``added`` and ``removed`` for every block."""

    def added(self, block: RAMBlock) -> None: ...

    def removed(self, block: RAMBlock) -> None: ...


@runtime_checkable
class ResizeAwareNotifier(RamBlockNotifier, Protocol):
    """A notifier that also follows resizes; required once resizable blocks exist."""

    def resized(self, block: RAMBlock, old_size: int, new_size: int) -> None: ...


def supports_resize(notifier: RamBlockNotifier) -> TypeGuard[ResizeAwareNotifier]:
    """True if ``notifier`` has a callable ``resized``."""
    return callable(getattr(notifier, "resized", None))


class NotifierList:
    """The registered notifiers of one RAM list, in registration order."""

    def __init__(self) -> None:
        self._notifiers: list[RamBlockNotifier] = []

    def __len__(self) -> int:
        return len(self._notifiers)

    def all_support_resize(self) -> bool:
        """True if every registered notifier has ``resized`` (resizable blocks allowed)."""
        return all(supports_resize(n) for n in self._notifiers)

    def register(self, notifier: RamBlockNotifier, existing: Iterable[RAMBlock]) -> None:
        """Append ``notifier`` and replay ``added`` for each block of ``existing``."""
        blocks = list(existing)
        if not supports_resize(notifier) and any(b.resizable for b in blocks):
            raise RamdError(
                "RAM block notifier without resize support refused: resizable blocks exist"
            )
        if notifier in self._notifiers:
            raise RamdError("RAM block notifier already registered")
        self._notifiers.append(notifier)
        for block in blocks:
            self._call(notifier, "added", block)

    def unregister(self, notifier: RamBlockNotifier) -> None:
        """Remove ``notifier``; no callback is made."""
        self._notifiers.remove(notifier)

    def notify_added(self, block: RAMBlock) -> None:
        for n in list(self._notifiers):
            self._call(n, "added", block)

    def notify_removed(self, block: RAMBlock) -> None:
        for n in list(self._notifiers):
            self._call(n, "removed", block)

    def notify_resized(self, block: RAMBlock, old_size: int, new_size: int) -> None:
        for n in list(self._notifiers):
            self._call(n, "resized", block, old_size, new_size)

    @staticmethod
    def _call(notifier: RamBlockNotifier, what: str, block: RAMBlock, *args: int) -> None:
        try:
            getattr(notifier, what)(block, *args)
        except Exception:
            log.exception("RAM block notifier %r failed in %s(%s)", notifier, what, block.id)
