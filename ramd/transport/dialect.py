"""What a connection needs from a wire dialect: protocol logic without I/O.

A dialect turns one complete JSON text into the bytes of its answer (or nothing), words
splitter errors, encodes events and may greet. It owns the connection's
:class:`~ramd.api.service.Session`. Loop thread only; one dialect object per connection.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from ramd.api.events import Event
from ramd.api.service import Session
from ramd.transport.splitter import SplitError

Reply = bytes | None


class Dialect(Protocol):
    """Protocol logic of one connection."""

    name: str
    session: Session

    def greeting(self) -> bytes | None:
        """Bytes to send when the connection opens."""
        ...

    def handle(self, message: bytes) -> Reply | Awaitable[Reply]:
        """Answer one JSON text; an awaitable when the command must wait."""
        ...

    def split_error(self, error: SplitError) -> bytes:
        """The parse error for input the splitter rejected."""
        ...

    def refusal(self, desc: str) -> bytes:
        """A message sent before closing a connection that is refused (limits, access)."""
        ...

    def encode_event(self, event: Event) -> bytes | None:
        """The event on the wire, or None when this connection must not get it now."""
        ...
