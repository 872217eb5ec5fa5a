"""What the request pipeline needs from a wire dialect: protocol logic without I/O.

A dialect turns one complete JSON text into either its answer right away (bytes, or None for
nothing to send: a notification) or a :class:`Plan`: the calls that text asks for, run one at
a time by the pipeline, each :class:`~ramd.api.outcome.Outcome` formatted by the dialect, and
the answer assembled at the end. A text that asks for a single call (the common case) may run
it in :meth:`Dialect.handle` and answer at once; only when its outcome is pending, or carries
fds, does it become a one-step plan that starts with that outcome. A dialect also words
splitter errors and refusals, encodes events and may greet. It owns the connection's
:class:`~ramd.api.service.Session`. Loop thread only; one dialect object per connection.
"""

from __future__ import annotations

from typing import Protocol

from ramd.api.events import Event
from ramd.api.outcome import Final, Outcome
from ramd.api.service import Session
from ramd.transport.protocol.splitter import SplitError

Reply = bytes | None


class Plan(Protocol):
    """The calls of one message, in order, and the answer they add up to.

    The pipeline calls :meth:`step` until it returns None; after each step that returned an
    outcome it calls :meth:`record` with it, or, for a :class:`~ramd.api.outcome.Pending`,
    with its final outcome once settled (no other step runs in between). Then it sends
    :meth:`finish`, with the fds the calls' outcomes carried (``fds``: the plan owns them
    until then, and closes those of answers it does not send).
    """

    fds: list[int]

    @property
    def done(self) -> bool:
        """Every call has run: :meth:`step` would return None."""
        ...

    def step(self) -> Outcome | None:
        """Run the next call; None when every call has run."""
        ...

    def record(self, outcome: Outcome) -> None:
        """The outcome of the call :meth:`step` just ran (never a ``Pending``)."""
        ...

    def finish(self) -> Reply:
        """The message's answer."""
        ...

    def fds_failed(self, reason: str) -> Reply:
        """The message's answer when its fds could not be sent (``reason`` says why): the
        calls that carried them fail with that text, the others keep their answers."""
        ...


class Dialect(Protocol):
    """Protocol logic of one connection."""

    name: str
    session: Session

    def greeting(self) -> bytes | None:
        """Bytes to send when the connection opens."""
        ...

    def handle(self, message: bytes | bytearray) -> Reply | Plan:
        """The answer to one JSON text, or the plan of the calls it asks for."""
        ...

    def split_error(self, error: SplitError) -> bytes:
        """The parse error for input the splitter rejected."""
        ...

    def refusal(self, desc: str) -> bytes:
        """A message sent before closing a connection that is refused (limits, access)."""
        ...

    def no_memory(self) -> bytes:
        """The answer to a message that could not be handled for lack of memory."""
        ...

    def encode_event(self, event: Event) -> bytes | None:
        """The event on the wire, or None when this connection must not get it now."""
        ...


__all__ = ["Dialect", "Final", "Plan", "Reply"]
