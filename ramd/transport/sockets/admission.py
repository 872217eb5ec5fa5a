"""Who may connect, with which access, and how many connection slots each peer may hold.

Access (docs/protocol.md §11): a peer is read-only when its uid is in ``readonly-uids`` or any of
its groups (primary or supplementary, ``SO_PEERGROUPS``) is in ``readonly-gids``; otherwise it
is refused when allow lists are set and neither its uid nor any of its groups is on them.
When the kernel cannot tell the peer's groups and a gid rule is configured, the peer is
refused (a missed read-only group would grant full access).

Slots: at most ``max-connections`` connections in all. uid 0 is never counted against the
others: it has no per-uid share, and the last :func:`root_reserve` slots are kept for it, so
non-root peers, however many connections they open, can never lock root out. Every non-root
uid holds at most ``max-connections-per-uid`` connections.

Ownership and thread: owned by the :class:`~ramd.transport.sockets.server.Server`, used on the loop
thread. A connection is counted from a successful :meth:`Admission.admit` until
:meth:`Admission.release`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

from ramd.config import Config, Limits
from ramd.transport.sockets.peer import PeerCredentials

#: Most slots kept for uid 0.
ROOT_RESERVE_MAX = 8

#: A refusal's text (from :class:`Admission` or the server) by its start, and the short
#: reason it is counted under (``ramd_refused_connections_total{reason}``): a few fixed
#: words, never the uid or the numbers in the text. Longest prefixes first.
REFUSAL_REASONS = (
    ("Limit exceeded: max-connections-per-uid", "max-connections-per-uid"),
    ("Limit exceeded: max-connections", "max-connections"),
    ("Permission denied: the groups", "groups-unknown"),
    ("Permission denied", "not-allowed"),
    ("the daemon is shutting down", "shutting-down"),
)


def refusal_reason(text: str) -> str:
    """The short reason a refusal ``text`` is counted under (``other`` if none matches)."""
    for prefix, reason in REFUSAL_REASONS:
        if text.startswith(prefix):
            return reason
    return "other"


def root_reserve(max_connections: int) -> int:
    """Slots non-root peers can never take: an eighth of ``max-connections``, at least 1 and
    at most :data:`ROOT_RESERVE_MAX` (so ``max-connections = 1`` admits root only)."""
    return min(ROOT_RESERVE_MAX, max(1, max_connections // 8))


class Admission:
    """The access rules and the connection slots of one server."""

    def __init__(self, config: Config, limits: Limits) -> None:
        self.config = config
        self.max_connections = limits.max_connections
        self.per_uid = limits.max_connections_per_uid
        self.reserve = root_reserve(self.max_connections)
        self._uid_of: dict[Hashable, int] = {}
        self._count: Counter[int] = Counter()

    def access(self, peer: PeerCredentials) -> tuple[str, str | None]:
        """``("readonly" | "full", refusal or None)`` from the uid and gid rules only."""
        cfg = self.config
        if peer.groups is None and (cfg.allow_gids or cfg.readonly_gids):
            return "full", f"Permission denied: the groups of uid {peer.uid} cannot be read"
        groups = peer.groups or frozenset()
        readonly = peer.uid in cfg.readonly_uids or not groups.isdisjoint(cfg.readonly_gids)
        allowed = (
            not (cfg.allow_uids or cfg.allow_gids)
            or peer.uid in cfg.allow_uids
            or not groups.isdisjoint(cfg.allow_gids)
        )
        if not readonly and not allowed:
            return "full", f"Permission denied: uid {peer.uid} gid {peer.gid} is not allowed"
        return ("readonly" if readonly else "full"), None

    def slot_refusal(self, uid: int) -> str | None:
        """Why a new connection of ``uid`` gets no slot now, or None."""
        total = len(self._uid_of)
        if uid == 0:
            if total >= self.max_connections:
                return f"Limit exceeded: max-connections is {self.max_connections}"
            return None
        if total - self._count[0] >= self.max_connections - self.reserve or (
            total >= self.max_connections
        ):
            return (
                f"Limit exceeded: max-connections is {self.max_connections}"
                f" (the last {self.reserve} kept for uid 0)"
            )
        if self._count[uid] >= self.per_uid:
            return f"Limit exceeded: max-connections-per-uid is {self.per_uid}"
        return None

    def admit(self, conn: Hashable, peer: PeerCredentials) -> tuple[str, str | None]:
        """Decide for a new connection; when it is admitted, count it until :meth:`release`."""
        refusal = self.slot_refusal(peer.uid)
        if refusal is not None:
            return "full", refusal
        access, refusal = self.access(peer)
        if refusal is None:
            self._uid_of[conn] = peer.uid
            self._count[peer.uid] += 1
        return access, refusal

    def release(self, conn: Hashable) -> None:
        """Free the slot of ``conn`` (no-op if it was never admitted or already released)."""
        uid = self._uid_of.pop(conn, None)
        if uid is not None:
            self._count[uid] -= 1
            if not self._count[uid]:
                del self._count[uid]
