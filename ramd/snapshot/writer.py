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
    zeros,
)

#: ``read(block_index, offset, length)``: ``length`` bytes of block ``block_index`` at
#: ``offset`` (within its size). ``bytes`` or ``bytearray``: the writer finds zero pages with
#: their ``startswith`` (a ``memcmp``); a ``memoryview`` has no fast comparison in CPython.
ReadFn = Callable[[int, int, int], bytes | bytearray]


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

    Raises :class:`ImageError` for a bad descriptor, a short ``read`` or a failed write.
    """
    check_regular(fd, writing=True)
    info, table_length = layout(blocks, chunk_size)
    try:
        _truncate(fd, 0)
        _truncate(fd, info.file_length)
        done = []
        for index, block in enumerate(info.blocks):
            digest = _write_block(fd, index, block, read, chunk_size, progress, cancelled)
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
    chunk_size: int,
    progress: ProgressFn,
    cancelled: CancelledFn,
) -> bytes:
    """Write one block's used range; returns its digest."""
    hasher = BlockHasher()
    io_size = max(IO_SIZE, chunk_size)  # a multiple of chunk_size: both are powers of two
    page = zeros(ALIGN)
    pos = 0
    while pos < block.size:
        if cancelled():
            raise ImageCancelled()
        n = min(io_size, block.size - pos)
        data = read(index, pos, n)
        if not isinstance(data, bytes | bytearray) or len(data) != n:
            raise ImageError(f"Cannot read block '{block.id}' at 0x{pos:x}")
        view = memoryview(data)
        run_start = run_end = 0  # the pending run of non-zero pages, [run_start, run_end)
        for c in range(0, n, chunk_size):
            clen = min(chunk_size, n - c)
            if data.startswith(zeros(clen), c):
                hasher.add(zero_chunk_digest(clen))
                continue
            hasher.add(chunk_digest(view[c : c + clen]))
            for p in range(c, c + clen, ALIGN):
                if data.startswith(page, p):
                    continue
                if p != run_end:
                    if run_end > run_start:
                        _pwrite(fd, view[run_start:run_end], block.offset + pos + run_start)
                    run_start = p
                run_end = p + ALIGN
        if run_end > run_start:
            _pwrite(fd, view[run_start:run_end], block.offset + pos + run_start)
        progress(n)
        pos += n
    return hasher.digest()
