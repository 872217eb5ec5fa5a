"""Persistence of ``file`` blocks: the metadata kept beside each block's file.

Called by :class:`~ramd.ramblock.RAMList` on the loop thread when a ``file`` block is
created or adopted (its metadata must be on disk before the block is visible).
"""

from __future__ import annotations

import logging
import os
import time

from ramd import blocksettings
from ramd.errors import RamdError
from ramd.hostmem.blockmeta import BlockMeta
from ramd.hostmem.shared import FileMemory
from ramd.ramblock.block import RAMBlock

log = logging.getLogger("ramd.ramblock")


def keep_meta(mem: FileMemory, block: RAMBlock) -> None:
    """Write a new (or adopted) file block's metadata; ``created`` survives adoption."""
    if block.hugetlb:
        # hugetlbfs files cannot be written: no metadata, so no adoption after a restart
        log.warning(
            "RAM block '%s': no metadata on hugetlbfs: not adopted after a restart", block.id
        )
        return
    settings = blocksettings.kept_of(block)
    created = mem.meta.created if mem.meta is not None else time.time_ns()
    meta = BlockMeta(
        block.id, block.size, block.max_size, block.resizable, block.page_size, settings, created
    )
    try:
        mem.keep(meta)
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise RamdError(
            f"Cannot create RAM block '{block.id}': cannot write its metadata: {why}",
            errno=e.errno,
        ) from None
