"""``ram-block-attach`` and ``ram-block-detach``: a shared block in a running VMM, over the
VMM's own QMP socket (docs/protocol.md §13; the steps are in :mod:`ramd.vmm.registry`).

Both commands are full-access only. While an attach runs, its block is pinned ("busy"), so
nothing removes or resizes it between the steps; a detach waits for the VMM without a pin
(the attachment itself refuses removal and a DIMM's resize; a virtio-mem block's resize is a
request to the VMM, refused while it detaches). The VMM's deadlines are the daemon's
``ack-timeout``. A virtio-mem attach counts ``max(size, requested-size)`` against
``max-used`` (checked before it starts). Loop thread only.
"""

from __future__ import annotations

from collections.abc import Awaitable

from ramd.api import models as m
from ramd.api.limits import check_grow
from ramd.api.service import Session
from ramd.api.table import Raw, block_info, command
from ramd.ramblock import RAMBlock, check_not_sealed
from ramd.ramblock.pins import Pin


@command("ram-block-attach", m.RamBlockAttachArgs, m.RamBlockInfo, audit=True)
def ram_block_attach(session: Session, args: m.RamBlockAttachArgs) -> Awaitable[Raw]:
    """Plug a memfd or file block into the running VMM whose QMP socket is ``qmp``, as a
    ``pc-dimm`` or a ``virtio-mem-pci`` device: its uid gets access to the block's file,
    then ``add-fd``, ``object-add`` of a ``memory-backend-file`` and ``device_add``, each
    undone if a later step fails. The answer's ``attachment`` says where the guest sees it;
    a virtio-mem block's size is from then on what the guest has plugged."""
    service = session.service
    block = service.ram.changeable(args.id)
    check_not_sealed(block)
    if args.as_ == "virtio-mem" and block.sized_by is None:
        wanted = args.requested_size if args.requested_size is not None else block.size
        if wanted > block.size:
            check_grow(service, block, wanted - block.size)
    pin = block.pins.take("it is being attached to a VMM")
    return _attach(session, block, pin, args)


async def _attach(session: Session, block: RAMBlock, pin: Pin, args: m.RamBlockAttachArgs) -> Raw:
    service = session.service
    try:
        await service.attachments.attach(
            block,
            args.qmp,
            args.as_,
            args.device,
            args.bus,
            service.limits.ack_timeout,
            args.requested_size,
        )
    finally:
        pin.release()
    return block_info(session, block)


@command("ram-block-detach", m.RamBlockDetachArgs, m.Empty, audit=True)
def ram_block_detach(session: Session, args: m.RamBlockDetachArgs) -> Awaitable[m.Empty]:
    """Unplug an attached block from its VMM: ``device_del``, wait for the VMM's
    ``DEVICE_DELETED`` (the guest let go) up to ``timeout`` seconds, then ``object-del`` and
    ``remove-fd``. Without it in time, nothing changes and the command fails."""
    service = session.service
    block = service.ram.get(args.id)
    timeout = args.timeout if args.timeout is not None else service.limits.ack_timeout
    return _detach(session, block, float(timeout))


async def _detach(session: Session, block: RAMBlock, timeout: float) -> m.Empty:
    service = session.service
    await service.attachments.detach(block, timeout, service.limits.ack_timeout)
    return m.Empty()
