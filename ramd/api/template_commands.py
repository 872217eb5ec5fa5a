"""Templates and pools (docs/protocol.md §14): ``ram-block-seal`` and ``query-pools``
(``ram-block-add`` from a pool is in :mod:`ramd.api.block_commands`). Loop thread.
"""

from __future__ import annotations

from ramd.api import models as m
from ramd.api.service import Session
from ramd.api.table import Raw, block_info, command


@command("ram-block-seal", m.BlockIdArgs, m.RamBlockInfo, audit=True)
def ram_block_seal(session: Session, args: m.BlockIdArgs) -> Raw:
    """Make a ``memfd`` block a read-only template: its memory and size never change
    again. Refused while another process maps it writable. Its fds can then be mapped
    privately (copy-on-write clones) or read-only; it can be deleted whatever holds it."""
    service = session.service
    block = service.ram.seal(args.id)
    service.infos.refresh(block)  # its RamBlockInfo now says "sealed"
    return block_info(session, block)


@command("query-pools", m.NoArgs, m.PoolInfoList, readonly=True)
def query_pools(session: Session, args: m.NoArgs) -> m.PoolInfoList:
    """Every ``[[pool]]``: its block size, how many blocks it keeps and how many are ready."""
    return m.PoolInfoList(
        [
            m.PoolInfo(name=p.spec.name, size=p.unit, count=p.spec.count, ready=len(p.ready))
            for p in session.service.pools.pools()
        ]
    )
