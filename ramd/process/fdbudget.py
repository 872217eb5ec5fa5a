"""The daemon's file descriptor budget (docs/protocol.md §11; issue 21, point 5).

Every fd the daemon holds counts against its ``RLIMIT_NOFILE``; at the limit, ``accept``,
``memfd_create`` and ``open`` fail for everyone (``EMFILE``), root included. So the daemon
raises its soft limit to the hard one at start (:func:`raise_nofile_limit`), and bounds what
peers can make it hold so that, together, it never reaches the limit:

- ``MARGIN`` fds are kept for the daemon itself: listeners, log, event loop, ``memory-dir``
  and its lock, systemd sockets (``DAEMON_FDS``), the image files of the active jobs
  (``JOB_FDS``) and refused connections that linger until their peer read the refusal
  (``LINGERING_FDS``);
- each connection may hold ``PER_CONNECTION``: its socket and the duplicate it is read from,
  the received fds waiting for a ``getfd`` of the same message, its named ``getfd`` fds, and
  one fd of an answer waiting to be sent;
- each shared block (``memfd`` or ``file``) holds one fd; anonymous blocks hold none (they
  only count against ``max-blocks``).

The rest of the limit, ``budget``, is shared: a new connection or a new shared block is
refused ("Limit exceeded: fd budget is ...") when it would not fit. Root keeps room for
``reserve`` connections (the slots :mod:`ramd.transport.sockets.admission` keeps for uid 0; fewer
when the budget is small, :attr:`FdBudget.kept_for_root`): other peers' connections and
every shared block leave it free, so they can never lock root out.

Ownership and thread: one per service, loop thread only. ``connections`` is kept by the
server (admitted connections); shared blocks are counted on the RAM list when asked.
"""

from __future__ import annotations

import logging
import resource
from typing import TYPE_CHECKING

from ramd.errors import RamdError

if TYPE_CHECKING:
    from ramd.api.service import Service

log = logging.getLogger("ramd")

#: fds of the daemon itself, whatever peers do (see the module docstring).
DAEMON_FDS = 32
#: The image file (and its directory) of each active job: ``max-jobs`` (16) of them.
JOB_FDS = 2 * 16
#: Refused connections kept half-open (``MAX_LINGERING`` of the server) hold two each.
LINGERING_FDS = 2 * 64
MARGIN = DAEMON_FDS + JOB_FDS + LINGERING_FDS
#: Socket + duplicate, ``MAX_RECEIVED_FDS`` (4), ``MAX_NAMED_FDS`` (8), one answer's fd.
PER_CONNECTION = 2 + 4 + 8 + 1


def nofile_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` (unlimited counts as a large number)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def raise_nofile_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; the soft limit now (the daemon
    logs it once started). Where that is not allowed (a seccomp filter without
    ``@resources``), the soft limit stays as it is, with a warning: ``LimitNOFILE=`` in the
    unit sets both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log.warning("RLIMIT_NOFILE: cannot raise %d to %d: %s", soft, hard, e)
    return nofile_limit()


class FdBudget:
    """What connections and shared blocks may hold (see the module docstring)."""

    __slots__ = ("budget", "connections", "limit", "reserve")

    def __init__(self, limit: int, reserve: int = 1) -> None:
        #: ``RLIMIT_NOFILE``, and what of it peers may make the daemon hold.
        self.limit = limit
        self.budget = max(0, limit - MARGIN)
        #: Connections kept free for uid 0.
        self.reserve = reserve
        #: Admitted connections now (kept by the server).
        self.connections = 0

    def _refusal(self, shared: int, more: str) -> str:
        return (
            f"Limit exceeded: fd budget is {self.budget} (RLIMIT_NOFILE {self.limit} less"
            f" {MARGIN} kept for the daemon): {shared} shared blocks and {self.connections}"
            f" connections ({PER_CONNECTION} fds each) hold it, {more}"
        )

    @property
    def kept_for_root(self) -> int:
        """Connections kept for uid 0: ``reserve``, but at most an eighth of what the budget
        holds (at least one), so that a small limit still admits other peers."""
        return min(self.reserve, max(1, self.budget // PER_CONNECTION // 8))

    def connection_refusal(self, shared: int, root: bool) -> str | None:
        """Why one more connection (of root when ``root``) does not fit, or None."""
        kept = 0 if root else self.kept_for_root
        if shared + (self.connections + 1 + kept) * PER_CONNECTION <= self.budget:
            return None
        return self._refusal(shared, "no room for another connection")

    def block_refusal(self, shared: int) -> str | None:
        """Why one more shared block does not fit, or None."""
        if shared + 1 + (self.connections + self.kept_for_root) * PER_CONNECTION <= self.budget:
            return None
        return self._refusal(shared, "no room for another shared block")


def shared_blocks(service: Service) -> int:
    """Blocks that hold an fd now: shared ones, and (at most) every block being created."""
    return service.ram.pending + sum(1 for block in service.ram if block.shared)


def connection_refusal(service: Service, root: bool) -> str | None:
    """Why the fd budget has no room for one more connection now, or None. Every block
    counted as shared first (no walk over the blocks), the exact count only when that is
    short."""
    budget = service.fd_budget
    if budget.connection_refusal(len(service.ram) + service.ram.pending, root) is None:
        return None
    return budget.connection_refusal(shared_blocks(service), root)


def check_shared_add(service: Service, backend: str) -> None:
    """Refuse (``RamdError``) a new block of ``backend`` that the fd budget cannot hold."""
    if backend == "anonymous":
        return
    refusal = service.fd_budget.block_refusal(shared_blocks(service))
    if refusal is not None:
        raise RamdError(refusal)
