"""Page-aligned I/O buffers.

On the AMD EPYC guests ramd is measured on, the kernel's copy to user memory (``pread``,
``preadv``) runs 3 to 4 times slower into a buffer that starts 16 bytes past a page boundary
(where CPython's allocator puts a large ``bytearray``'s data) than into a page-aligned one:
measured 0.7-0.9 GiB/s against 2.4-3.3 GiB/s reading a memfd in 8 MiB calls. So every buffer
that block data or image data is read into is an :class:`AlignedBuffer`.

Thread: an :class:`AlignedBuffer` has no lock; one thread at a time uses it (the one that
owns it, or the one it was handed to through a queue).
"""

from __future__ import annotations

import ctypes

from ramd.snapshot.format import ALIGN


class AlignedBuffer:
    """``size`` bytes whose first byte is at a multiple of 4096 in memory.

    ``raw`` is a ``bytearray`` a little larger than ``size``; the aligned bytes are
    ``raw[start : start + size]``, also exposed as ``view``. Keep using ``raw`` with ``start``
    for ``bytearray`` methods (``startswith`` is a C ``memcmp``). ``raw`` is never resized (the
    exported ``view`` forbids it), so the alignment holds for the buffer's life.
    """

    def __init__(self, size: int) -> None:
        self.raw = bytearray(size + ALIGN)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self.raw))
        self.start = -address % ALIGN
        self.size = size
        self.view = memoryview(self.raw)[self.start : self.start + size]


class BufferRing:
    """``count`` :class:`AlignedBuffer` of ``size`` bytes, handed out in turn.

    With a :class:`~ramd.snapshot.pipeline.Pipeline` of depth ``count - 1``, the buffer
    :meth:`next` returns is never one still in flight (see that module).
    """

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._buffers = [AlignedBuffer(size) for _ in range(count)]
        self._next = 0

    @property
    def depth(self) -> int:
        """The pipeline depth these buffers allow."""
        return len(self._buffers) - 1

    def next(self) -> AlignedBuffer:
        buf = self._buffers[self._next]
        self._next = (self._next + 1) % len(self._buffers)
        return buf


def ring_for(chunk_size: int, io_size: int, count: int) -> BufferRing:
    """The buffers of one image operation: ``count`` of ``max(io_size, chunk_size)`` bytes,
    but only 2 when a chunk is larger than ``io_size`` (an image may ask for 64 MiB chunks),
    so an operation holds at most ``max(count * io_size, 2 * chunk_size)`` bytes."""
    size = max(io_size, chunk_size)
    return BufferRing(size, count if size == io_size else 2)
