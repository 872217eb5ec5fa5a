"""The ram_addr space: where each block's ``[offset, offset+max_size)`` lives.

After QEMU's ``find_ram_offset``: a new range goes into the smallest gap left by removed
blocks that fits it, else after the last block. Free gaps are kept explicitly, so placing a
block costs O(number of gaps), not O(number of blocks). Owned by one :class:`RAMList`; not
thread-safe.
"""

from __future__ import annotations


class RamAddrSpace:
    """Allocator of non-overlapping ranges of the ram_addr space."""

    def __init__(self) -> None:
        self._end = 0
        self._gap_len: dict[int, int] = {}
        self._gap_start_by_end: dict[int, int] = {}

    def _add_gap(self, start: int, length: int) -> None:
        self._gap_len[start] = length
        self._gap_start_by_end[start + length] = start

    def _take_gap(self, start: int) -> int:
        length = self._gap_len.pop(start)
        del self._gap_start_by_end[start + length]
        return length

    def alloc(self, size: int) -> int:
        """Place a range of ``size`` bytes and return its offset (best fit, else the end)."""
        best: int | None = None
        for start, length in self._gap_len.items():
            if length >= size and (best is None or length < self._gap_len[best]):
                best = start
        if best is None:
            offset = self._end
            self._end += size
            return offset
        length = self._take_gap(best)
        if length > size:
            self._add_gap(best + size, length - size)
        return best

    def free(self, offset: int, size: int) -> None:
        """Give ``[offset, offset+size)`` back, merging it with neighbouring gaps."""
        start, end = offset, offset + size
        if start in self._gap_start_by_end:
            prev = self._gap_start_by_end[start]
            self._take_gap(prev)
            start = prev
        if end in self._gap_len:
            end += self._take_gap(end)
        if end == self._end:
            self._end = start
        else:
            self._add_gap(start, end - start)
