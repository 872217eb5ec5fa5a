"""Pins: leases that hold a RAM block against change while someone uses its memory.

A pin is taken with :meth:`Pins.take` (check-and-set: it either returns a :class:`Pin` or
raises the protocol's "busy" :class:`~ramd.errors.RamdError`, never an assertion) and given
back exactly once with :meth:`Pin.release`. Two kinds:

- *exclusive*: the block is changing or must not change under work that writes it (creation
  and prealloc, a large locked grow, a release waiting for its holders, a load). Nothing
  else may pin it meanwhile.
- *shared*: readers (a save) that only need the block to stay as it is; any number of them
  may hold it together, but not beside an exclusive pin.

Every command that would change a block (resize, remove, write, discard) asks
:meth:`Pins.check` first; a pinned block answers "busy: WHY". A handler that must wait takes
its pin before it returns its awaitable, so no other request can slip into the gap.

Thread: pins are taken and released on the thread that owns the RAM list (the loop thread);
work in a worker thread only relies on a pin its caller holds.
"""

from __future__ import annotations

from ramd.errors import RamdError


class Pin:
    """One holding of a block's pin; :meth:`release` it exactly once (later calls do
    nothing). ``why`` completes the busy answer and may be updated while held
    (``waiting for 2 mapper(s)``). ``releasing``: a release of the block's memory is pending
    (docs/protocol.md §8: a connection never becomes a holder of such a block)."""

    __slots__ = ("_pins", "releasing", "shared", "why")

    def __init__(self, pins: Pins, why: str, *, shared: bool, releasing: bool) -> None:
        self._pins: Pins | None = pins
        self.why = why
        self.shared = shared
        self.releasing = releasing

    @property
    def held(self) -> bool:
        return self._pins is not None

    def release(self) -> None:
        pins, self._pins = self._pins, None
        if pins is not None:
            pins._drop(self)


class Pins:
    """The pins of one block."""

    __slots__ = ("_exclusive", "_shared", "block_id")

    def __init__(self, block_id: str) -> None:
        self.block_id = block_id
        self._exclusive: Pin | None = None
        self._shared: list[Pin] = []

    @property
    def why(self) -> str | None:
        """Why the block is pinned, or None when it is not."""
        if self._exclusive is not None:
            return self._exclusive.why
        return self._shared[0].why if self._shared else None

    @property
    def releasing(self) -> bool:
        """A release of this block's memory is waiting for its holders."""
        return self._exclusive is not None and self._exclusive.releasing

    def check(self) -> None:
        """Refuse ("busy") if the block is pinned at all."""
        why = self.why
        if why is not None:
            raise RamdError(f"RAM block '{self.block_id}' is busy: {why}")

    def take(self, why: str, *, shared: bool = False, releasing: bool = False) -> Pin:
        """Pin the block, or raise "busy" if that conflicts with a pin already held."""
        if self._exclusive is not None or (self._shared and not shared):
            self.check()
        pin = Pin(self, why, shared=shared, releasing=releasing)
        if shared:
            self._shared.append(pin)
        else:
            self._exclusive = pin
        return pin

    def _drop(self, pin: Pin) -> None:
        if pin is self._exclusive:
            self._exclusive = None
        elif pin in self._shared:
            self._shared.remove(pin)
