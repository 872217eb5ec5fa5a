"""``ram-save``, ``ram-load`` and the job commands (docs/protocol.md §10), on :mod:`ramd.jobs` and
:mod:`ramd.snapshot`.

Threads and ownership:

- the handlers run on the loop thread: they resolve the target or source to an fd owned by
  the job (an image file opened in ``state-dir``, or a ``dup`` of a ``getfd`` fd, so a
  ``closefd`` meanwhile changes nothing), pin the blocks a save reads, and start the job;
- the work runs in a job worker thread (a save's file writes and a load's block writes in
  the image library's helper thread, :mod:`ramd.snapshot.pipeline`): it reads or writes
  block memory only while the block is pinned (commands that would change it answer
  "busy"); every block creation, resize, commit or abort runs on the loop thread through
  :meth:`JobContext.run_on_loop`;
- ``on_finish`` (loop thread) releases every pin the job took and closes its fd. A job
  abandoned at shutdown keeps its pins: :meth:`RAMList.close` leaves pinned blocks mapped.
  A save's pins are shared (several saves may read a block together); a load's exclusive;
  block memory is reached only through :mod:`ramd.ramblock.access` (bounds-checked).

Load, as QEMU's incoming migration: the image's header and table are checked, then every
block of the image against the daemon's blocks (``Size mismatch``, ``Size too large``,
limits, "busy"), then all of its data (:func:`ramd.snapshot.verify_data`), before anything
visible changes; only then are missing blocks added and resizable ones resized (events as
for any add or resize), and their contents replaced. A missing block that is not
persistent is created, invisible, before the data is checked and loaded by that same pass
(into fresh memory, the common case of an incoming migration: one read of the image, not
two); it is freed if the load fails and made visible with the others if it succeeds.
Cancel: a load honours ``job-cancel`` until visible blocks start to change (during the checks
and verification), and a cancelled load changed nothing; once the first one changed, it runs
to the end, so a load that concluded without error is complete.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator
from dataclasses import dataclass, field

from ramd import blocksettings
from ramd.api import models as m
from ramd.api.limits import check_add_limits, check_grow, create_block, limit
from ramd.api.service import Service, Session
from ramd.api.table import command
from ramd.errors import DeviceNotFound, RamdError
from ramd.jobs import Job, JobContext, JobManager
from ramd.process import fdstore
from ramd.ramblock import RAMBlock, access, change
from ramd.ramblock.pins import Pin
from ramd.ramblock.seal import check_not_sealed
from ramd.snapshot import (
    BlockDescriptor,
    ImageInfo,
    atomic_target,
    load,
    open_image,
    open_state_dir,
    read_info,
    remove_stale_temporaries,
    verify_data,
    write_image,
)

#: The add-time settings an image records for each block (``BlockDescriptor.settings``).
SETTINGS = blocksettings.NAMES
SAVING = "it is being saved"
LOADING = "it is being loaded"


def job_manager(service: Service) -> JobManager:
    """The service's job manager, created at the first job (loop thread, running loop)."""
    if service.jobs is None:
        broadcaster = service.broadcaster
        service.jobs = JobManager(lambda job: broadcaster.job_status(job.id, job.status))
    return service.jobs


def state_dir_fd(service: Service) -> int:
    """The state directory's fd, opened (and cleared of dead writers' temporaries) once."""
    if service.state_dir_fd < 0:
        fd = open_state_dir(service.state_dir)
        try:
            remove_stale_temporaries(fd)
        except OSError as e:
            os.close(fd)
            raise RamdError(f"Cannot clean the state directory: {e.strerror}") from None
        service.state_dir_fd = fd
    return service.state_dir_fd


def _session_fd(session: Session, name: str) -> int:
    """A duplicate of the ``getfd`` fd ``name`` (the job owns it)."""
    fd = session.fds.get(name)
    if fd is None:
        raise RamdError(f"File descriptor named '{name}' not found")
    return os.dup(fd)


def descriptor(block: RAMBlock) -> BlockDescriptor:
    """What an image records about ``block``."""
    settings = {name: getattr(block, name) for name in SETTINGS}
    return BlockDescriptor(
        block.id,
        block.size,
        block.max_size,
        block.resizable,
        block.page_size,
        block.backend,
        settings,
    )


# -- ram-save ----------------------------------------------------------------------------------


@command("ram-save", m.RamSaveArgs, m.JobStarted, audit=True)
def ram_save(session: Session, args: m.RamSaveArgs) -> m.JobStarted:
    """Start a job that writes an image of the blocks (all, or those listed) to ``target``:
    a name in ``state-dir`` (durable: written to a temporary name, fsynced, renamed) or a
    ``getfd`` fd (written, not fsynced: the client owns the file and its durability, as with
    QEMU's ``migrate fd:``; a failed or cancelled save leaves it truncated to zero length).
    The blocks are pinned while it runs: resize, del, discard and write answer busy."""
    service = session.service
    ram = service.ram
    ids = list(dict.fromkeys(args.blocks)) if args.blocks is not None else [b.id for b in ram]
    if not ids:
        raise RamdError("Nothing to save: no RAM block")
    blocks = [ram.get(block_id) for block_id in ids]
    target = args.target
    dir_fd = state_dir_fd(service) if isinstance(target, m.FileTarget) else -1
    fd = _session_fd(session, target.fd) if isinstance(target, m.FdTarget) else -1
    descs = [descriptor(b) for b in blocks]

    def read(index: int, offset: int, buf: memoryview) -> None:
        access.read_into(blocks[index], offset, buf)

    def work(ctx: JobContext) -> None:
        if isinstance(target, m.FileTarget):
            with atomic_target(dir_fd, target.file) as out:
                write_image(
                    out, descs, read, progress=ctx.advance, cancelled=ctx.cancelled, durable=True
                )
        else:
            write_image(fd, descs, read, progress=ctx.advance, cancelled=ctx.cancelled)

    pins: list[Pin] = []

    def finish(job: Job | None) -> None:
        for pin in pins:
            pin.release()
        if fd >= 0:
            os.close(fd)

    try:
        pins.extend(block.pins.take(SAVING, shared=True) for block in blocks)
        job = job_manager(service).start(
            "ram-save", work, total=sum(b.size for b in blocks), on_finish=finish
        )
    except BaseException:
        finish(None)
        raise
    return m.JobStarted(job_id=job.id)


# -- ram-load ----------------------------------------------------------------------------------


@dataclass
class _Load:
    """One load's blocks and what it holds (loop thread, except ``targets`` and ``direct``,
    which the worker reads once they are set).

    ``direct``: image indexes of the blocks created before verification and loaded while
    it checks them (missing, not persistent); the others are resized or created once the
    image is verified and loaded by a second pass. ``targets``: image index -> block."""

    service: Service
    fd: int
    targets: dict[int, RAMBlock] = field(default_factory=dict)
    direct: set[int] = field(default_factory=set)
    created: list[RAMBlock] = field(default_factory=list)  # not yet committed
    filled: int = 0  # created[:filled] are locked and preallocated as asked
    pins: list[Pin] = field(default_factory=list)

    def check(self, info: ImageInfo) -> Generator[None, None, None]:
        """Refuse the image if any of its blocks (but the direct ones) cannot take it, the
        missing ones all together past ``max-blocks`` included; changes nothing. A
        generator: it yields after each block (see :meth:`JobContext.run_sliced_on_loop`)."""
        ram = self.service.ram
        missing = 0
        for index, image_block in enumerate(info.blocks):
            missing += index not in self.direct and image_block.id not in ram
            yield
        count, lim = len(ram) + ram.pending, self.service.limits.max_blocks
        if count + missing > lim:
            raise limit("max-blocks", lim, f"{count} blocks exist, the image adds {missing}")
        for index, image_block in enumerate(info.blocks):
            yield
            if index in self.direct:
                continue
            desc = image_block.desc
            try:
                block = ram.changeable(desc.id)
            except DeviceNotFound:
                check_add_limits(self.service, _add_args(desc))
                continue
            check_not_sealed(block)
            _, new = ram.check_resize(desc.id, desc.size)
            if new != block.size:
                self.service.attachments.refuse_change(block, "resize")
            if new != desc.size:
                raise RamdError(
                    f"Cannot load RAM block '{desc.id}': size 0x{desc.size:x} is not a"
                    f" multiple of its page size 0x{block.page_size:x}"
                )
            grow = new - block.size
            if grow > 0:
                check_grow(self.service, block, grow)
            holders = ram.holders.count(block, "mapper") + block.leases
            if grow < 0 and holders:
                raise RamdError(
                    f"Cannot load RAM block '{desc.id}': it would shrink while {holders}"
                    " process(es) hold it"
                )

    def create_direct(self, info: ImageInfo) -> Generator[None, None, None]:
        """Before verification: check the whole image, then create the missing blocks that
        are not persistent (uncommitted: invisible, and aborted if the load fails), so the
        verification pass can load them. A ``file`` block is created only after
        verification: its metadata is on disk from creation, and a crash must not leave a
        block holding an image that was never verified. A generator, as :meth:`check`."""
        yield from self.check(info)
        ram = self.service.ram
        for index, image_block in enumerate(info.blocks):
            yield
            desc = image_block.desc
            if desc.id not in ram and desc.backend != "file":
                # the pass writes every data page, which allocates it: no fallocate first
                block = create_block(self.service, _add_args(desc), allocate=False)
                self.created.append(block)
                self.targets[index] = block
                self.direct.add(index)

    def prepare(self, info: ImageInfo) -> Generator[None, None, None]:
        """After verification: check the other blocks again (the loop ran other commands
        since), then resize present blocks and pin them, and create missing ones
        (uncommitted until :meth:`commit`). A failure here (the kernel refusing memory)
        leaves the blocks already resized as they are; the created ones are aborted by
        :meth:`release`. A generator, as :meth:`check`."""
        yield from self.check(info)
        ram = self.service.ram
        for index, image_block in enumerate(info.blocks):
            yield
            if index in self.direct:
                continue
            desc = image_block.desc
            if desc.id in ram:
                block = ram.get(desc.id)
                resized = change.resize(
                    ram,
                    desc.id,
                    desc.size,
                    check_grow=lambda block, grow: check_grow(self.service, block, grow),
                )
                if not isinstance(resized, RAMBlock):
                    raise RuntimeError("a load's resize returned an awaitable")
                self.pins.append(block.pins.take(LOADING))
            else:
                block = create_block(self.service, _add_args(desc))
                self.created.append(block)
            self.targets[index] = block

    def commit(self) -> Generator[None, None, None]:
        """Make the created blocks visible in image order (``RAM_BLOCK_ADDED``; a ``memfd``
        one goes to the fd store), pinned for the rest of the load. A generator, as
        :meth:`check`."""
        ram = self.service.ram
        created = {id(block) for block in self.created}
        for index in sorted(self.targets):
            yield
            block = self.targets[index]
            if id(block) in created:
                ram.commit(block)
                fdstore.push(block)
                self.pins.append(block.pins.take(LOADING))
        self.created.clear()

    def second_pass_bytes(self, info: ImageInfo) -> int:
        """Block bytes the load pass (after verification) copies."""
        return sum(b.size for i, b in enumerate(info.blocks) if i not in self.direct)

    def abort_created(self) -> Generator[None, None, None]:
        """Abort the blocks created and not committed, one per step (as :meth:`check`)."""
        while self.created:
            self.service.ram.abort(self.created.pop())
            yield

    def release(self, job: Job) -> None:
        """``on_finish``: abort blocks created and never committed, unpin, close the fd."""
        ram = self.service.ram
        for block in self.created:
            ram.abort(block)
        self.created.clear()
        for pin in self.pins:
            pin.release()
        self.pins.clear()
        os.close(self.fd)


def _add_args(desc: BlockDescriptor) -> m.RamBlockAddArgs:
    """The ``ram-block-add`` arguments that re-create an image's block."""
    params: dict[str, object] = {"id": desc.id, "size": desc.size, "backend": desc.backend}
    if desc.resizable:
        params["max-size"] = desc.max_size
    for name in SETTINGS:
        value = desc.settings.get(name)
        if value is not None:
            params[name] = value
    try:
        return m.RamBlockAddArgs.model_validate(params)
    except ValueError:
        raise RamdError(f"Bad image: block '{desc.id}' has invalid settings") from None


@command("ram-load", m.RamLoadArgs, m.JobStarted, audit=True)
def ram_load(session: Session, args: m.RamLoadArgs) -> m.JobStarted:
    """Start a job that loads an image, as QEMU's incoming migration: the whole image is
    verified and checked first, and nothing changes if that fails; then missing blocks are
    created, resizable ones resized to the image's size, and their contents replaced."""
    service = session.service
    source = args.source
    if isinstance(source, m.FileTarget):
        fd = open_image(state_dir_fd(service), source.file)
    else:
        fd = _session_fd(session, source.fd)
    state = _Load(service, fd)

    def write(index: int, offset: int, data: memoryview) -> None:
        access.write_from(state.targets[index], offset, data)

    def zero(index: int, offset: int, length: int) -> None:
        access.zero(state.targets[index], offset, length)

    def work(ctx: JobContext) -> None:
        try:
            load_image(ctx, read_info(fd, service.limits.max_blocks))
        except BaseException:
            with contextlib.suppress(RuntimeError):  # no loop any more: release() won't run
                ctx.run_sliced_on_loop(state.abort_created())
            raise

    def load_image(ctx: JobContext, info: ImageInfo) -> None:
        ctx.check_cancelled()
        ctx.run_sliced_on_loop(state.create_direct(info))
        ctx.set_total(info.data_bytes + state.second_pass_bytes(info))
        fill_created()
        verify_data(
            fd,
            info,
            write=write,
            zero=zero,
            direct=state.direct,
            progress=ctx.advance,
            cancelled=ctx.cancelled,
        )
        ctx.check_cancelled()
        ctx.run_sliced_on_loop(state.prepare(info))
        fill_created()
        ctx.run_sliced_on_loop(state.commit())
        load(fd, info, write, zero, skip=state.direct, progress=ctx.advance)

    def fill_created() -> None:
        """Lock and preallocate the blocks created since the last call, as they ask (they
        are still invisible)."""
        while state.filled < len(state.created):
            service.ram.fill(state.created[state.filled])
            state.filled += 1

    try:
        job = job_manager(service).start("ram-load", work, on_finish=state.release)
    except BaseException:
        os.close(fd)
        raise
    return m.JobStarted(job_id=job.id)


# -- jobs --------------------------------------------------------------------------------------


def _job_info(info: object) -> m.JobInfo:
    return m.JobInfo.model_validate(info, from_attributes=True)


@command("query-jobs", m.NoArgs, m.JobInfoList, readonly=True)
def query_jobs(session: Session, args: m.NoArgs) -> m.JobInfoList:
    """Every job not dismissed, in creation order, with its byte progress and, once it
    failed or was cancelled, its error."""
    jobs = session.service.jobs
    return m.JobInfoList([_job_info(i) for i in jobs.query()] if jobs is not None else [])


def _manager(session: Session) -> JobManager:
    jobs = session.service.jobs
    if jobs is None:
        raise RamdError("Job not found")
    return jobs


@command("job-cancel", m.JobIdArgs, m.Empty, audit=True)
def job_cancel(session: Session, args: m.JobIdArgs) -> m.Empty:
    """Ask a job to stop: a save removes its file; a load stops only before its first block
    changed (then nothing changed), else it completes."""
    _manager(session).cancel(args.id)
    return m.Empty()


@command("job-dismiss", m.JobIdArgs, m.Empty, audit=True)
def job_dismiss(session: Session, args: m.JobIdArgs) -> m.Empty:
    """Forget a concluded job (it goes to status null and leaves ``query-jobs``)."""
    _manager(session).dismiss(args.id)
    return m.Empty()
