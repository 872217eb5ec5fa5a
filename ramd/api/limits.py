"""The daemon's limits on blocks and transfers (docs/protocol.md §11): each refusal is a
``GenericError`` naming the limit (``Limit exceeded: NAME is VALUE: DETAIL``).

Checked on the loop thread before anything is created or grown: ``max-blocks``,
``max-reserved``, ``max-used``, ``io-chunk``, and the host's own bounds (cgroup,
``RLIMIT_MEMLOCK``, MemAvailable) from :mod:`ramd.hostlimits`.
"""

from __future__ import annotations

from ramd import fdbudget
from ramd.api import models as m
from ramd.api.service import Service
from ramd.errors import RamdError
from ramd.hostmem.libc import host_page_size
from ramd.ramblock import RAMBlock


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def limit(name: str, value: int, detail: str) -> RamdError:
    return RamdError(f"Limit exceeded: {name} is {value}: {detail}")


def check_add_limits(service: Service, args: m.RamBlockAddArgs) -> None:
    lim, ram = service.limits, service.ram
    page = host_page_size()
    size = _align_up(args.size, page)
    reserve = _align_up(max(args.max_size or size, size), page) + page
    count = len(ram) + ram.pending
    fdbudget.check_shared_add(service, args.backend)
    if count >= lim.max_blocks:
        raise limit("max-blocks", lim.max_blocks, f"{count} blocks exist or are being created")
    if lim.max_reserved and ram.reserved + reserve > lim.max_reserved:
        raise limit(
            "max-reserved", lim.max_reserved, f"{ram.reserved} reserved, {reserve} more asked"
        )
    if lim.max_used and ram.used + size > lim.max_used:
        raise limit("max-used", lim.max_used, f"{ram.used} used, {size} more asked")
    check_host(service, size, touch=args.prealloc or args.lock, lock=args.lock)


def check_host(service: Service, more: int, *, touch: bool, lock: bool) -> None:
    """Refuse ``more`` bytes of blocks that the host (cgroup, ``RLIMIT_MEMLOCK``) cannot hold;
    ``touch``: faulted in at once (prealloc, lock)."""
    refusal = service.host.refusal(service.ram.used, more, touch=touch, lock=lock)
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
        args.size,
        args.max_size,
        backend=args.backend,
        hugetlb=args.hugetlb,
        prealloc=args.prealloc,
        merge=args.merge,
        dump=args.dump,
        hugepages=args.hugepages,
        lock=args.lock,
        align=args.align,
        allocate=allocate,
    )


def check_grow(service: Service, block: RAMBlock, grow: int) -> None:
    """Refuse growing ``block`` by ``grow`` bytes beyond ``max-used`` or the host's bounds."""
    lim = service.limits.max_used
    used = service.ram.used
    if lim and used + grow > lim:
        raise limit("max-used", lim, f"{used} used, {grow} more asked")
    check_host(service, grow, touch=block.lock, lock=block.lock)
