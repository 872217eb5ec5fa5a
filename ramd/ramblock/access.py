"""Access to block memory, always bounds-checked against the block's used range.

Two kinds of callers:

- commands on the loop thread (:func:`read`, :func:`write`, :func:`discard`), by block id:
  ``write`` and ``discard`` change the block, so they refuse while it is pinned ("busy")
  or sealed;
- bulk transfers (images) in a worker thread (:func:`read_into`, :func:`write_from`,
  :func:`zero`), on a block whose pin the caller holds, so its size cannot change meanwhile.

Every access goes through the block's backend (:class:`~ramd.hostmem.backend.HostMemory`):
a shared block is read and written with ``pread``/``pwrite`` on its fd, so a file that
another process shortened is an error here, never ``SIGBUS``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ramd.errors import RamdError
from ramd.hostmem import libc
from ramd.hostmem.backend import BackingTruncated
from ramd.ramblock.block import RAMBlock
from ramd.ramblock.seal import check_not_sealed

if TYPE_CHECKING:
    from ramd.ramblock.registry import RAMList


def check_range(block: RAMBlock, offset: int, length: int) -> None:
    """Refuse a range that is not inside ``[0, size)`` of ``block``."""
    if offset < 0 or length < 0 or offset + length > block.size:
        raise RamdError(
            f"Range out of bounds: {block.id}: offset 0x{max(offset, 0):x} length"
            f" 0x{max(length, 0):x} exceeds size 0x{block.size:x}"
        )


def read(ram: RAMList, block_id: str, offset: int, length: int) -> bytes:
    """Copy ``length`` bytes at ``offset`` out of the block's used range."""
    block = ram.get(block_id)
    check_range(block, offset, length)
    try:
        return block.mem.read(offset, length)
    except BackingTruncated as e:
        raise RamdError(_truncated("read", block, e)) from None
    except OSError as e:
        raise RamdError(f"Cannot read RAM block '{block.id}': {_strerror(e)}") from None


def write(ram: RAMList, block_id: str, offset: int, data: bytes) -> int:
    """Copy ``data`` into the block's used range at ``offset``; returns its length."""
    block = ram.changeable(block_id)
    check_not_sealed(block)
    check_range(block, offset, len(data))
    try:
        return block.mem.write(offset, data)
    except BackingTruncated as e:
        raise RamdError(_truncated("write", block, e)) from None
    except OSError as e:
        raise RamdError(f"Cannot write RAM block '{block.id}': {_strerror(e)}") from None


def discard(ram: RAMList, block_id: str, offset: int, length: int) -> None:
    """Free the memory of a page-aligned range (QEMU's ``ram_block_discard_range``):
    ``MADV_DONTNEED`` for anonymous memory, a punched hole in a shared block's file.

    The range reads back as zeros and its memory is released at once (for a locked block,
    the range is locked again afterwards, which faults in fresh zero pages).
    """
    drop_range(check_discard(ram, block_id, offset, length), offset, length)


def check_discard(ram: RAMList, block_id: str, offset: int, length: int) -> RAMBlock:
    """The block whose ``[offset, offset+length)`` may be discarded now, or the refusal."""
    block = ram.changeable(block_id)
    check_not_sealed(block)
    if offset % block.page_size or length % block.page_size:
        raise RamdError(
            f"Unaligned discard range: {block.id}: offset 0x{offset:x} length 0x{length:x}"
            f" must be multiples of the page size 0x{block.page_size:x}"
        )
    check_range(block, offset, length)
    return block


def drop_range(block: RAMBlock, offset: int, length: int) -> None:
    """Discard a range :func:`check_discard` allowed. Its cost grows with ``length`` for a
    locked block (the range is faulted in again): a worker thread may run it while the
    caller holds the block's pin."""
    if length == 0:
        return
    addr = block.host + offset
    try:
        if block.lock:
            # Locked pages refuse MADV_DONTNEED: unlock, drop, and lock the (now zero)
            # range again, so the block stays locked as its settings ask.
            libc.munlock(addr, length)
        block.mem.discard(offset, length)
        if block.lock:
            libc.mlock(addr, length)
    except OSError as e:
        raise RamdError(f"Cannot discard range of {block.id}: {_strerror(e)}") from None


def read_into(block: RAMBlock, offset: int, buf: memoryview) -> None:
    """Fill ``buf`` from ``block`` at ``offset`` (worker thread; the caller holds a pin)."""
    check_range(block, offset, len(buf))
    try:
        block.mem.read_into(offset, buf)
    except BackingTruncated as e:
        raise RamdError(_truncated("read", block, e)) from None


def write_from(block: RAMBlock, offset: int, data: memoryview) -> None:
    """Store ``data`` at ``offset`` of ``block`` (worker thread; the caller holds a pin or
    the block is not committed yet)."""
    check_range(block, offset, len(data))
    try:
        block.mem.write_from(offset, data)
    except BackingTruncated as e:
        raise RamdError(_truncated("write", block, e)) from None


def zero(block: RAMBlock, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` of ``block`` read as zeros (as :func:`write_from`)."""
    check_range(block, offset, length)
    try:
        block.mem.zero(offset, length, locked=block.lock)
    except BackingTruncated as e:
        raise RamdError(_truncated("write", block, e)) from None


def _strerror(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _truncated(what: str, block: RAMBlock, e: BackingTruncated) -> str:
    return (
        f"Cannot {what} RAM block '{block.id}': its file is 0x{e.file_size:x} bytes, shorter"
        f" than its size 0x{block.size:x} (changed by another process)"
    )
