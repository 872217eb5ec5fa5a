"""What running one command came to: the explicit outcomes that dialects format.

:func:`ramd.api.dispatch.call` never raises for anything a client can cause; it returns one of
these. A dialect turns each into its wire form (JSON-RPC codes, QMP classes) in one place, and
the request pipeline awaits a :class:`Pending` in one place. Immutable; loop thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic_core import ErrorDetails


@dataclass(slots=True)
class Done:
    """Success. ``value`` is JSON-ready data, or ``raw`` the result already encoded as
    ASCII JSON (large listings are spliced in, not encoded again).

    Never changed once made, like the other outcomes, but not frozen: one is made per
    successful call, and a frozen dataclass sets each field through ``object.__setattr__``
    (three times the cost)."""

    value: Any = None
    raw: bytes | None = None
    #: File descriptors sent with the answer; owned by whoever holds this outcome until the
    #: output takes them (or they are closed, when no answer is sent).
    fds: tuple[int, ...] = ()
    #: Undoes what the call did for the peer holding ``fds`` when they cannot be sent (the
    #: call then fails): called once, on the loop thread, at most.
    unsent: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """The command refused or failed: QMP error ``error_class`` and the protocol's text."""

    error_class: str
    desc: str


@dataclass(frozen=True, slots=True)
class BadArguments:
    """The arguments failed validation; ``errors`` is pydantic's list."""

    errors: list[ErrorDetails]

    def message(self) -> str:
        """``field: reason`` for each bad field, joined by ``; ``."""
        parts = []
        for err in self.errors:
            field = ".".join(str(p) for p in err["loc"]) or "params"
            parts.append(f"{field}: {err['msg']}")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class NotFound:
    """No command of that name."""

    name: str


@dataclass(frozen=True, slots=True)
class Internal:
    """A bug in the daemon (logged with its traceback); clients get a generic message."""


#: What a :class:`Pending` finally comes to.
Final = Done | Failed | Internal


@dataclass(frozen=True, slots=True)
class Pending:
    """The command continues (work in a thread, acknowledgements, backpressure); ``result``
    yields its final outcome and never raises."""

    result: Awaitable[Final]


Outcome = Done | Failed | BadArguments | NotFound | Internal | Pending

#: How each final outcome is counted: its index in :data:`ramd.metrics.counters.OUTCOMES`
#: (``ramd_commands_total``'s ``outcome`` label: ``ok``, ``refused``, ``invalid``,
#: ``internal``).
OUTCOME_INDEX: dict[type, int] = {
    Done: 0,
    Failed: 1,
    BadArguments: 2,
    NotFound: 2,
    Internal: 3,
}
