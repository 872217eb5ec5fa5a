"""Which other uids may open one block file while they hold it (docs/protocol.md §8).

A :class:`UidGrants` belongs to one shared block's memory and counts, per uid, the holdings
of that uid: read-only and read-write ones. After every change the file's ACL
(:mod:`.acl`) is recomputed from the counts: a uid with any read-write holding gets
``rw-``, a uid with read-only holdings only gets ``r--``, a uid with none gets nothing. So a
grant ends with the last holding of its uid, and a read-only holder can reopen the file
writable only while its uid also holds it writable.

Holders (a connection that got an fd, later a lease or a VMM) are tracked by :meth:`hold` /
:meth:`unhold`, which keep one holding per holder (the widest it was given) and turn into
:meth:`grant` / :meth:`release`. The daemon's own uid and root need no grant (the owner and
``CAP_DAC_OVERRIDE``) and get none; a negative uid (unknown) gets none either.

Failures to set the ACL are logged, never raised: a grant that could not be set leaves the
holder with less access (it still maps the fd it was given), never more; a revocation that
could not be set is logged as an error. Thread: the owner of the block (the loop thread).
"""

from __future__ import annotations

import logging
import os

from ramd.hostmem import acl

log = logging.getLogger(__name__)


class UidGrants:
    """Holdings per uid of one block file and the ACL they give; ``fd`` is not owned."""

    def __init__(self, fd: int, name: str) -> None:
        """Start with no grant: the file is made mode 0600 without ACL entries (a memfd is
        created 0777; an adopted file or memfd may carry an earlier daemon's grants)."""
        self._fd = fd
        self._name = name
        self._own = {0, os.geteuid()}
        #: uid -> [read-only holdings, read-write holdings]
        self._counts: dict[int, list[int]] = {}
        self._holders: dict[object, tuple[int, bool]] = {}
        self.supported = acl.set_users(fd, {})

    def users(self) -> dict[int, bool]:
        """The uids granted access now, each with whether it may write."""
        return {uid: c[1] > 0 for uid, c in self._counts.items() if c[0] or c[1]}

    def grant(self, uid: int, writable: bool) -> None:
        """One more holding by ``uid`` (read-write when ``writable``)."""
        if uid < 0 or uid in self._own:
            return
        before = self.users()
        self._counts.setdefault(uid, [0, 0])[writable] += 1
        self._apply(before)

    def release(self, uid: int, writable: bool) -> None:
        """One holding by ``uid`` ended (the one :meth:`grant` counted)."""
        counts = self._counts.get(uid)
        if counts is None or counts[writable] == 0:
            return
        before = self.users()
        counts[writable] -= 1
        if counts == [0, 0]:
            del self._counts[uid]
        self._apply(before)

    def hold(self, holder: object, uid: int, writable: bool) -> None:
        """``holder`` (of ``uid``) holds the block, writable or not; a holder that holds it
        already keeps one holding, widened to writable if it is now."""
        held = self._holders.get(holder)
        if held is not None:
            if held[1] or not writable:
                return
            self.release(*held)
        self._holders[holder] = (uid, writable)
        self.grant(uid, writable)

    def unhold(self, holder: object) -> None:
        """``holder`` no longer holds the block (no-op if it did not)."""
        held = self._holders.pop(holder, None)
        if held is not None:
            self.release(*held)

    def _apply(self, before: dict[int, bool]) -> None:
        users = self.users()
        if users == before:
            return
        if not self.supported:
            if len(users) > len(before):
                log.info(
                    "%s: no POSIX ACLs on its filesystem: uid(s) %s may map the fd they hold"
                    " but not reopen it",
                    self._name,
                    sorted(users),
                )
            return
        try:
            acl.set_users(self._fd, users)
        except OSError as e:
            revoked = any(u not in users or (w and not users[u]) for u, w in before.items())
            level = logging.ERROR if revoked else logging.WARNING
            log.log(level, "%s: cannot set its ACL to %s: %s", self._name, users, e)


__all__ = ["UidGrants"]
