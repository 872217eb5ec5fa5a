"""Find the all-zero parts of a buffer of block data with ``memcmp``, never copying it.

A zero check is ``bytearray.startswith(zeros, offset)``: one C ``memcmp`` that stops at the
first non-zero byte, so random data costs almost nothing and zero data runs at memory speed
(a ``memoryview`` comparison is element by element in CPython: about 60 times slower). Inside
a chunk that is not all zero, only a page whose first byte is zero can be a zero page: one
strided slice gives every page's first byte, so dense data costs no per-page Python work.
"""

from __future__ import annotations

from dataclasses import dataclass

from ramd.snapshot.format import ALIGN, zeros


@dataclass(frozen=True)
class Scan:
    """The zero structure of ``buf[:length]``.

    ``zero_chunks[i]`` tells whether chunk ``i`` is all zero. ``segments`` (empty if not
    asked for) cover ``[0, length)`` in order without gaps: ``(start, end, is_zero)``, where
    a zero segment is a run of all-zero pages at least ``min_zero`` long (shorter runs are
    part of data segments).
    """

    zero_chunks: list[bool]
    segments: list[tuple[int, int, bool]]


def scan(buf: bytearray, length: int, chunk: int, min_zero: int | None, start: int = 0) -> Scan:
    """Scan ``buf[start : start + length]`` by chunks of ``chunk`` bytes and, unless
    ``min_zero`` is None, the non-zero chunks by pages of ``ALIGN`` bytes. Offsets in the
    result are relative to ``start`` (an :class:`~ramd.snapshot.buffer.AlignedBuffer`'s).

    ``length`` is a multiple of ``ALIGN``; ``chunk`` and ``min_zero`` are multiples of it.
    """
    blank = memoryview(zeros(chunk))
    page = zeros(ALIGN)
    flags: list[bool] = []
    runs = _Runs(min_zero or 0)
    for c in range(0, length, chunk):
        clen = min(chunk, length - c)
        is_zero = buf.startswith(blank[:clen], start + c)
        flags.append(is_zero)
        if min_zero is None:
            continue
        if is_zero:
            runs.zero(c, c + clen)
            continue
        # Only a page whose first byte is zero can be all zero: find those in one C call.
        firsts = buf[start + c : start + c + clen : ALIGN]
        i = firsts.find(0)
        while i >= 0:
            p = c + i * ALIGN
            if buf.startswith(page, start + p):
                runs.zero(p, p + ALIGN)
            i = firsts.find(0, i + 1)
    return Scan(flags, runs.finish(length) if min_zero is not None else [])


class _Runs:
    """Builds the segments from the zero ranges found, in order."""

    def __init__(self, min_zero: int) -> None:
        self._min = min_zero
        self.segments: list[tuple[int, int, bool]] = []
        self._data_start = 0  # start of the data segment being built
        self._zero_start = self._zero_end = -1  # the current run of zero pages

    def zero(self, start: int, end: int) -> None:
        """``[start, end)`` is all zero; everything between the last zero range and it is data."""
        if start == self._zero_end:
            self._zero_end = end
            return
        self._close()
        self._zero_start, self._zero_end = start, end

    def finish(self, length: int) -> list[tuple[int, int, bool]]:
        self._close()
        if self._data_start < length:
            self.segments.append((self._data_start, length, False))
        return self.segments

    def _close(self) -> None:
        """End the current zero run: a segment of its own if long enough, else data."""
        if self._zero_end - self._zero_start >= max(self._min, 1):
            if self._data_start < self._zero_start:
                self.segments.append((self._data_start, self._zero_start, False))
            self.segments.append((self._zero_start, self._zero_end, True))
            self._data_start = self._zero_end
        self._zero_start = self._zero_end = -1
