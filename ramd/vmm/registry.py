"""The attachments of blocks to VMMs, and the steps that make and end them (docs/protocol.md §13).

An attachment puts a shared block into a running VMM over the VMM's own QMP socket: the
VMM's uid gets access to the block's file, ``add-fd`` passes the fd, ``object-add`` makes a
``memory-backend-file`` on ``/proc/self/fd/N``, ``device_add`` plugs a ``pc-dimm`` or a
``virtio-mem-pci``, and ``query-memory-devices`` says where. Each step has its undo, run in
reverse order when a later step fails, so a failed attach leaves nothing behind in either
process. Detaching is ``device_del``, the VMM's ``DEVICE_DELETED`` (the guest let go), then
``object-del`` and ``remove-fd``; without ``DEVICE_DELETED`` in time nothing changes. When
the VMM's connection closes (it exited), its attachments end with reason ``vmm-exited``. Each
attachment is recorded with its block (:mod:`ramd.vmm.records`: beside a ``file`` block, in
the fd store for a ``memfd`` block) from the attach until it ends, so that a restarted daemon
resumes it (:meth:`Attachments.resume`).

virtio-mem: before ``object-add`` the block becomes sized by its VMM
(:meth:`~ramd.ramblock.RAMList.size_by_vmm`: its file ``max-size`` long and sparse, the
backend maps all of it with ``reserve: false``), and this registry is its
:class:`~ramd.ramblock.block.SizeOwner`: a resize is a ``qom-set`` of the device's
``requested-size``, and each ``MEMORY_DEVICE_SIZE_CHANGE`` of the device is followed
(:func:`ramd.ramblock.change.follow`). Detaching first asks for 0 bytes and waits until
nothing is plugged. A VMM that refuses to unplug the device (QEMU 7.2) keeps mapping the
file: the attachment ends, but the block stays sized by that VMM ("stuck": every resize is
refused, the file is never shortened) until the VMM exits; only then does the daemon size
the block again (:meth:`~ramd.ramblock.RAMList.end_vmm_sizing`).

Invariants: a block has at most one attachment; a block sized by this registry is attached as
virtio-mem, being attached or undone, or stuck in a VMM that still runs; there is at most one
:class:`VmmLink` per socket path, open while it serves an attachment, a stuck block or an
attach in progress. Everything the VMM
owes is awaited with a deadline, and the undo steps never raise.

Ownership and thread: owned by the :class:`~ramd.api.service.Service`; loop thread only.
The block commands consult :meth:`Attachments.refuse_change` before they change a block.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ramd.errors import RamdError
from ramd.ramblock import RAMBlock, RAMList, change
from ramd.ramblock.holders import Holder
from ramd.vmm import records
from ramd.vmm.errors import VmmError, VmmGone, VmmRefused, VmmTimeout

if TYPE_CHECKING:
    from ramd.vmm.link import VmmLink

log = logging.getLogger(__name__)

AttachAs = Literal["pc-dimm", "virtio-mem"]
Emit = Callable[[str, RAMBlock, dict[str, Any]], None]
#: One undo step of an attach: given its deadline in seconds.
Step = Callable[[float], Awaitable[object]]

#: Deadline per undo step of an attach that the VMM did not answer in time (:meth:`_sweep`).
SWEEP_TIMEOUT = 30.0

#: Seconds an unused link stays open (the VMM's monitor serves one client at a time, so
#: ramd lets go of its socket soon, but not between a detach and the next attach).
LINK_LINGER = 10.0

#: How the device of each kind is called in ``device_add``.
DRIVERS: dict[str, str] = {"pc-dimm": "pc-dimm", "virtio-mem": "virtio-mem-pci"}


@dataclass(eq=False)
class Attachment:
    """One block in one VMM. ``fdset_id``/``vmm_fd``: what ``add-fd`` returned; ``holder``:
    the VMM as a holder of the block (kind ``vmm``: a lease; its uid may open the file while
    it holds, :mod:`ramd.ramblock.holders`), dropped when the attachment ends."""

    block: RAMBlock
    link: VmmLink
    kind: AttachAs
    device: str
    addr: int
    fdset_id: int
    vmm_fd: int
    holder: Holder
    #: Resolved when the VMM reports ``DEVICE_DELETED`` of the device, while a detach waits.
    deleted: asyncio.Future[None] | None = None
    #: The VMM reported ``DEVICE_DELETED`` (the guest let go, maybe after a detach timed out,
    #: or on its own): only the backend and the fd are left to delete.
    unplugged: bool = False
    detaching: bool = field(default=False)
    #: Deadline in seconds of each command sent to the VMM after the attach (``qom-set``).
    timeout: float = 30.0
    #: virtio-mem: resolved when the plugged size reaches 0, while a detach waits.
    emptied: asyncio.Future[None] | None = None

    @property
    def memdev_id(self) -> str:
        return memdev_id(self.block)

    def record(self) -> records.Record:
        """What a restarted daemon needs to resume this attachment."""
        link = self.link
        return records.Record(
            link.path, self.kind, self.device, link.pid, self.fdset_id, self.vmm_fd
        )

    def info(self) -> dict[str, object]:
        """``RamBlockInfo.attachment`` (wire names)."""
        info: dict[str, object] = {
            "qmp": self.link.path,
            "as": self.kind,
            "device": self.device,
            "memdev": f"/objects/{self.memdev_id}",
            "addr": self.addr,
            "vmm-pid": self.link.pid,
        }
        if self.kind == "virtio-mem":
            info["requested-size"] = self.block.requested_size
        return info


def memdev_id(block: RAMBlock) -> str:
    return f"ramd-mem-{block.id}"


class Attachments:
    """Every attachment, by block, and the VMM links they use; the size owner of the blocks
    attached as virtio-mem (:class:`~ramd.ramblock.block.SizeOwner`).

    ``emit(name, block, data)`` sends a block event (``seq`` is added by the broadcaster);
    ``refresh(block)`` re-encodes the block's ``RamBlockInfo`` after ``block.attachment``
    changed; ``ram``: the RAM list, whose holders count each attachment as a ``vmm`` holder.
    """

    def __init__(self, emit: Emit, refresh: Callable[[RAMBlock], None], ram: RAMList) -> None:
        self._emit = emit
        self._refresh = refresh
        self._ram = ram
        self._holders = ram.holders
        ram.on_remove.append(self._removed)
        self._by_block: dict[RAMBlock, Attachment] = {}
        #: Blocks whose virtio-mem device the VMM could not unplug: it still maps them.
        self._stuck: dict[RAMBlock, Attachment] = {}
        #: (link, device) -> the last size the VMM reported while an attach reads it
        #: (None: none yet), see :meth:`_plugged_now`.
        self._watching: dict[tuple[VmmLink, str], int | None] = {}
        self._links: dict[str, VmmLink] = {}
        self._opening: dict[str, asyncio.Task[VmmLink]] = {}
        #: Attaches in progress per socket path (their link must stay open).
        self._busy: dict[str, int] = {}
        #: Blocks whose failed attach is being undone in the background (:meth:`_sweep`).
        self._sweeping: set[str] = set()
        #: Links being closed, and background undos (the tasks are kept until done).
        self._closing: set[asyncio.Task[None]] = set()

    def of(self, block: RAMBlock) -> Attachment | None:
        return self._by_block.get(block)

    # -- checks for the block commands ---------------------------------------------------

    def guard(self, block: RAMBlock, new_size: int | None) -> None:
        """A guard of the RAM list (:attr:`ramd.ramblock.RAMList.guards`): a removal
        (``new_size`` None) or a resize of an attached block is refused as
        :meth:`refuse_change` says."""
        self.refuse_change(block, "del" if new_size is None else "resize")

    def refuse_change(self, block: RAMBlock, what: Literal["resize", "del"]) -> None:
        """Raise the protocol's refusal if ``block`` is attached and ``what`` may not happen
        to it: a removal (detach first), or a resize by anyone but its VMM (a ``pc-dimm``'s
        size is fixed; a virtio-mem block's is what the guest plugs)."""
        att = self._by_block.get(block)
        if att is None:
            stuck = self._stuck.get(block)
            if stuck is not None and what == "resize":
                raise self._stuck_error(stuck)
            return
        if what == "del":
            raise RamdError(
                f"RAM block '{block.id}' is attached to VMM {att.link.pid} as {att.device}:"
                " detach it first"
            )
        if att.kind == "pc-dimm":
            raise RamdError(f"RAM block '{block.id}' is attached as pc-dimm: its size is fixed")
        raise RamdError(
            f"RAM block '{block.id}' is attached as virtio-mem: its size is what the guest"
            " plugs (ram-block-resize asks the guest)"
        )

    @staticmethod
    def _stuck_error(att: Attachment) -> RamdError:
        return RamdError(
            f"RAM block '{att.block.id}' is still mapped by VMM {att.link.pid}, which cannot"
            f" unplug its virtio-mem device {att.device}: its size is fixed until the VMM exits"
        )

    # -- the size owner of virtio-mem blocks ----------------------------------------------

    def request(self, block: RAMBlock, size: int) -> Awaitable[None]:
        """Ask the guest for ``size`` bytes: ``qom-set`` of the device's ``requested-size``
        (:class:`~ramd.ramblock.block.SizeOwner`). Refused for a block being attached or
        undone, or stuck in a VMM."""
        att = self._by_block.get(block)
        if att is None:
            stuck = self._stuck.get(block)
            if stuck is not None:
                raise self._stuck_error(stuck)
            raise RamdError(
                f"RAM block '{block.id}' is busy: it is being attached to a VMM, or a VMM keeps"
                " it after a failed attach"
            )
        if att.detaching:
            raise RamdError(f"RAM block '{block.id}' is busy: it is being detached")
        return self._set_requested(att, size, "resizing")

    async def _set_requested(self, att: Attachment, size: int, what: str) -> None:
        args = {"path": _qom_path(att.device), "property": "requested-size", "value": size}
        try:
            await att.link.execute("qom-set", args, att.timeout)
        except VmmRefused as e:
            raise RamdError(f"VMM refused {what} RAM block '{att.block.id}': {e.desc}") from None
        except VmmError as e:
            raise RamdError(
                f"Cannot ask the VMM at '{att.link.path}' to resize RAM block '{att.block.id}': {e}"
            ) from None

    def requested(self, block: RAMBlock) -> None:
        """``block.requested_size`` changed: ``RamBlockInfo.attachment`` shows it."""
        att = self._by_block.get(block)
        if att is not None:
            block.attachment = att.info()
            self._refresh(block)

    def _removed(self, block: RAMBlock) -> None:
        """A RAM list hook: ``block`` is gone (a stuck block is only forgotten: the VMM
        keeps its mapping of the file until it exits)."""
        att = self._stuck.pop(block, None)
        if att is not None:
            self._release_link(att.link)

    # -- links ----------------------------------------------------------------------------

    async def _link(self, path: str, timeout: float) -> VmmLink:
        """The open link to ``path``, connecting one if needed (concurrent attaches to the
        same socket share one connection attempt)."""
        link = self._links.get(path)
        if link is not None and link.connected:
            return link
        task = self._opening.get(path)
        if task is None:
            # imported at the first attach only (qemu.qmp maps OpenSSL: see ramd.vmm.errors)
            from ramd.vmm.link import VmmLink

            task = asyncio.get_running_loop().create_task(VmmLink.open(path, timeout))
            self._opening[path] = task
            task.add_done_callback(lambda t: self._opened(path, t))
        return await asyncio.shield(task)

    def _opened(self, path: str, task: asyncio.Task[VmmLink]) -> None:
        self._opening.pop(path, None)
        if task.cancelled() or task.exception() is not None:
            return
        link = task.result()
        link.on_event = lambda name, data: self._vmm_event(link, name, data)
        link.on_close = self._vmm_closed
        self._links[path] = link

    def _in_use(self, link: VmmLink) -> bool:
        return (
            bool(self._busy.get(link.path))
            or any(a.link is link for a in self._by_block.values())
            or any(a.link is link for a in self._stuck.values())
        )

    def _release_link(self, link: VmmLink) -> None:
        """Close ``link`` once nothing has used it for :data:`LINK_LINGER` seconds (a
        detach and a new attach soon after reuse the session instead of negotiating a new
        one); a link in use again by then stays open."""
        if self._in_use(link):
            return
        asyncio.get_running_loop().call_later(LINK_LINGER, self._close_idle, link)

    def _close_idle(self, link: VmmLink) -> None:
        if self._in_use(link) or self._links.get(link.path) is not link:
            return
        del self._links[link.path]
        task = asyncio.get_running_loop().create_task(link.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- attach ---------------------------------------------------------------------------

    async def attach(
        self,
        block: RAMBlock,
        qmp: str,
        kind: AttachAs,
        device: str | None,
        bus: str | None,
        timeout: float,
        requested: int | None = None,
    ) -> Attachment:
        """Attach ``block`` to the VMM at ``qmp`` as ``kind``; every step the VMM answers
        within ``timeout`` seconds, or the attach is undone. ``requested``: virtio-mem, the
        bytes the guest is asked to plug (default the block's size). The caller keeps the
        block from changing meanwhile (pinned). Raises :class:`RamdError`."""
        existing = self._by_block.get(block)
        if existing is not None:
            raise RamdError(
                f"RAM block '{block.id}' is already attached to VMM {existing.link.pid} as"
                f" {existing.device}"
            )
        if not block.shared:
            raise RamdError(
                f"RAM block '{block.id}' is not shared (backend {block.backend}): only memfd"
                " and file blocks can be attached"
            )
        if block.id in self._sweeping:
            raise RamdError(f"RAM block '{block.id}' is busy: undoing a failed attach in a VMM")
        if block in self._stuck:
            raise self._stuck_error(self._stuck[block])
        if kind == "virtio-mem" and not block.resizable:
            raise RamdError(
                f"Cannot attach RAM block '{block.id}' as virtio-mem: it is not resizable (the"
                " guest plugs up to max-size: add the block with max-size)"
            )
        if requested is None:
            requested = block.size
        requested = -(-requested // block.page_size) * block.page_size
        self._busy[qmp] = self._busy.get(qmp, 0) + 1
        try:
            try:
                link = await self._link(qmp, timeout)
            except VmmError as e:
                raise RamdError(str(e)) from None
            return await self._attach_steps(
                block, link, kind, device or f"ramd-{block.id}", bus, timeout, requested
            )
        finally:
            self._busy[qmp] -= 1
            if not self._busy[qmp]:
                del self._busy[qmp]
            link_now = self._links.get(qmp)
            if link_now is not None:
                self._release_link(link_now)

    async def _attach_steps(
        self,
        block: RAMBlock,
        link: VmmLink,
        kind: AttachAs,
        device: str,
        bus: str | None,
        timeout: float,
        requested: int,
    ) -> Attachment:
        # Each VMM-side undo is registered before its step is sent: a step whose answer
        # timed out may still happen in the VMM, and its undo is harmless if it did not.
        undo: list[tuple[str, Step]] = []
        mem = memdev_id(block)

        async def vmm(cmd: str, args: Mapping[str, object] | None = None) -> object:
            return await link.execute(cmd, args, timeout)

        async def del_backend(t: float) -> None:
            """``object-del``; once the VMM has no backend on the file (deleted, or never
            made), the daemon sizes a virtio-mem block again. A backend still in use (its
            device could not be unplugged) keeps the file as it is."""
            try:
                await link.execute("object-del", {"id": mem}, t)
            except VmmRefused as e:
                if "not found" not in e.desc:
                    log.warning(
                        "RAM block '%s': the VMM keeps backend %s (%s): its file stays as"
                        " long as the VMM maps it",
                        block.id,
                        mem,
                        e.desc,
                    )
                    raise
            self._ram.end_vmm_sizing(block)

        holder = self._hold(block, link)
        try:
            undo.append(("remove-fd", lambda t: _remove_fds(link, block, t)))
            answer = await link.add_fd(block.fd, f"ramd:{block.id}", timeout)
            fdset_id, vmm_fd = _fd_of(answer)
            backend: dict[str, object] = {
                "qom-type": "memory-backend-file",
                "id": mem,
                "mem-path": f"/proc/self/fd/{vmm_fd}",
                "share": True,
                "size": block.size,
            }
            dev: dict[str, object] = {"driver": DRIVERS[kind], "id": device, "memdev": mem}
            if kind == "virtio-mem":
                self._ram.size_by_vmm(block, self, requested)
                backend.update(size=block.max_size, reserve=False)
                dev["requested-size"] = requested
            if bus is not None:
                dev["bus"] = bus
            undo.append(("object-del", del_backend))
            await vmm("object-add", backend)
            undo.append(("device_del", lambda t: link.execute("device_del", {"id": device}, t)))
            await vmm("device_add", dev)
            addr, plugged = await self._plugged_now(link, device, mem, timeout)
        except BaseException as e:
            # access first: a backend the stalled VMM creates later cannot open the file
            self._holders.remove(block, holder.owner)
            done = False
            if isinstance(e, VmmRefused | VmmGone | OSError | RamdError):
                done = await _undo(block, undo, timeout)
            if not done and not isinstance(e, asyncio.CancelledError):
                self._sweep(block, link, undo)
            if isinstance(e, VmmRefused):
                raise RamdError(f"VMM refused attaching RAM block '{block.id}': {e.desc}") from None
            if isinstance(e, VmmError | OSError):
                raise RamdError(
                    f"Cannot attach RAM block '{block.id}' to the VMM at '{link.path}': {e}"
                ) from None
            raise
        att = Attachment(block, link, kind, device, addr, fdset_id, vmm_fd, holder, timeout=timeout)
        self._register(att)
        records.save(block, att.record())
        self._emit(
            "RAM_BLOCK_ATTACHED",
            block,
            {"id": block.id, "device": device, "as": kind, "addr": addr, "vmm-pid": link.pid},
        )
        if plugged is not None:
            self._follow(att, plugged)
        log.info(
            "RAM block '%s' attached to VMM pid %d (uid %d) as %s %s at 0x%x",
            block.id,
            link.pid,
            link.uid,
            kind,
            device,
            addr,
        )
        return att

    async def _plugged_now(
        self, link: VmmLink, device: str, memdev: str, timeout: float
    ) -> tuple[int, int | None]:
        """The device's guest-physical address and, for virtio-mem, its plugged size now,
        read from ``query-memory-devices``. A ``MEMORY_DEVICE_SIZE_CHANGE`` read while the
        answer was awaited may be older or newer than it: then it is asked again (up to 8
        times, then the last size reported wins), so the size returned is current when this
        returns; the caller registers the attachment before it yields, and the events after
        that are followed."""
        key = (link, device)
        try:
            for _ in range(8):
                self._watching[key] = None
                addr, size = _device_of(
                    await link.execute("query-memory-devices", None, timeout), device, memdev
                )
                if self._watching[key] is None:
                    return addr, size
            return addr, self._watching[key]
        finally:
            self._watching.pop(key, None)

    def _follow(self, att: Attachment, size: int) -> None:
        """The VMM reports ``size`` bytes plugged in the block attached as ``att``."""
        try:
            change.follow(self._ram, att.block, size)
        except RamdError as e:
            log.warning("%s", e)
            return
        if att.block.size == 0 and att.emptied is not None and not att.emptied.done():
            att.emptied.set_result(None)

    def _register(self, att: Attachment) -> None:
        self._by_block[att.block] = att
        att.block.attachment = att.info()
        self._refresh(att.block)

    def _sweep(self, block: RAMBlock, link: VmmLink, undo: list[tuple[str, Step]]) -> None:
        """Undo a failed attach in the background, with :data:`SWEEP_TIMEOUT` per step: the
        VMM did not answer in time, and may run what it was sent once it wakes up. The
        block cannot be attached again until this is done."""
        self._sweeping.add(block.id)
        self._busy[link.path] = self._busy.get(link.path, 0) + 1

        async def sweep() -> None:
            try:
                if not await _undo(block, undo, SWEEP_TIMEOUT):
                    log.warning(
                        "RAM block '%s': VMM pid %d did not answer the undo of a failed attach"
                        " within %g s per step; it may keep an fd or backend of the block",
                        block.id,
                        link.pid,
                        SWEEP_TIMEOUT,
                    )
            finally:
                self._sweeping.discard(block.id)
                self._busy[link.path] -= 1
                if not self._busy[link.path]:
                    del self._busy[link.path]
                self._release_link(link)

        task = asyncio.get_running_loop().create_task(sweep())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _hold(self, block: RAMBlock, link: VmmLink) -> Holder:
        """The VMM holds ``block`` from now on (a lease of kind ``vmm``; its uid may open
        the block's file read-write)."""
        holder = Holder("vmm", object(), link.pid, link.uid, False, lambda: None)
        try:
            return self._holders.add(block, holder)
        except OSError as e:
            self._holders.remove(block, holder.owner)
            raise RamdError(
                f"Cannot give uid {link.uid} access to RAM block '{block.id}':"
                f" {os.strerror(e.errno or 0)}"
            ) from None

    # -- detach ---------------------------------------------------------------------------

    async def detach(self, block: RAMBlock, timeout: float, step_timeout: float) -> None:
        """Unplug the block's device, wait up to ``timeout`` seconds for ``DEVICE_DELETED``,
        then delete the backend and the fd in the VMM and end the attachment. Without the
        event in time: the protocol's timeout error, nothing changed (the VMM keeps its
        pending unplug request, and the detach may be repeated).

        virtio-mem: first ``requested-size`` 0, and up to ``timeout`` seconds for the guest
        to unplug everything (without it: the timeout error; the request stays 0). A VMM that
        refuses ``device_del`` then (QEMU 7.2) keeps the device and its mapping of the
        empty file: the attachment ends there, and the block stays stuck in that VMM."""
        att = self._by_block.get(block)
        if att is None:
            raise RamdError(f"RAM block '{block.id}' is not attached")
        if att.detaching:
            raise RamdError(f"RAM block '{block.id}' is busy: it is being detached")
        link = att.link
        att.detaching = True
        att.deleted = asyncio.get_running_loop().create_future()
        if att.unplugged:
            att.deleted.set_result(None)
        try:
            try:
                if att.kind == "virtio-mem" and not att.unplugged:
                    await self._empty(att, timeout)
                if not att.unplugged:
                    await link.execute("device_del", {"id": att.device}, step_timeout)
            except VmmRefused as e:
                if att.kind == "virtio-mem" and "process of unplug" not in e.desc:
                    self._stick(att, e.desc)
                    return
                if "process of unplug" not in e.desc:
                    raise RamdError(
                        f"VMM refused detaching RAM block '{block.id}': {e.desc}"
                    ) from None
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(att.deleted)
            except TimeoutError:
                raise RamdError(
                    f"Timed out waiting for the VMM to release RAM block '{block.id}'"
                ) from None
        except VmmGone as e:
            if self._by_block.get(block) is not att:
                return  # the VMM exited: _vmm_closed ended the attachment
            raise RamdError(
                f"Cannot detach RAM block '{block.id}' from the VMM at '{link.path}': {e}"
            ) from None
        except VmmError as e:
            raise RamdError(
                f"Cannot detach RAM block '{block.id}' from the VMM at '{link.path}': {e}"
            ) from None
        finally:
            att.detaching = False
            att.deleted = None
        if self._by_block.get(block) is not att:
            return  # ended meanwhile (the VMM exited)
        for cmd, args in (
            ("object-del", {"id": att.memdev_id}),
            ("remove-fd", {"fdset-id": att.fdset_id, "fd": att.vmm_fd}),
        ):
            try:
                await link.execute(cmd, args, step_timeout)
            except VmmError as e:
                log.warning("RAM block '%s': detach: %s failed: %s", block.id, cmd, e)
        self._end(att, "detached")
        self._ram.end_vmm_sizing(block)

    async def _empty(self, att: Attachment, timeout: float) -> None:
        """Ask the guest to unplug all of a virtio-mem block and wait up to ``timeout``
        seconds until the VMM reports nothing plugged (the protocol's timeout error)."""
        block = att.block
        args = {"path": _qom_path(att.device), "property": "requested-size", "value": 0}
        try:
            await att.link.execute("qom-set", args, att.timeout)
        except VmmRefused as e:
            raise RamdError(f"VMM refused detaching RAM block '{block.id}': {e.desc}") from None
        self._ram.request_size(block, 0)
        self.requested(block)
        if block.size == 0:
            return
        att.emptied = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(att.emptied)
        except TimeoutError:
            raise RamdError(
                f"Timed out waiting for the VMM to release RAM block '{block.id}'"
            ) from None
        finally:
            att.emptied = None

    def _stick(self, att: Attachment, why: str) -> None:
        """The VMM refused to unplug the empty virtio-mem device of ``att`` (``why``): the
        attachment ends, its lease with it, but the VMM keeps mapping the block's file, so
        the block stays sized by it (stuck) until it exits."""
        log.info(
            "RAM block '%s': VMM pid %d keeps its virtio-mem device %s (%s): the attachment"
            " ends; the block's file stays mapped by the VMM until it exits",
            att.block.id,
            att.link.pid,
            att.device,
            why,
        )
        self._stuck[att.block] = att
        self._end(att, "detached")

    # -- the VMM's side -------------------------------------------------------------------

    def _vmm_event(self, link: VmmLink, name: str, data: Mapping[str, object]) -> None:
        if name == "MEMORY_DEVICE_SIZE_CHANGE":
            self._size_changed(link, data)
            return
        if name != "DEVICE_DELETED":
            return
        device = data.get("device")
        for att in self._by_block.values():
            if att.link is not link or att.device != device:
                continue
            att.unplugged = True
            if att.deleted is not None and not att.deleted.done():
                att.deleted.set_result(None)

    def _size_changed(self, link: VmmLink, data: Mapping[str, object]) -> None:
        """``MEMORY_DEVICE_SIZE_CHANGE``: a virtio-mem device's plugged size changed."""
        device, size = data.get("id"), data.get("size")
        if not isinstance(device, str) or type(size) is not int:
            return
        if (link, device) in self._watching:
            self._watching[(link, device)] = size
        for att in list(self._by_block.values()):
            if att.link is link and att.device == device and att.kind == "virtio-mem":
                self._follow(att, size)

    def _vmm_closed(self, link: VmmLink) -> None:
        """The VMM's connection closed: it exited (or dropped ramd); its attachments end,
        and the blocks it sized are the daemon's to size again (it maps nothing now)."""
        if self._links.get(link.path) is link:
            del self._links[link.path]
        for att in [a for a in self._by_block.values() if a.link is link]:
            if att.deleted is not None and not att.deleted.done():
                att.deleted.set_exception(VmmGone("the VMM closed the connection"))
            if att.emptied is not None and not att.emptied.done():
                att.emptied.set_exception(VmmGone("the VMM closed the connection"))
            self._end(att, "vmm-exited")
            self._ram.end_vmm_sizing(att.block)
        for att in [a for a in self._stuck.values() if a.link is link]:
            del self._stuck[att.block]
            self._ram.end_vmm_sizing(att.block)

    def _end(self, att: Attachment, reason: str) -> None:
        """The attachment is over: the file's access is the daemon's alone again, the block
        info and the subscribers learn it."""
        block = att.block
        del self._by_block[block]
        records.remove(block, att.record())
        self._holders.remove(block, att.holder.owner)
        block.attachment = None
        self._refresh(block)
        self._emit(
            "RAM_BLOCK_DETACHED", block, {"id": block.id, "device": att.device, "reason": reason}
        )
        log.info("RAM block '%s' detached from VMM pid %d: %s", block.id, att.link.pid, reason)
        self._release_link(att.link)

    # -- resume after a restart -----------------------------------------------------------

    async def resume(
        self, blocks: Iterable[RAMBlock], stored: Mapping[str, records.Record], timeout: float
    ) -> None:
        """At start, before clients are served: resume the recorded attachment of each of
        ``blocks`` (:mod:`ramd.vmm.records`; ``stored``: the records of ``memfd`` blocks the
        fd store passed back, by block id) whose VMM still runs (the same pid answers on the
        recorded QMP socket) and still lists the device on memdev ``ramd-mem-ID``; any other
        ends with reason ``vmm-exited``. The VMMs are asked concurrently, each within
        ``timeout`` seconds. A stored record of a block that was not adopted is dropped."""
        found: list[tuple[RAMBlock, records.Record]] = []
        adopted: set[str] = set()
        for block in blocks:
            rec = stored.get(block.id) if block.backend == "memfd" else records.load(block)
            if rec is not None:
                found.append((block, rec))
                adopted.add(block.id)
        for block_id, rec in stored.items():
            if block_id not in adopted:
                records.forget_stored(block_id, rec)
        await asyncio.gather(*(self._resume(block, rec, timeout) for block, rec in found))

    async def _resume(self, block: RAMBlock, rec: records.Record, timeout: float) -> None:
        self._busy[rec.qmp] = self._busy.get(rec.qmp, 0) + 1
        link: VmmLink | None = None
        try:
            try:
                link = await self._link(rec.qmp, timeout)
                if link.pid != rec.vmm_pid:
                    raise VmmGone(f"pid {link.pid} answers there now, not {rec.vmm_pid}")
                devices = await link.execute("query-memory-devices", None, timeout)
                addr, plugged = _device_of(devices, rec.device, memdev_id(block))
                kind: AttachAs = "virtio-mem" if rec.kind == "virtio-mem" else "pc-dimm"
                if kind == "virtio-mem":
                    # the VMM sizes the block again, from what it reports
                    requested = _requested_of(devices, rec.device)
                    self._ram.size_by_vmm(block, self, requested)
                holder = self._hold(block, link)
            except (VmmError, RamdError) as e:
                records.remove(block, rec)
                self._emit(
                    "RAM_BLOCK_DETACHED",
                    block,
                    {"id": block.id, "device": rec.device, "reason": "vmm-exited"},
                )
                log.info(
                    "RAM block '%s': attachment to VMM pid %d at %s not resumed: %s",
                    block.id,
                    rec.vmm_pid,
                    rec.qmp,
                    e,
                )
                return
            att = Attachment(block, link, kind, rec.device, addr, rec.fdset_id, rec.fd, holder)
            self._register(att)
            if plugged is not None:
                self._follow(att, plugged)
            log.info(
                "RAM block '%s': attachment to VMM pid %d as %s %s resumed",
                block.id,
                link.pid,
                kind,
                rec.device,
            )
        finally:
            self._busy[rec.qmp] -= 1
            if not self._busy[rec.qmp]:
                del self._busy[rec.qmp]
            if link is not None:
                self._release_link(link)

    async def close(self) -> None:
        """At shutdown: close every link (the VMMs keep what they map) and take back the
        access given to their uids. The attachments stay recorded with their blocks: the
        next daemon resumes them (:meth:`resume`)."""
        for att in list(self._by_block.values()):
            self._holders.remove(att.block, att.holder.owner)
        self._by_block.clear()
        self._stuck.clear()
        links = list(self._links.values())
        self._links.clear()
        await asyncio.gather(*(link.close() for link in links), *self._closing)


async def _undo(block: RAMBlock, steps: list[tuple[str, Step]], timeout: float) -> bool:
    """Run the undo steps in reverse order, each within ``timeout``; False if one timed out
    (the rest are left for a retry). A refusal means there was nothing to undo; a closed
    connection means the VMM holds nothing any more."""
    for name, step in reversed(steps):
        try:
            await step(timeout)
        except VmmRefused as e:
            log.debug("RAM block '%s': undo %s: %s", block.id, name, e.desc)
        except VmmTimeout:
            return False
        except VmmError as e:
            log.info("RAM block '%s': undo %s: %s", block.id, name, e)
            return True
    return True


async def _remove_fds(link: VmmLink, block: RAMBlock, timeout: float) -> None:
    """``remove-fd`` of every fd the VMM holds with the block's ``opaque`` (found by
    ``query-fdsets``, so it works whether or not the ``add-fd`` answer was seen)."""
    opaque = f"ramd:{block.id}"
    for fdset in _list(await link.execute("query-fdsets", None, timeout)):
        for fd in _list(fdset.get("fds")):
            if fd.get("opaque") == opaque:
                args = {"fdset-id": fdset.get("fdset-id"), "fd": fd.get("fd")}
                await link.execute("remove-fd", args, timeout)


def _list(value: object) -> list[dict[str, object]]:
    """The objects of a JSON list (anything else is skipped)."""
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, dict)]


def _fd_of(answer: object) -> tuple[int, int]:
    """``fdset-id`` and ``fd`` of an ``add-fd`` answer."""
    if isinstance(answer, dict):
        fdset, fd = answer.get("fdset-id"), answer.get("fd")
        if type(fdset) is int and type(fd) is int:
            return fdset, fd
    raise VmmGone("add-fd answered no fd")


def _device_of(answer: object, device: str, memdev: str) -> tuple[int, int | None]:
    """The guest-physical address of ``device`` in a ``query-memory-devices`` answer, and
    its plugged size when it is a virtio-mem device (else None)."""
    if isinstance(answer, list):
        for entry in answer:
            data = entry.get("data") if isinstance(entry, dict) else None
            if not isinstance(data, dict):
                continue
            if data.get("id") == device and data.get("memdev") == f"/objects/{memdev}":
                addr = data.get("addr", data.get("memaddr"))
                if type(addr) is not int:
                    break
                if entry.get("type") != "virtio-mem":
                    return addr, None
                size = data.get("size")
                if type(size) is int:
                    return addr, size
    raise VmmGone(f"query-memory-devices does not list {device}")


def _requested_of(answer: object, device: str) -> int:
    """The ``requested-size`` of virtio-mem ``device`` in a ``query-memory-devices``
    answer (0 when it is not there)."""
    if isinstance(answer, list):
        for entry in answer:
            data = entry.get("data") if isinstance(entry, dict) else None
            if isinstance(data, dict) and data.get("id") == device:
                size = data.get("requested-size")
                return size if type(size) is int else 0
    return 0


def _qom_path(device: str) -> str:
    """The QOM path of a device added with ``id`` ``device``."""
    return f"/machine/peripheral/{device}"
