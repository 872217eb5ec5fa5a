"""Write an image: blocks' contents from a callable, to a regular file, holes for zero pages.

:func:`write_image` runs in whichever thread calls it (in the daemon, a job's worker thread)
and calls ``read``, ``progress`` and ``cancelled`` in that same thread, in block order and
offset order. It never touches block memory itself: ``read`` does, and the caller must keep
every block's size fixed (pinned) until it returns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import replace

from ramd.snapshot.callbacks import CancelledFn, ProgressFn, never_cancelled, no_progress
from ramd.snapshot.fileio import IO_SIZE, check_regular, pwrite_all, strerror
from ramd.snapshot.format import (
    ALIGN,
    CHUNK_SIZE,
    BlockDescriptor,
    BlockHasher,
    ImageBlock,
    ImageCancelled,
    ImageError,
    ImageInfo,
    chunk_digest,
    finish,
    layout,
    zero_chunk_digest,
)
from ramd.snapshot.scan import scan

#: ``read(block_index, offset, buf)``: fill all of ``buf`` with the bytes of block
#: ``block_index`` at ``offset`` (within its size), e.g. ``ctypes.memmove`` from the block's
#: mapping or ``os.preadv`` on its fd. The writer owns ``buf`` and reuses it for every chunk,
#: so no memory is allocated per chunk.
ReadFn = Callable[[int, int, memoryview], None]


def write_image(
    fd: int,
    blocks: Sequence[BlockDescriptor],
    read: ReadFn,
    *,
    progress: ProgressFn = no_progress,
    cancelled: CancelledFn = never_cancelled,
    chunk_size: int = CHUNK_SIZE,
) -> ImageInfo:
    """Write an image of ``blocks`` to ``fd``, a regular file open for writing (not append).

    The file's previous contents are discarded first. Block data is written first, the header
    and table last, so a file cut short by a crash never has a valid header. Zero pages are
    never written, so they stay holes. On any failure, including :class:`ImageCancelled`
    (``cancelled()`` returned true), the file is truncated to zero length before the error
    propagates; nothing is fsynced here (the atomic target does that).

    Raises :class:`ImageError` for a bad descriptor or a failed write; an exception from
    ``read`` propagates as it is.
    """
    st = check_regular(fd, writing=True)
    info, table_length = layout(blocks, chunk_size)
    try:
        if st.st_size:
            # Only when needed: on ext4, a truncate to zero makes the next close() start the
            # writeback of the whole file (auto_da_alloc), which would double a save's time.
            _truncate(fd, 0)
        _truncate(fd, info.file_length)
        done = []
        buf = bytearray(max(IO_SIZE, chunk_size))  # a multiple of chunk_size: powers of two
        for index, block in enumerate(info.blocks):
            digest = _write_block(fd, index, block, read, buf, chunk_size, progress, cancelled)
            done.append(replace(block, digest=digest))
        if cancelled():
            raise ImageCancelled()
        info, meta = finish(replace(info, blocks=tuple(done)), table_length)
        _pwrite(fd, meta, 0)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        raise
    return info


def _truncate(fd: int, length: int) -> None:
    try:
        os.ftruncate(fd, length)
    except OSError as e:
        raise ImageError(f"Cannot write image: {strerror(e)}") from None


def _pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    try:
        pwrite_all(fd, data, offset)
    except OSError as e:
        raise ImageError(f"Cannot write image: {strerror(e)}") from None


def _write_block(
    fd: int,
    index: int,
    block: ImageBlock,
    read: ReadFn,
    data: bytearray,
    chunk_size: int,
    progress: ProgressFn,
    cancelled: CancelledFn,
) -> bytes:
    """Write one block's used range, a buffer of ``data`` at a time; returns its digest."""
    hasher = BlockHasher()
    view = memoryview(data)
    pos = 0
    while pos < block.size:
        if cancelled():
            raise ImageCancelled()
        n = min(len(data), block.size - pos)
        read(index, pos, view[:n])
        found = scan(data, n, chunk_size, ALIGN)
        for i, is_zero in enumerate(found.zero_chunks):
            c = i * chunk_size
            clen = min(chunk_size, n - c)
            hasher.add(zero_chunk_digest(clen) if is_zero else chunk_digest(view[c : c + clen]))
        for start, end, is_zero in found.segments:
            if not is_zero:
                _pwrite(fd, view[start:end], block.offset + pos + start)
        progress(n)
        pos += n
    return hasher.digest()
