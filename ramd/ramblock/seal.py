"""Templates: a ``memfd`` block sealed so that its memory can never change again
(docs/protocol.md §14).

:func:`seal` makes the daemon's own view read-only, then seals the memfd
(:meth:`~ramd.hostmem.shared.MemfdMemory.seal`); the kernel refuses while another process
maps it writable, and then nothing changed. A sealed block stays sealed for its whole life
(also across the fd store: :mod:`ramd.fdstore` adopts it read-only).

What a seal forbids is refused by the block layer before anything is tried:
:func:`check_not_sealed` for writes, discards, loads and attachments, and :func:`guard`
(one of :attr:`~ramd.ramblock.RAMList.guards`) for every resize. A removal is not refused:
:func:`ramd.ramblock.change.remove` drops a sealed block at once, whatever holds it, since
clones keep their own mappings of memory that cannot change.

Thread: the loop thread that owns the RAM list.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING

from ramd.errors import RamdError
from ramd.hostmem.shared import MemfdMemory
from ramd.ramblock.block import RAMBlock

if TYPE_CHECKING:
    from ramd.ramblock.registry import RAMList

log = logging.getLogger(__name__)


def check_not_sealed(block: RAMBlock) -> None:
    """Refuse any change of ``block``'s memory or size once it is sealed."""
    if block.sealed:
        raise RamdError(f"RAM block '{block.id}' is sealed")


def guard(block: RAMBlock, new_size: int | None) -> None:
    """The RAM list guard: a sealed block cannot be resized (its removal is allowed)."""
    if new_size is not None:
        check_not_sealed(block)


def seal(ram: RAMList, block_id: str) -> RAMBlock:
    """Seal block ``block_id`` (a no-op when it is sealed already); the block. Refused
    (``RamdError``, nothing changed): not a ``memfd`` block, pinned ("busy"), or mapped
    writable by another process."""
    block = ram.changeable(block_id)
    if block.sealed:
        return block
    mem = block.mem
    if not isinstance(mem, MemfdMemory):
        raise RamdError(f"RAM block '{block.id}' is not a memfd block (backend {block.backend})")
    try:
        mem.seal(block.size)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise RamdError(
                f"RAM block '{block.id}' is mapped writable by another process"
            ) from None
        raise RamdError(
            f"Cannot seal RAM block '{block.id}': {os.strerror(e.errno or 0)}", errno=e.errno
        ) from None
    if block.lock:
        # the read-only view is a new mapping: lock it as the block's settings ask
        try:
            ram.lock_range(block, 0, block.size)
        except RamdError as e:
            log.warning("RAM block '%s' sealed but not locked again: %s", block.id, e)
    return block
