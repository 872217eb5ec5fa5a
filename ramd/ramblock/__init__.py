"""RAM blocks: QEMU's RAM list with resizable allocations, as a package.

- :mod:`.block`: one block (:class:`RAMBlock`) and its settings;
- :mod:`.registry`: the RAM list (:class:`RAMList`): creation, commit, life cycle;
- :mod:`.change`: the one resize/remove operation (checks, pin, holders, notify, release);
- :mod:`.holders`: who holds a block (mappers, leases, VMMs) and the acknowledgements;
- :mod:`.pins`: leases that hold a block against change while its memory is in use;
- :mod:`.access`: bounds-checked reads, writes, discards and bulk transfers;
- :mod:`.seal`: templates, memfd blocks sealed so their memory never changes
  (:func:`check_not_sealed` for every command that would change one);
- :mod:`.pools`: blocks made ready before they are asked for (``[[pool]]``);
- :mod:`.persist`: the metadata of ``file`` blocks.
"""

from ramd.notifiers import RamBlockNotifier
from ramd.ramblock.block import Backend, BlockSettings, RAMBlock
from ramd.ramblock.registry import DEFAULT_MEMORY_DIR, HUGEPAGE_ALIGN, RAMList
from ramd.ramblock.seal import check_not_sealed

__all__ = [
    "DEFAULT_MEMORY_DIR",
    "HUGEPAGE_ALIGN",
    "Backend",
    "BlockSettings",
    "RAMBlock",
    "RAMList",
    "RamBlockNotifier",
    "check_not_sealed",
]
