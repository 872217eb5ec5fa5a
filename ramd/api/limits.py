"""The daemon's limits on blocks and transfers (docs/protocol.md §11): each refusal is a
``GenericError`` naming the limit (``Limit exceeded: NAME is VALUE: DETAIL``).

Checked on the loop thread before anything is created or grown: ``max-blocks``,
``max-reserved``, ``max-used`` (which bounds the blocks' ``used`` plus what pools are
charged), ``io-chunk``, and the host's own bounds (cgroup,
``RLIMIT_MEMLOCK``, MemAvailable) from :mod:`ramd.hostlimits`.
"""

from __future__ import annotations

from ramd import blocksettings
from ramd.api import models as m
from ramd.api.service import Service
from ramd.errors import RamdError
from ramd.hostmem.libc import host_page_size
from ramd.process import fdbudget
from ramd.ramblock import RAMBlock


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def limit(name: str, value: int, detail: str) -> RamdError:
    return RamdError(f"Limit exceeded: {name} is {value}: {detail}")


def check_block_count(service: Service) -> None:
    """Refuse one more block beyond ``max-blocks``."""
    lim, ram = service.limits, service.ram
    count = len(ram) + ram.pending
    if count >= lim.max_blocks:
        raise limit("max-blocks", lim.max_blocks, f"{count} blocks exist or are being created")


def _size_of(args: m.RamBlockAddArgs) -> int:
    if args.size is None:  # validation requires it unless a pool is named
        raise RamdError("Parameter 'size' is missing")
    return args.size


def check_add_limits(service: Service, args: m.RamBlockAddArgs) -> None:
    lim, ram = service.limits, service.ram
    page = host_page_size()
    size = _align_up(_size_of(args), page)
    reserve = _align_up(max(args.max_size or size, size), page) + page
    check_block_count(service)
    fdbudget.check_shared_add(service, args.backend)
    if lim.max_reserved and ram.reserved + reserve > lim.max_reserved:
        raise limit(
            "max-reserved", lim.max_reserved, f"{ram.reserved} reserved, {reserve} more asked"
        )
    if not service.fits_used(size):
        raise limit("max-used", lim.max_used, _used(service, size))
    check_host(service, size, touch=args.prealloc or args.lock, lock=args.lock)


def _used(service: Service, more: int) -> str:
    pooled = service.pools.charged
    return (
        f"{service.ram.used} used"
        + (f", {pooled} pooled" if pooled else "")
        + (f", {more} more asked")
    )


def check_host(service: Service, more: int, *, touch: bool, lock: bool) -> None:
    """Refuse ``more`` bytes of blocks that the host (cgroup, ``RLIMIT_MEMLOCK``) cannot hold;
    ``touch``: faulted in at once (prealloc, lock)."""
    used = service.ram.used + service.pools.charged
    refusal = service.host.refusal(used, more, touch=touch, lock=lock)
    if refusal is not None:
        raise limit(refusal.name, refusal.value, refusal.detail)


def check_io(service: Service, length: int) -> None:
    if length > service.limits.io_chunk:
        raise limit(
            "io-chunk", service.limits.io_chunk, f"{length} bytes asked; split the transfer"
        )


def create_block(service: Service, args: m.RamBlockAddArgs, *, allocate: bool = True) -> RAMBlock:
    """Check the limits and create (not yet commit) the block ``args`` describe
    (``allocate``: see :meth:`ramd.ramblock.RAMList.create`)."""
    check_add_limits(service, args)
    return service.ram.create(
        args.id,
        _size_of(args),
        args.max_size,
        backend=args.backend,
        **blocksettings.of(args),
        allocate=allocate,
    )


def check_grow(service: Service, block: RAMBlock, grow: int) -> None:
    """Refuse growing ``block`` by ``grow`` bytes beyond ``max-used`` or the host's bounds."""
    if not service.fits_used(grow):
        raise limit("max-used", service.limits.max_used, _used(service, grow))
    check_host(service, grow, touch=block.lock, lock=block.lock)
