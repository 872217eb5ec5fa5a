"""Whether ``quit`` may stop the daemon: not while it would free blocks that clients may
still use.

A ``quit`` typed into ``qmp-shell`` must not take memory away from its users: while any block
that is not persistent exists (``anonymous`` or ``memfd``: both die with the process; a
``memfd`` block in systemd's fd store is dropped too when the unit stops for good), ``quit``
is refused and says how to stop the daemon deliberately. ``file`` blocks outlive the daemon
(docs/protocol.md §9), so they never hold ``quit`` back. SIGTERM is not affected.

Thread: the loop thread (the command handler).
"""

from __future__ import annotations

from ramd.errors import RamdError
from ramd.ramblock import RAMList

__all__ = ["SHOWN_IDS", "refuse_if_blocks_would_be_freed"]

#: Block ids named in the refusal; more are counted.
SHOWN_IDS = 5


def refuse_if_blocks_would_be_freed(ram: RAMList) -> None:
    """Raise :class:`~ramd.errors.RamdError` (``GenericError``) naming the blocks a shutdown
    would free and how to stop the daemon anyway; return when there are none.

    Blocks still being created (not yet committed) are not counted."""
    volatile = [block.id for block in ram if not block.persistent]
    if not volatile:
        return
    shown = ", ".join(f"'{block_id}'" for block_id in volatile[:SHOWN_IDS])
    if len(volatile) > SHOWN_IDS:
        shown += f" and {len(volatile) - SHOWN_IDS} more"
    count = "1 RAM block" if len(volatile) == 1 else f"{len(volatile)} RAM blocks"
    raise RamdError(
        f"quit refused: it would free {count} that {'is' if len(volatile) == 1 else 'are'}"
        f" not persistent ({shown}); delete them first (ram-block-del), or stop the service"
        " to free them anyway (systemctl stop ramd, or SIGTERM)"
    )
