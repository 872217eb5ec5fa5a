"""One RAM block (:class:`RAMBlock`) and the settings it is created with.

Ownership and thread: a block's fields are changed only by the :class:`~ramd.ramblock.RAMList`
that owns it (loop thread); its pins (:mod:`ramd.ramblock.pins`) say when work off the loop
thread relies on its memory; its holders are kept by :mod:`ramd.ramblock.holders`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypedDict

from ramd.hostmem.backend import HostMemory
from ramd.ramblock.pins import Pins

Backend = Literal["anonymous", "memfd", "file"]


class BlockSettings(TypedDict, total=False):
    """The optional settings of a block, as :meth:`RAMList.create` takes them."""

    backend: Backend
    hugetlb: bool
    prealloc: bool
    merge: bool
    dump: bool
    hugepages: bool
    lock: bool
    align: int | None


@dataclass(eq=False)
class RAMBlock:
    """One RAM block. Its fields are changed only by the owning :class:`RAMList`.

    Invariants: ``host`` is aligned to ``align``; ``0 < size <= max_size``, both multiples of
    ``page_size``; ``size == max_size`` unless ``resizable``; ``[host, host+size)`` is
    read-write and ``[host+size, host+max_size+page_size)`` is ``PROT_NONE``; a shared
    block's file is ``size`` bytes long (unless another process changed it). ``mem`` is owned
    by the block: freed exactly once, by the RAM list.
    """

    id: str
    mem: HostMemory
    host: int
    offset: int
    size: int
    max_size: int
    page_size: int
    align: int
    resizable: bool
    prealloc: bool = False
    merge: bool = False
    dump: bool = True
    hugepages: bool = False
    lock: bool = False
    #: Mappers holding this block now (counted from :class:`~ramd.ramblock.holders.Holders`).
    mappers: int = 0
    #: Holders that are not mappers (leases and VMM attachments).
    leases: int = 0
    #: Every holder as ``RamBlockInfo.holders`` shows it (kind, pid, uid).
    holder_list: tuple[dict[str, object], ...] = ()
    #: Where the block is attached in a VMM, as ``RamBlockInfo.attachment`` (wire names), or
    #: None (kept by the attachment registry, :mod:`ramd.vmm.registry`).
    attachment: dict[str, object] | None = None
    #: Who relies on the block staying as it is (work off the loop thread, a pending release).
    pins: Pins = field(init=False)

    def __post_init__(self) -> None:
        self.pins = Pins(self.id)

    @property
    def busy(self) -> str | None:
        """Why the block is pinned, or None."""
        return self.pins.why

    @property
    def backend(self) -> str:
        """``anonymous``, ``memfd`` or ``file``."""
        return self.mem.kind

    @property
    def shared(self) -> bool:
        """The block has an fd other processes can map."""
        return self.mem.shared

    @property
    def persistent(self) -> bool:
        """The block's memory outlives the daemon (a named file)."""
        return self.mem.persistent

    @property
    def path(self) -> str | None:
        """The block's file, for the ``file`` backend."""
        return self.mem.path

    @property
    def hugetlb(self) -> bool:
        """Backed by hugetlbfs huge pages."""
        return self.mem.hugetlb

    @property
    def sealed(self) -> bool:
        """A template: its memory and size can never change (:mod:`ramd.ramblock.seal`)."""
        return self.mem.sealed

    @property
    def fd(self) -> int:
        """The block's fd (owned by the block; -1 when not shared)."""
        return self.mem.fd

    def resident(self) -> int:
        """Bytes of the used range whose memory is allocated right now (anonymous:
        ``mincore``; shared: the file's allocated blocks)."""
        return self.mem.resident(self.size)
