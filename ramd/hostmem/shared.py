"""Shared backends: memory that is a file other processes can map (``memfd``, ``file``).

The file's length is always the allocation's ``size``; the daemon maps ``[0, size)`` of it
``MAP_SHARED`` over its reservation. Growing extends the file, backs the new range, then
maps it; shrinking re-reserves the tail, then shortens the file (which frees its pages).
The one exception is a file a VMM maps whole (an attached virtio-mem device, protocol.md
§13): :meth:`FdMemory.span` makes it ``max_size`` long without allocating and maps all of
it, and only :meth:`FdMemory.unspan`, once no VMM maps it, shortens it again; meanwhile the
VMM allocates and frees (punches holes in) its ranges, and the daemon changes neither the
file's length nor its mapping.

Backing a grow, so that a grow the kernel cannot back fails at once with nothing changed:

- hugetlbfs (``MFD_HUGETLB``, or a ``file`` in a hugetlbfs ``memory-dir``): mapping the new
  range ``MAP_SHARED`` without ``MAP_NORESERVE`` reserves its huge pages (ENOMEM when the
  pool is short); they are allocated on first touch and never fail then.
- tmpfs / memfd: the new range is allocated with ``posix_fallocate``, so the memory exists
  when the grow returns (ENOSPC on a full tmpfs). The kernel gives no other guarantee for
  shmem: memfd files are created ``VM_NORESERVE`` (never accounted against the commit limit)
  and, when RAM runs out, allocating shmem pages wakes the OOM killer (measured in a 64 MiB
  memory cgroup: ``fallocate``, ``pwrite`` and faulting 128 MiB all end in SIGKILL of the
  allocating process, never ENOMEM). So a grow larger than ``MemAvailable + SwapFree`` is
  refused up front with ENOMEM instead of being attempted. One exception: a block created
  for a load into fresh memory (``populate(..., allocate=False)``) is not fallocated, since
  the load writes all of its data at once and ``pwrite`` allocates those pages (zeroing them
  first with ``fallocate`` and punching the zero ranges out again afterwards cost a 4 GiB
  load about as much time as the copy itself); its zero ranges stay holes, as if discarded.
  The MemAvailable check then counts the other such blocks not yet filled as taken
  (:meth:`ramd.ramblock.RAMList.create`).

The daemon never touches a shared mapping itself, because another process holding the fd
may shorten the file and the access would raise SIGBUS: reads use ``pread``, writes
``pwrite`` (hugetlbfs has no ``write``: there a copy through ``process_vm_writev`` on the
daemon's own mapping, which stops at a missing page instead of raising SIGBUS), and both
check lengths (:class:`~ramd.hostmem.backend.BackingTruncated`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

from ramd.hostmem import linux
from ramd.hostmem.backend import BackingTruncated, HostMemory
from ramd.hostmem.blockmeta import BlockMeta, remove_meta, temp_name, write_meta
from ramd.hostmem.grants import UidGrants
from ramd.hostmem.mmap_alloc import mmap_populate, mmap_reserve

log = logging.getLogger(__name__)


class FdMemory(HostMemory):
    """Memory backed by a file mapped ``MAP_SHARED``; the fd is owned by this object.

    The file is made mode 0600 with no ACL entries here; :attr:`grants` then gives the
    other uids that hold the block access matching their fds (:mod:`.grants`).
    """

    shared = True
    private = False

    def __init__(self, fd: int, path: str | None, name: str) -> None:
        super().__init__(fd, path)
        #: Access to the file for the other uids holding the block.
        self.grants = UidGrants(fd, name)

    #: Length of the file when it was adopted with its contents (an existing file, or an fd
    #: passed back from the fd store), until the first :meth:`populate` maps it; else -1.
    adopted_length = -1

    def populate(self, start: int, end: int, *, allocate: bool = True) -> None:
        if start == 0 and end == self.adopted_length:
            # an adopted file: map its contents as they are (no truncate, no fallocate)
            self.adopted_length = -1
            if self.sealed:
                _map_readonly(self.host, end, self.fd)
            else:
                mmap_populate(self.host, end, self.fd, 0)
            return
        length = end - start
        if not self.hugetlb and length > linux.mem_available():
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        os.ftruncate(self.fd, end)
        try:
            if allocate and not self.hugetlb:
                os.posix_fallocate(self.fd, start, length)
            mmap_populate(self.host + start, length, self.fd, start)
        except OSError:
            os.ftruncate(self.fd, start)
            raise

    def release(self, start: int, end: int) -> None:
        mmap_reserve(self.host + start, end - start)
        os.ftruncate(self.fd, start)

    def preallocate(self, length: int) -> None:
        if not self.sealed:  # a sealed file's pages are what they are
            os.posix_fallocate(self.fd, 0, length)

    def span(self, size: int, max_size: int) -> None:
        """Make the file ``max_size`` bytes long without allocating (the new range is a
        hole) and map ``[size, max_size)`` too, for a VMM that maps the whole file. On
        failure nothing changed."""
        os.ftruncate(self.fd, max_size)
        try:
            mmap_populate(self.host + size, max_size - size, self.fd, size)
        except OSError:
            os.ftruncate(self.fd, size)
            raise

    def unspan(self, size: int, max_size: int) -> None:
        """Undo :meth:`span` once no VMM maps the file: ``[size, max_size)`` becomes
        reserved again and the file ``size`` bytes long (which frees what lay beyond)."""
        mmap_reserve(self.host + size, max_size - size)
        os.ftruncate(self.fd, size)

    def discard(self, offset: int, length: int) -> None:
        linux.punch_hole(self.fd, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        done = 0
        while done < length:
            chunk = os.pread(self.fd, length - done, offset + done)
            if not chunk:
                raise BackingTruncated(os.fstat(self.fd).st_size)
            parts.append(chunk)
            done += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        file_size = os.fstat(self.fd).st_size
        if file_size < offset + len(data):
            raise BackingTruncated(file_size)
        if self.hugetlb:
            if linux.copy_into_own_mapping(self.host + offset, bytes(data)) < len(data):
                raise BackingTruncated(os.fstat(self.fd).st_size)
            return len(data)
        view = memoryview(data)
        done = 0
        while done < len(data):
            n = os.pwrite(self.fd, view[done:], offset + done)
            if n == 0:
                raise BackingTruncated(os.fstat(self.fd).st_size)
            done += n
        return len(data)

    def read_into(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n == 0:
                raise BackingTruncated(os.fstat(self.fd).st_size)
            done += n

    def write_from(self, offset: int, data: memoryview) -> None:
        self.write(offset, data)

    def resident(self, length: int) -> int:
        return min(os.fstat(self.fd).st_blocks * 512, length)


class MemfdMemory(FdMemory):
    """An anonymous ``memfd_create`` file (``MFD_HUGETLB``: default-size huge pages)."""

    kind = "memfd"
    persistent = False

    def __init__(self, name: str, *, hugetlb: bool = False, fd: int = -1) -> None:
        """A new memfd named ``name`` (sealable); or, with ``fd`` (taken over: closed on
        failure too), an existing one whose contents the block adopts (its length is its
        size; sealed if it was)."""
        if fd < 0:
            fd = linux.memfd_create(name, hugetlb=hugetlb)
        try:
            super().__init__(fd, None, name)
            if hugetlb != self.hugetlb:
                raise OSError(errno.EINVAL, "hugetlb does not match the memfd")
        except BaseException:
            os.close(fd)
            raise
        self.sealed = linux.write_sealed(fd)

    def seal(self, size: int) -> None:
        """Make the memfd a template: its contents and its length (``size``, mapped at
        ``host``) never change again. The daemon's own view is first mapped again read-only
        from an ``O_RDONLY`` fd (a read-only mapping made from a writable fd still counts
        as writable for ``F_SEAL_WRITE``), then the seals are added. On failure (``OSError``
        EBUSY: another process maps it writable; EPERM: not sealable) the view is writable
        again and nothing changed. Sealing a sealed memfd does nothing."""
        if self.sealed:
            return
        try:
            _map_readonly(self.host, size, self.fd)
            linux.add_template_seals(self.fd)
        except OSError:
            mmap_populate(self.host, size, self.fd, 0)
            raise
        self.sealed = True


class FileMemory(FdMemory):
    """A file named ``name`` in a memory directory (tmpfs, or hugetlbfs for huge pages).

    A new file is created under the temporary name ``.NAME.new`` (:func:`.blockmeta.temp_name`,
    ``O_EXCL``; an existing ``NAME`` is never touched: ``FileExistsError``) and gets its final
    name only once its metadata is in place: :meth:`keep` writes ``NAME.meta``, then renames
    the file to ``NAME`` (``RENAME_NOREPLACE``: never over an existing entry). A crash
    before that leaves only names the daemon removes at its next start
    (:func:`ramd.process.adoption.adopt_memory_dir`), or at worst a ``NAME.meta`` without its file,
    which the next block of that name replaces; so an id is never blocked by a half-created
    file. hugetlbfs takes no metadata (its files cannot be written): there the file gets its
    name once its first :meth:`populate` reserved its huge pages. With ``existing``, a file
    left by an earlier daemon is opened to be adopted with its contents
    (:attr:`adopted_length`).

    Once :meth:`keep` gave it its metadata, every size change rewrites ``name.meta`` in the
    order of :mod:`.blockmeta` (the metadata's size never exceeds the file's length).
    """

    kind = "file"
    persistent = True

    def __init__(self, dir_fd: int, dir_path: str, name: str, *, existing: bool = False) -> None:
        if existing:
            flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(name, flags, dir_fd=dir_fd)
            current = name
        else:
            fd = _create_temporary(dir_fd, name)
            current = temp_name(name)
        self._dir_fd = os.dup(dir_fd)
        self._id = name
        #: The file's name in the directory now: the temporary one until it is published.
        self._name = current
        self._wrote_meta = False
        self.meta: BlockMeta | None = None
        try:
            if existing:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EINVAL, "not a regular file")
                self.adopted_length = st.st_size
            super().__init__(fd, os.path.join(dir_path, name), name)
        except BaseException:
            if existing:
                os.close(self._dir_fd)
                self._dir_fd = -1
            else:
                self.unlink()
            os.close(fd)
            raise

    def keep(self, meta: BlockMeta) -> None:
        """Write the block's metadata beside its file, then give a new file its final name
        (``OSError``: the file keeps its temporary name) and keep the metadata current from
        now on."""
        write_meta(self._dir_fd, meta)
        self._wrote_meta = True
        self._publish()
        self.meta = meta

    def _publish(self) -> None:
        """Give the file its final name, if it does not have it yet."""
        if self._name == self._id:
            return
        linux.rename_noreplace(self._dir_fd, self._name, self._id)
        self._name = self._id
        os.fsync(self._dir_fd)

    def populate(self, start: int, end: int, *, allocate: bool = True) -> None:
        super().populate(start, end, allocate=allocate)
        if self.meta is None:
            if self.hugetlb:
                try:
                    self._publish()
                except OSError:
                    super().release(start, end)
                    raise
            return
        try:
            self.keep(self.meta.with_size(end))
        except OSError:
            mmap_reserve(self.host + start, end - start)
            os.ftruncate(self.fd, start)
            raise

    def span(self, size: int, max_size: int) -> None:
        """:meth:`FdMemory.span`, with the metadata's size the file's new length: a daemon
        restarted while a VMM maps the file adopts all of it and never shortens it."""
        super().span(size, max_size)
        if self.meta is None:
            return
        try:
            self.keep(self.meta.with_size(max_size))
        except OSError:
            super().unspan(size, max_size)
            raise

    def unspan(self, size: int, max_size: int) -> None:
        if self.meta is not None:
            try:
                self.keep(self.meta.with_size(size))
            except OSError as e:
                log.warning("%s: metadata not updated, file not shortened: %s", self.path, e)
                mmap_reserve(self.host + size, max_size - size)
                return
        super().unspan(size, max_size)

    def release(self, start: int, end: int) -> None:
        if self.meta is not None:
            try:
                self.keep(self.meta.with_size(start))
            except OSError as e:
                # The file keeps its length, so the metadata (the old size) still fits it.
                log.warning("%s: metadata not updated, file not shortened: %s", self.path, e)
                mmap_reserve(self.host + start, end - start)
                return
        super().release(start, end)

    def unlink(self) -> None:
        """Remove the file, then the metadata written for it (a crash between leaves
        metadata without a file: logged at the next start, and replaced by the next block of
        that name)."""
        if self._dir_fd >= 0:
            os.unlink(self._name, dir_fd=self._dir_fd)
            if self._wrote_meta:
                remove_meta(self._dir_fd, self._id)
            os.close(self._dir_fd)
            self._dir_fd = -1

    def free(self) -> None:
        super().free()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


def _create_temporary(dir_fd: int, name: str) -> int:
    """Create the new block file ``name`` under its temporary name; its fd.

    ``FileExistsError`` when ``name`` exists (never touched). A temporary file of that name
    left by a crash is the daemon's own (the directory is locked): it is replaced.
    """
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), name)
    tmp = temp_name(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(tmp, flags, 0o600, dir_fd=dir_fd)


def _map_readonly(addr: int, size: int, fd: int) -> None:
    """Map ``[0, size)`` of ``fd`` shared and read-only at ``addr`` from a new ``O_RDONLY``
    fd of the same file (closed again: the mapping keeps the file)."""
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        mmap_populate(addr, size, ro, 0, readonly=True)
    finally:
        os.close(ro)


def open_memory_dir(path: str) -> int:
    """Open the memory directory ``path``, creating it mode 0700 when missing.

    Refused (``OSError``): a symlink (``O_NOFOLLOW``) or anything but a directory, and a
    directory owned by another user or writable by group or others, where someone else
    could plant or replace block files. Returns a close-on-exec fd of the directory: files
    are created and removed relative to it, so renaming the path later cannot redirect them.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise OSError(
            errno.EPERM,
            f"not owned by uid {os.geteuid()} or writable by others"
            f" (owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})",
        )
    return fd


__all__ = ["FdMemory", "FileMemory", "MemfdMemory", "open_memory_dir"]
