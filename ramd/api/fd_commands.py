"""fd passing: a shared block's fd to a client (mappers and leases, docs/protocol.md §8, §12),
the acknowledgements releases wait for, and fds a client passes in (``getfd``/``closefd``,
as QEMU's). Loop thread.
"""

from __future__ import annotations

import functools
import os

from ramd.api import models as m
from ramd.api.limits import limit
from ramd.api.service import Session
from ramd.api.table import WithFds, command
from ramd.errors import RamdError
from ramd.ramblock import RAMBlock

#: Named fds one connection may hold (``getfd``).
MAX_NAMED_FDS = 8


@command("ram-block-get-fd", m.GetFdArgs, m.GetFdResult, readonly=True, audit=True)
def ram_block_get_fd(session: Session, args: m.GetFdArgs) -> WithFds:
    """An fd of a shared block's memory, sent with the answer (``SCM_RIGHTS``); this
    connection is then a mapper of the block: it gets the block's events and must
    acknowledge shrinks and removal. With ``lease`` it holds a lease instead: no events,
    and the block cannot shrink or be removed until it puts the fd back or closes. Read-only
    peers get read-only fds and no leases."""
    block = session.service.ram.get(args.id)
    if not block.shared:
        raise RamdError(f"RAM block '{block.id}' is not shared (backend {block.backend})")
    if block.pins.releasing:
        # docs/protocol.md §8: a connection never becomes a holder of a block being released
        block.pins.check()
    if args.lease and session.readonly:
        # a lease forbids every shrink and removal: a read-only peer may not hold one
        raise RamdError("Permission denied: a read-only peer may not hold a lease")
    readonly = args.readonly or session.readonly
    flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(f"/proc/self/fd/{block.fd}", flags)
    except OSError as e:
        raise RamdError(f"Cannot open RAM block '{block.id}': {e.strerror}") from None
    held = block in session.service.ram.holders.blocks_of(session)
    session.service.mappers.hold(block, session, lease=args.lease, readonly=readonly)
    # if the fd cannot be sent, a connection that did not hold the block does not now
    unsent = None if held else functools.partial(_unhold, session, block)
    result = m.GetFdResult(
        id=block.id,
        size=block.size,
        max_size=block.max_size,
        page_size=block.page_size,
        readonly=readonly,
    )
    return WithFds(result, (fd,), unsent)


def _unhold(session: Session, block: RAMBlock) -> None:
    """A get-fd whose fd could not be sent: the connection holds the block no more."""
    session.service.mappers.put(block, session)


@command("ram-block-put-fd", m.BlockIdArgs, m.Empty, readonly=True)
def ram_block_put_fd(session: Session, args: m.BlockIdArgs) -> m.Empty:
    """This connection no longer maps or leases the block (it closed or unmapped its fd)."""
    block = session.service.ram.get(args.id)
    if not session.service.mappers.put(block, session):
        raise RamdError(f"RAM block '{block.id}' is not mapped by this connection")
    return m.Empty()


@command("ram-block-ack", m.AckArgs, m.Empty, readonly=True)
def ram_block_ack(session: Session, args: m.AckArgs) -> m.Empty:
    """This connection released what event ``seq`` asked it to (the shrunk tail, or the
    whole removed block)."""
    if not session.service.mappers.ack(session, args.seq):
        raise RamdError(f"No acknowledgement of event {args.seq} is awaited from this connection")
    return m.Empty()


@command("getfd", m.FdNameArgs, m.Empty)
def getfd(session: Session, args: m.FdNameArgs) -> m.Empty:
    """Keep the fd sent with this message (``SCM_RIGHTS``) under ``fdname``, as QEMU's
    ``getfd`` (a name already in use is replaced)."""
    if args.fdname not in session.fds and len(session.fds) >= MAX_NAMED_FDS:
        raise limit("named fds", MAX_NAMED_FDS, "closefd one first")
    fd = session.take_received_fd()
    if fd is None:
        raise RamdError("No file descriptor supplied via SCM_RIGHTS")
    old = session.fds.pop(args.fdname, None)
    if old is not None:
        os.close(old)
    session.fds[args.fdname] = fd
    return m.Empty()


@command("closefd", m.FdNameArgs, m.Empty)
def closefd(session: Session, args: m.FdNameArgs) -> m.Empty:
    """Close the fd named ``fdname`` (QEMU's ``closefd``)."""
    fd = session.fds.pop(args.fdname, None)
    if fd is None:
        raise RamdError(f"File descriptor named '{args.fdname}' not found")
    os.close(fd)
    return m.Empty()
