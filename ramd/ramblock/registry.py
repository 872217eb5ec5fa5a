"""The RAM list, after QEMU's ``system/physmem.c`` with resizable allocations.

:class:`RAMList` owns all blocks (:class:`~ramd.ramblock.block.RAMBlock`): it creates,
commits and frees them, places them in the ram_addr space, applies their settings and calls
the notifiers (order in :mod:`ramd.notifiers`). Resizing and removing go through the one
operation of :mod:`ramd.ramblock.change` (:meth:`RAMList.resize` and :meth:`RAMList.remove`
are its synchronous form); the step methods it uses (``grow_map``, ``shrink_prepare``, ...)
are for it alone. Memory access is in :mod:`ramd.ramblock.access`, sealing in
:mod:`ramd.ramblock.seal`.

Spares (:meth:`RAMList.create_spare`) are the blocks of pools (:mod:`ramd.ramblock.pools`):
created under a private id, filled in a worker thread, invisible and uncounted in ``used``
until :meth:`RAMList.take_spare` commits one under a client's id.

Each block's memory is a :class:`~ramd.hostmem.backend.HostMemory` backend (anonymous,
memfd or file), chosen at :meth:`RAMList.create`; past that choice the RAM list treats every
backend alike. The block owns its backend and, through it, its fd.

Ownership and threads: one thread owns a ``RAMList`` and calls all its methods (the asyncio
loop thread in the daemon). The exceptions are :meth:`RAMList.fill` and
:meth:`RAMList.lock_range`, which a worker thread may run on memory nobody else can change
meanwhile: a block returned by :meth:`RAMList.create` (or :meth:`RAMList.create_spare`) and
not yet committed (invisible, its id "busy"), or a range of a block whose pin the caller
holds (:mod:`ramd.ramblock.pins`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Unpack

from ramd.errors import DeviceNotFound, RamdError
from ramd.hostmem import libc, linux
from ramd.hostmem.backend import AnonymousMemory, HostMemory
from ramd.hostmem.blockmeta import BlockMeta
from ramd.hostmem.dirlock import lock_memory_dir
from ramd.hostmem.mmap_alloc import mmap_pagesize
from ramd.hostmem.shared import FdMemory, FileMemory, MemfdMemory, open_memory_dir
from ramd.ids import ID_PATTERN
from ramd.notifiers import NotifierList, RamBlockNotifier
from ramd.ramaddr import RamAddrSpace
from ramd.ramblock import access, change, seal
from ramd.ramblock.block import Backend, BlockSettings, RAMBlock, SizeOwner
from ramd.ramblock.holders import Holders
from ramd.ramblock.persist import keep_meta
from ramd.ramblock.pins import Pin

log = logging.getLogger(__name__)

_ID_RE = re.compile(ID_PATTERN)

#: Alignment of anonymous blocks when ``hugepages`` is set, and of pools' spares, so THP can
#: back them (QEMU's ``QEMU_VMALLOC_ALIGN`` on x86-64).
HUGEPAGE_ALIGN = linux.PMD_SIZE

#: Where ``file`` blocks of a list made without ``memory_dir`` live: root's default (the
#: daemon's follows ``XDG_RUNTIME_DIR``: :func:`ramd.process.paths.default_memory_dir`).
DEFAULT_MEMORY_DIR = "/run/ramd/memory"


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


class CreateOptions(BlockSettings, total=False):
    """What :meth:`RAMList.create` takes besides the block's settings."""

    memory: HostMemory | None
    allocate: bool


class RAMList:
    """All RAM blocks of the daemon, in creation order, and their notifiers."""

    def __init__(self, memory_dir: str | os.PathLike[str] = DEFAULT_MEMORY_DIR) -> None:
        #: Directory of ``file`` blocks; opened (created 0700) at the first ``file`` block.
        self.memory_dir = os.fspath(memory_dir)
        self._memory_dir_fd = -1
        self._memory_dir_lock = -1
        self._blocks: dict[str, RAMBlock] = {}
        #: Blocks created and not yet committed or aborted, with their creation pin.
        self._pending: dict[str, tuple[RAMBlock, Pin]] = {}
        #: Spare blocks of pools (:meth:`create_spare`), by private id, with their creation
        #: pin: created, filled and never committed until :meth:`take_spare` names one.
        self._spares: dict[str, tuple[RAMBlock, Pin]] = {}
        self._spare_seq = 0
        #: Every holder of every block (mappers, leases, VMMs).
        self.holders = Holders()
        #: Checks that may refuse a change: ``guard(block, new_size)`` for a resize,
        #: ``guard(block, None)`` for a removal; each raises :class:`RamdError` to refuse.
        self.guards: list[Callable[[RAMBlock, int | None], None]] = [seal.guard]
        #: Called with each block removed for good (after ``removed`` was notified, before
        #: its memory is freed).
        self.on_remove: list[Callable[[RAMBlock], None]] = []
        self._space = RamAddrSpace()
        self.notifiers = NotifierList()
        #: Sum of :attr:`RAMBlock.charged` (``size``, or what a VMM may plug) over all blocks,
        #: created or committed (spares are not counted: their pool is charged for them).
        self.used = 0
        #: Sum of ``max_size`` + guard page over all blocks, created or committed, and spares.
        self.reserved = 0
        #: Blocks created with ``allocate=False`` and not yet committed or aborted -> size:
        #: memory they will take that MemAvailable does not show yet.
        self._unallocated: dict[str, int] = {}

    def __iter__(self) -> Iterator[RAMBlock]:
        return iter(list(self._blocks.values()))

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._blocks

    def get(self, block_id: str) -> RAMBlock:
        """The committed block named ``block_id``.

        ``DeviceNotFound`` if there is none; a "busy" ``RamdError`` while a block of that name
        is created but not yet committed (being preallocated).
        """
        try:
            return self._blocks[block_id]
        except KeyError:
            pending = self._pending.get(block_id)
            if pending is not None:
                raise RamdError(f"RAM block '{block_id}' is busy: {pending[1].why}") from None
            raise DeviceNotFound(block_id) from None

    def changeable(self, block_id: str) -> RAMBlock:
        """The committed block named ``block_id`` if it may be changed now; a "busy"
        ``RamdError`` while it is pinned."""
        block = self.get(block_id)
        block.pins.check()
        return block

    @property
    def pending(self) -> int:
        """Blocks created and not yet committed or aborted (being filled)."""
        return len(self._pending)

    # -- notifiers -------------------------------------------------------------------------

    def register_notifier(self, notifier: RamBlockNotifier) -> None:
        """Register ``notifier`` and replay ``added`` for every block (safety net applies)."""
        self.notifiers.register(notifier, self._blocks.values())

    def unregister_notifier(self, notifier: RamBlockNotifier) -> None:
        self.notifiers.unregister(notifier)

    # -- add -------------------------------------------------------------------------------

    def add(
        self,
        block_id: str,
        size: int,
        max_size: int | None = None,
        **settings: Unpack[BlockSettings],
    ) -> RAMBlock:
        """Create, preallocate if asked, and commit a block in one step (the settings are
        those of :meth:`create`)."""
        block = self.create(block_id, size, max_size, **settings)
        try:
            self.fill(block)
        except BaseException:
            self.abort(block)
            raise
        self.commit(block)
        return block

    def create(
        self,
        block_id: str,
        size: int,
        max_size: int | None = None,
        **options: Unpack[CreateOptions],
    ) -> RAMBlock:
        """Validate, map and configure a block, reserving its id; not yet visible.

        ``memory``: an opened backend holding an earlier daemon's block, adopted with its
        contents (:meth:`adopt`), instead of new memory of kind ``backend``. A ``file``
        block's metadata is written (:mod:`ramd.hostmem.blockmeta`) before this returns.

        ``allocate=False``: a shared block's memory is not allocated now (``fallocate``) but
        by the writes that fill it, for a caller about to write all of it before anyone sees
        it (a load into fresh memory); the ranges it leaves zero stay holes, as if
        discarded. The MemAvailable check still refuses what the host cannot hold, counting
        the other such blocks not yet committed as if they were allocated (so several of them
        are refused where their ``fallocate`` in turn would have failed).

        ``backend`` chooses the memory (``memfd`` and ``file`` are shared; ``hugetlb`` asks
        for huge pages: ``MFD_HUGETLB``, or a hugetlbfs ``memory_dir``). ``merge`` and
        ``hugepages`` apply to anonymous memory only and are refused for the others. The
        caller must then :meth:`fill` it (which locks and preallocates it as its settings ask;
        a worker thread may do that) and :meth:`commit` or :meth:`abort` it. Raises
        :class:`RamdError` for bad arguments or when the kernel refuses the memory.
        """
        self._check_new_id(block_id)
        return self._create(block_id, size, max_size, **options)

    def _check_new_id(self, block_id: str) -> None:
        if not isinstance(block_id, str) or not _ID_RE.match(block_id):
            raise RamdError(
                f"Invalid RAM block id '{block_id}': expected a letter, then up to 63 of"
                " A-Za-z0-9._-"
            )
        if block_id in self._blocks or block_id in self._pending:
            raise RamdError(f"RAM block '{block_id}' already exists")

    def _create(
        self,
        block_id: str,
        size: int,
        max_size: int | None,
        *,
        backend: Backend = "anonymous",
        hugetlb: bool = False,
        prealloc: bool = False,
        merge: bool = False,
        dump: bool = True,
        hugepages: bool = False,
        lock: bool = False,
        align: int | None = None,
        memory: HostMemory | None = None,
        allocate: bool = True,
        spare: bool = False,
    ) -> RAMBlock:
        """:meth:`create` past the id checks; ``spare``: a pool's spare (see
        :meth:`create_spare`), whose prealloc is allowed for resizable blocks too."""
        if size <= 0:
            raise RamdError(f"Invalid size: {block_id}: 0x{size:x}: Invalid argument")
        mem = memory if memory is not None else self._new_memory(block_id, backend, hugetlb)
        try:
            for name, value in (("merge", merge), ("hugepages", hugepages)):
                if value and not mem.private:
                    raise RamdError(
                        f"Cannot create RAM block '{block_id}': {name} applies to anonymous"
                        f" blocks only (backend {mem.kind})"
                    )
            block = self._map(
                mem,
                block_id,
                size,
                max_size,
                align,
                prealloc=prealloc and not spare,
                merge=merge,
                dump=dump,
                hugepages=hugepages,
                lock=lock,
                allocate=allocate,
            )
            self._advise(block, 0, block.size)
            if isinstance(mem, FileMemory):
                keep_meta(mem, block)
        except BaseException:
            _free_memory(mem, block_id, delete=memory is None)
            raise
        block.offset = self._space.alloc(block.max_size)
        self.reserved += block.max_size + block.page_size
        if spare:
            block.prealloc = True
            self._spares[block_id] = (block, block.pins.take("it is a pool's spare"))
            return block
        self._pending[block_id] = (block, block.pins.take(_creating(prealloc, lock)))
        self.used += block.size
        if not allocate and mem.shared and not mem.hugetlb:
            self._unallocated[block_id] = block.size
        return block

    # -- spares: the blocks of pools ---------------------------------------------------------

    def create_spare(
        self,
        pool: str,
        size: int,
        max_size: int | None = None,
        *,
        backend: Backend = "memfd",
        hugetlb: bool = False,
    ) -> RAMBlock:
        """Create a spare block for pool ``pool``: mapped but not allocated (cheap: the loop
        thread may call this), under a private id no client can name or see, not counted
        in ``used``. The caller then fills it (:meth:`fill`, in a worker thread: every page
        allocated and zero) and either :meth:`take_spare` or :meth:`abort` it. Its view is
        aligned to ``HUGEPAGE_ALIGN`` (but for ``hugetlb``: its page size), so that :meth:`fill`
        can make it of transparent huge pages."""
        self._spare_seq += 1
        return self._create(
            f"pool:{pool}:{self._spare_seq}",
            size,
            max_size,
            backend=backend,
            hugetlb=hugetlb,
            prealloc=True,
            allocate=False,
            align=None if hugetlb else HUGEPAGE_ALIGN,
            spare=True,
        )

    def take_spare(self, block: RAMBlock, block_id: str) -> RAMBlock:
        """Commit filled spare ``block`` as block ``block_id`` (``added`` notified; its size
        now counts in ``used``). No memory is allocated here. Refused (``RamdError``, the
        spare unchanged) for an invalid or taken id."""
        self._check_new_id(block_id)
        entry = self._spares.get(block.id)
        if entry is None or entry[0] is not block:
            raise RuntimeError(f"RAM block '{block.id}' is not a spare")
        del self._spares[block.id]
        block.id = block.pins.block_id = block_id
        self._pending[block_id] = entry
        self.used += block.size
        self.commit(block)
        return block

    def _new_memory(self, block_id: str, backend: Backend, hugetlb: bool) -> HostMemory:
        """Choose and open the block's backend (the only place that knows the kinds)."""
        try:
            if backend == "memfd":
                return MemfdMemory(f"ramd:{block_id}", hugetlb=hugetlb)
            if backend == "file":
                dir_fd = self._open_memory_dir()
                if hugetlb and mmap_pagesize(dir_fd) == libc.host_page_size():
                    raise RamdError(
                        f"Cannot create RAM block '{block_id}': hugetlb needs a memory-dir on"
                        f" hugetlbfs ('{self.memory_dir}' is not)"
                    )
                return FileMemory(dir_fd, self.memory_dir, block_id)
        except FileExistsError:
            path = os.path.join(self.memory_dir, block_id)
            raise RamdError(
                f"Cannot create RAM block '{block_id}': file '{path}' already exists"
            ) from None
        except OSError as e:
            raise RamdError(
                f"Cannot create RAM block '{block_id}' (backend {backend}): {_strerror(e)}",
                errno=e.errno,
            ) from None
        if backend != "anonymous":
            raise RamdError(f"Invalid backend: {block_id}: '{backend}'")
        if hugetlb:
            raise RamdError(
                f"Cannot create RAM block '{block_id}': hugetlb needs backend memfd or file"
            )
        return AnonymousMemory()

    def _open_memory_dir(self) -> int:
        try:
            return self.open_memory_dir()
        except OSError as e:
            raise RamdError(
                f"Cannot use memory-dir '{self.memory_dir}': {e.strerror or e}", errno=e.errno
            ) from None

    def open_memory_dir(self) -> int:
        """The fd of ``memory-dir``, opened (created 0700) and locked on first use
        (:mod:`ramd.hostmem.dirlock`: ``MemoryDirInUse`` names the pid of another daemon
        holding it). Both fds are kept until :meth:`close`."""
        if self._memory_dir_fd < 0:
            fd = open_memory_dir(self.memory_dir)
            try:
                self._memory_dir_lock = lock_memory_dir(fd, self.memory_dir)
            except BaseException:
                os.close(fd)
                raise
            self._memory_dir_fd = fd
        return self._memory_dir_fd

    def adopt(self, mem: HostMemory, meta: BlockMeta) -> RAMBlock:
        """Map and commit a block an earlier daemon left (``mem`` opened on its file or
        memfd, taken over: freed on failure, never deleted), with its size, settings and
        contents; ``added`` is notified as for any new block. Raises :class:`RamdError`."""
        try:
            block = self.create(
                meta.id,
                meta.size,
                meta.max_size if meta.resizable else None,
                backend="file" if mem.persistent else "memfd",
                memory=mem,
                **meta.settings,
            )
        except BaseException:
            mem.free()  # a no-op when create freed it already
            raise
        try:
            self.fill(block)
        except BaseException:
            self._take_pending(block)
            self._release(block, delete=False)
            raise
        self.commit(block)
        return block

    def _map(
        self,
        mem: HostMemory,
        block_id: str,
        size: int,
        max_size: int | None,
        align: int | None,
        *,
        prealloc: bool,
        merge: bool,
        dump: bool,
        hugepages: bool,
        lock: bool,
        allocate: bool,
    ) -> RAMBlock:
        """Check the sizes against ``mem``'s page size, reserve and populate ``[0, size)``;
        the block that owns ``mem`` (not yet placed in the ram_addr space)."""
        page_size = mem.page_size
        size = _align_up(size, page_size)
        resizable = max_size is not None
        if max_size is None:
            max_size = size
        else:
            max_size = _align_up(max_size, page_size)
            if size > max_size:
                raise RamdError(
                    f"Size too large: {block_id}: 0x{size:x} > 0x{max_size:x}: Invalid argument"
                )
            if not self.notifiers.all_support_resize():
                raise RamdError(
                    f"Cannot create resizable RAM block '{block_id}': a registered RAM block"
                    " notifier does not support resizing"
                )
        if prealloc and resizable:
            raise RamdError(
                f"Cannot create RAM block '{block_id}': prealloc is not supported for"
                " resizable blocks"
            )
        if align is None:
            align = max(page_size, HUGEPAGE_ALIGN) if hugepages else page_size
        elif align < page_size or align & (align - 1):
            raise RamdError(
                f"Invalid align: {block_id}: 0x{align:x}: must be a power of two and at least"
                f" the page size 0x{page_size:x}"
            )
        try:
            host = mem.reserve(max_size, align)
            if not allocate and mem.shared and not mem.hugetlb:
                pending = sum(self._unallocated.values())
                if size + pending > linux.mem_available():
                    raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
            mem.populate(0, size, allocate=allocate)
        except OSError as e:
            what = f"0x{size:x}" + (f" (max-size 0x{max_size:x})" if resizable else "")
            raise RamdError(
                f"Cannot allocate RAM block '{block_id}' of {what}: {_strerror(e)}",
                errno=e.errno,
            ) from None
        return RAMBlock(
            id=block_id,
            mem=mem,
            host=host,
            offset=-1,
            size=size,
            max_size=max_size,
            page_size=page_size,
            align=align,
            resizable=resizable,
            prealloc=prealloc,
            merge=merge,
            dump=dump,
            hugepages=hugepages,
            lock=lock,
        )

    def fill(self, block: RAMBlock) -> None:
        """Lock (``lock``) and fault in (``prealloc``) a created, uncommitted block.

        Prealloc: anonymous memory with ``MADV_POPULATE_WRITE`` (on kernels without it, touches
        each page); shared memory by allocating the file's range. A spare's shared memory is
        then also faulted in writable through the daemon's own view (nobody else has its fd),
        which zeroes every page now: shmem clears a page allocated by ``fallocate`` only at
        its first fault, and that fault must not be the VMM's. A spare memfd (not hugetlb) is
        first made of transparent huge pages where the kernel allows
        (:func:`linux.collapse_zeroed`): a VMM that maps it 2 MiB-aligned then faults in one
        page table entry per 2 MiB, not 512. May run in a worker thread: the block is
        invisible to every other caller until committed. Raises :class:`RamdError`; the
        caller then aborts the block.
        """
        pending = self._pending.get(block.id) or self._spares.get(block.id)
        if pending is None or pending[0] is not block:
            raise RuntimeError(f"RAM block '{block.id}' is not being created")
        if block.lock:
            self.lock_range(block, 0, block.size)
        if not block.prealloc:
            return
        spare_shm = block.shared and block.id in self._spares
        try:
            if spare_shm and not block.hugetlb:
                linux.collapse_zeroed(block.host, block.size)
            block.mem.preallocate(block.size)
            if spare_shm:
                linux.populate_write(block.host, block.size)
        except OSError as e:
            raise RamdError(
                f"Cannot preallocate RAM block '{block.id}' of 0x{block.size:x}: {_strerror(e)}",
                errno=e.errno,
            ) from None

    def commit(self, block: RAMBlock) -> None:
        """Make a created block visible (creation order) and notify ``added``."""
        self._take_pending(block)
        self._blocks[block.id] = block
        self.notifiers.notify_added(block)

    def abort(self, block: RAMBlock) -> None:
        """Undo :meth:`create` (or :meth:`create_spare`): free the memory (and delete its
        file), the offset and the id."""
        spare = self._spares.get(block.id)
        if spare is not None and spare[0] is block:
            del self._spares[block.id]
            spare[1].release()
            self._release(block, delete=True, used=False)
            return
        self._take_pending(block)
        self._release(block, delete=True)

    def _take_pending(self, block: RAMBlock) -> None:
        """``block`` is no longer being created: its id and its creation pin are released."""
        pending = self._pending.get(block.id)
        if pending is None or pending[0] is not block:
            raise RuntimeError(f"RAM block '{block.id}' is not being created")
        del self._pending[block.id]
        self._unallocated.pop(block.id, None)
        pending[1].release()

    # -- resize / remove: the steps of ramd.ramblock.change ------------------------------------

    def resize(self, block_id: str, size: int) -> RAMBlock:
        """Resize a block in place now (QEMU's ``qemu_ram_resize`` rules and messages): the
        synchronous form of :func:`ramd.ramblock.change.resize`, for in-process callers.
        A shrink that would have to wait for holders is refused."""
        result = change.resize(self, block_id, size)
        if not isinstance(result, RAMBlock):
            raise RuntimeError("a resize without waiting returned an awaitable")
        return result

    def remove(self, block_id: str) -> None:
        """Notify ``removed``, then drop the block, unmap it and delete its file, now (the
        synchronous form of :func:`ramd.ramblock.change.remove`)."""
        if change.remove(self, block_id) is not None:
            raise RuntimeError("a removal without waiting returned an awaitable")

    def check_resize(self, block_id: str, size: int) -> tuple[RAMBlock, int]:
        """The block and its new aligned size, or the protocol's refusal (0 is a size only
        for a block sized by a VMM)."""
        block = self.changeable(block_id)
        new = _align_up(max(size, 0), block.page_size)
        old = block.size
        if new == old:
            return block, new
        if not block.resizable:
            raise RamdError(f"Size mismatch: {block_id}: 0x{new:x} != 0x{old:x}: Invalid argument")
        if new > block.max_size:
            raise RamdError(
                f"Size too large: {block_id}: 0x{new:x} > 0x{block.max_size:x}: Invalid argument"
            )
        if new == 0 and block.sized_by is None:
            raise RamdError(f"Invalid size: {block_id}: 0x0: Invalid argument")
        return block, new

    def grow_map(self, block: RAMBlock, old: int, new: int) -> None:
        """Populate ``[old, new)`` with the block's advice; ``block.size`` is still ``old``,
        so nothing reads or writes the new range until :meth:`grow_commit`. On failure
        nothing changed."""
        try:
            block.mem.populate(old, new)
        except OSError as e:
            raise RamdError(
                f"Cannot grow {block.id} to 0x{new:x}: {_strerror(e)}", errno=e.errno
            ) from None
        self._advise(block, old, new - old)

    def grow_undo(self, block: RAMBlock, old: int, new: int) -> None:
        """Release a tail mapped by :meth:`grow_map` whose grow failed afterwards."""
        block.mem.release(old, new)

    def grow_commit(self, block: RAMBlock, old: int, new: int) -> None:
        """The grown tail is ready: the block takes its new size, then notifiers run."""
        block.size = new
        self.used += new - old
        self.notifiers.notify_resized(block, old, new)

    def shrink_prepare(self, block: RAMBlock, new: int) -> None:
        """Make sure the release of ``[new, size)`` cannot fail, before anyone is notified.

        The kernel may refuse to split the block's mapping at ``new`` (ENOMEM when the
        process has ``vm.max_map_count`` mappings). The split is therefore made first, by an
        advice that only the tail takes (``MADV_DONTFORK``; the daemon never forks): if it
        fails, nothing has been notified and the block is unchanged. Re-reserving exactly
        that tail afterwards replaces one mapping by one, which cannot fail for that reason.
        """
        try:
            libc.madvise(block.host + new, block.size - new, linux.MADV_DONTFORK)
        except OSError as e:
            # madvise words the failure to split (ENOMEM) as EAGAIN
            err = errno.ENOMEM if e.errno == errno.EAGAIN else e.errno
            raise RamdError(
                f"Cannot shrink {block.id} to 0x{new:x}: {os.strerror(err or 0)}", errno=err
            ) from None

    def shrink_release(self, block: RAMBlock, old: int, new: int) -> None:
        """Second half of a shrink, after ``resized`` was notified: the size becomes ``new``
        and the memory of ``[new, old)`` is released (tail inaccessible, file shortened)."""
        block.size = new
        self.used -= old - new
        block.mem.release(new, old)

    # -- sized by a VMM (docs/protocol.md §13, virtio-mem): the steps of ramd.ramblock.change ----

    def size_by_vmm(self, block: RAMBlock, owner: SizeOwner, requested: int) -> None:
        """From now on a VMM sets ``block``'s size (:attr:`RAMBlock.sized_by`): its file
        becomes ``max_size`` long without allocating and the daemon maps all of it;
        ``requested`` (aligned, at most ``max_size``) is what the VMM is asked for. Only a
        resizable shared block can be; its size stays as it is until the VMM reports one
        (:meth:`follow_size`). Raises :class:`RamdError`; nothing changed then."""
        mem = block.mem
        if block.sized_by is not None:
            raise RamdError(f"RAM block '{block.id}' is already sized by a VMM")
        if not isinstance(mem, FdMemory):
            raise RamdError(
                f"RAM block '{block.id}' is not shared (backend {block.backend}): only memfd"
                " and file blocks can be sized by a VMM"
            )
        if not block.resizable:
            raise RamdError(
                f"RAM block '{block.id}' is not resizable: a virtio-mem device needs a block"
                " created with max-size (the most the guest may plug)"
            )
        try:
            mem.span(block.size, block.max_size)
        except OSError as e:
            raise RamdError(
                f"Cannot extend RAM block '{block.id}' to 0x{block.max_size:x}: {_strerror(e)}",
                errno=e.errno,
            ) from None
        charged = block.charged
        block.sized_by = owner
        block.requested_size = requested
        self.used += block.charged - charged

    def request_size(self, block: RAMBlock, requested: int) -> None:
        """The VMM sizing ``block`` took the request for ``requested`` bytes."""
        charged = block.charged
        block.requested_size = requested
        self.used += block.charged - charged

    def follow_size(self, block: RAMBlock, new: int) -> None:
        """The VMM sizing ``block`` reports ``new`` bytes plugged: the block takes that
        size. Bookkeeping only: the file and the mappings stay as they are (the VMM
        allocated or freed the memory itself). The caller notifies (before a shrink, after
        a grow)."""
        charged = block.charged
        block.size = new
        self.used += block.charged - charged

    def end_vmm_sizing(self, block: RAMBlock) -> None:
        """No VMM maps ``block``'s file any more: the daemon sizes it again. Its file
        becomes ``size`` bytes long (what lay beyond is freed) and the mapping beyond
        ``size`` is reserved again; the size stays (0 included: a grow makes it usable)."""
        if block.sized_by is None or not isinstance(block.mem, FdMemory):
            return
        charged = block.charged
        block.sized_by = None
        block.requested_size = 0
        self.used += block.size - charged
        try:
            block.mem.unspan(block.size, block.max_size)
        except OSError as e:
            log.warning("RAM block '%s': file not shortened: %s", block.id, _strerror(e))

    def release_removed(self, block: RAMBlock) -> None:
        """Second half of a removal, after ``removed`` was notified: drop the block from the
        list, forget its holders, unmap it and delete its file."""
        del self._blocks[block.id]
        self.holders.forget(block)
        for hook in self.on_remove:
            hook(block)
        self._release(block, delete=True)

    def _release(self, block: RAMBlock, *, delete: bool, used: bool = True) -> None:
        """Free a block that nobody sees any more: its offset, its mapping and fd, and with
        ``delete`` its file's name (a persistent block keeps it otherwise). ``used``: its
        size counted in ``used`` (not a spare)."""
        self._space.free(block.offset, block.max_size)
        _free_memory(block.mem, block.id, delete=delete)
        if used:
            self.used -= block.charged
        self.reserved -= block.max_size + block.page_size

    def close(self) -> None:
        """Release every committed block (newest first), notifying each removal, at shutdown.

        Persistent blocks keep their files (they outlive the daemon); everything else is
        freed. Blocks still being created, and pinned blocks, are left alone: a worker thread
        may be using their memory, and unmapping it under that thread would kill the process
        (which is about to exit, and that releases them anyway).
        """
        for block_id in reversed(list(self._blocks)):
            block = self._blocks[block_id]
            if block.busy is not None:
                log.warning("RAM block '%s' left mapped at exit: %s", block_id, block.busy)
                continue
            self.notifiers.notify_removed(block)
            del self._blocks[block_id]
            self._release(block, delete=False)
        if self._memory_dir_fd >= 0:
            os.close(self._memory_dir_fd)
            os.close(self._memory_dir_lock)
            self._memory_dir_fd = self._memory_dir_lock = -1

    # -- settings --------------------------------------------------------------------------

    def _advise(self, block: RAMBlock, start: int, length: int) -> None:
        """madvise ``[start, start+length)`` of a block as its settings ask.

        Advice the kernel lacks (no KSM, no THP) is logged and skipped, as QEMU does.
        """
        addr = block.host + start
        advice = []
        if block.merge:
            advice.append(("merge", linux.MADV_MERGEABLE))
        if not block.dump:
            advice.append(("dump", linux.MADV_DONTDUMP))
        if block.hugepages:
            advice.append(("hugepages", linux.MADV_HUGEPAGE))
        for name, value in advice:
            try:
                libc.madvise(addr, length, value)
            except OSError as e:
                log.warning("RAM block '%s': setting %s not applied: %s", block.id, name, e)

    def lock_range(self, block: RAMBlock, start: int, length: int) -> None:
        """``mlock`` ``[start, start+length)`` of a ``lock`` block (which faults it in).

        A failure is an error, because the user asked for locked memory. Its cost grows with
        ``length``: a worker thread may run it on a pinned or uncommitted block.
        """
        try:
            libc.mlock(block.host + start, length)
        except OSError as e:
            raise RamdError(
                f"Cannot lock RAM block '{block.id}': {_strerror(e)}", errno=e.errno
            ) from None

    # -- templates (ramd.ramblock.seal) -------------------------------------------------------

    def seal(self, block_id: str) -> RAMBlock:
        """Seal a ``memfd`` block as a template (docs/protocol.md §14); the block."""
        return seal.seal(self, block_id)

    # -- memory access (bounds-checked: ramd.ramblock.access) --------------------------------

    def read(self, block_id: str, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the block's used range."""
        return access.read(self, block_id, offset, length)

    def write(self, block_id: str, offset: int, data: bytes) -> int:
        """Store ``data`` at ``offset`` of the block's used range; returns its length."""
        return access.write(self, block_id, offset, data)

    def discard(self, block_id: str, offset: int, length: int) -> None:
        """Free a page-aligned range of the block's used range; it reads back as zeros."""
        access.discard(self, block_id, offset, length)


def _creating(prealloc: bool, lock: bool) -> str:
    """Why a block being created is busy."""
    if prealloc:
        return "it is being preallocated"
    return "it is being locked" if lock else "it is being created"


def _free_memory(mem: HostMemory, block_id: str, *, delete: bool) -> None:
    """Unmap ``mem`` and close its fd; with ``delete``, first remove its file's name (a
    failure to do so is logged: the memory is freed anyway)."""
    if delete:
        try:
            mem.unlink()
        except OSError as e:
            log.warning("RAM block '%s': cannot remove %s: %s", block_id, mem.path, e)
    mem.free()


__all__ = ["Backend", "BlockSettings", "RAMBlock", "RAMList", "RamBlockNotifier"]
