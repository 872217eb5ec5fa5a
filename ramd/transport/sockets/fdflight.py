"""File descriptors in flight: sent to peers that have not read them yet (docs/protocol.md §11).

An fd sent with ``SCM_RIGHTS`` sits in the peer's receive queue until the peer reads the byte
it came with. Meanwhile the kernel counts it against the *sender's* ``RLIMIT_NOFILE`` (unless
the sender has ``CAP_SYS_RESOURCE``): past that many fds in flight, every ``sendmsg`` with an
fd fails with ``ETOOMANYREFS``, for every peer. So peers that ask for fds and never read them
could stop fd passing for everyone. Two bounds prevent it:

- per connection, at most one answer with fds is unread: the next one waits until the peer
  read the previous one (:class:`~ramd.transport.sockets.output.Output` asks the socket,
  ``TIOCOUTQ``:
  nothing left in the send queue means the peer read everything sent before);
- in all, answers that carry several fds (batches) go only while the fds in flight stay within
  half of the limit, so the other half is for single-fd answers, of which there is at most one
  per connection, and connections are fewer than that (:mod:`ramd.process.fdbudget`). A single-fd
  answer is refused only at the limit itself, where the kernel would refuse it anyway.

An answer that cannot go fails its requests with an error instead (the connection keeps
working). When the count is short, every connection with fds in flight is asked whether its
peer read them by now (:meth:`FdFlight.sweep`), so stale counts never refuse anybody.

Ownership and thread: one per server, shared by its connections' outputs; loop thread only.
"""

from __future__ import annotations

from typing import Protocol

from ramd.process.fdbudget import nofile_limit


class Holder(Protocol):
    """An output that may have fds in flight."""

    def peer_read_all(self) -> bool:
        """Whether the peer read everything sent so far; if so, it calls :meth:`FdFlight.read`
        (its fds are no longer in flight)."""
        ...


class FdFlight:
    """Counts the fds in flight per holder and in all (see the module docstring)."""

    __slots__ = ("_held", "limit", "total")

    def __init__(self, limit: int | None = None) -> None:
        #: The most fds in flight the kernel allows (the soft ``RLIMIT_NOFILE``).
        self.limit = nofile_limit() if limit is None else limit
        self._held: dict[Holder, int] = {}
        #: fds sent and not known to be read.
        self.total = 0

    def refusal(self, count: int) -> str | None:
        """Why an answer with ``count`` fds may not be sent now, or None (then the caller
        sends it and calls :meth:`sent`)."""
        if self._fits(count):
            return None
        self.sweep()
        if self._fits(count):
            return None
        return (
            f"Limit exceeded: fd budget: {self.total} file descriptors are in flight to peers"
            f" that have not read them (RLIMIT_NOFILE is {self.limit})"
        )

    def _fits(self, count: int) -> bool:
        bound = self.limit if count <= 1 else self.limit // 2
        return self.total + count <= bound

    def sent(self, holder: Holder, count: int) -> None:
        """``holder`` sent ``count`` fds."""
        self._held[holder] = self._held.get(holder, 0) + count
        self.total += count

    def read(self, holder: Holder) -> None:
        """The peer of ``holder`` read every fd it was sent (or it is gone)."""
        self.total -= self._held.pop(holder, 0)

    def sweep(self) -> None:
        """Forget the fds of every holder whose peer read them by now (a holder whose peer
        did calls :meth:`read` itself)."""
        for holder in list(self._held):
            holder.peer_read_all()
