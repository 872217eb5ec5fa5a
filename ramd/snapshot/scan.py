"""Find the all-zero parts of a buffer of block data, with ``memcmp`` and no allocation.

A zero check is ``bytearray.startswith(zeros, offset)``: one C ``memcmp`` that stops at the
first non-zero byte, so random data costs almost nothing and zero data runs at memory speed
(a ``memoryview`` comparison is element by element in CPython: about 60 times slower).
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


def scan(buf: bytearray, length: int, chunk: int, min_zero: int | None) -> Scan:
    """Scan ``buf[:length]`` by chunks of ``chunk`` bytes and, unless ``min_zero`` is None,
    the non-zero chunks by pages of ``ALIGN`` bytes.

    ``length`` is a multiple of ``ALIGN``; ``chunk`` and ``min_zero`` are multiples of it.
    """
    blank = memoryview(zeros(chunk))
    page = zeros(ALIGN)
    flags: list[bool] = []
    segments: list[tuple[int, int, bool]] = []
    data_start = 0  # start of the data segment being built (if data_start < zero_start)
    zero_start = -1  # start of the current run of zero pages, or -1

    min_run = min_zero or 0

    def data_page(p: int) -> None:
        nonlocal data_start, zero_start
        if zero_start >= 0:
            if p - zero_start >= min_run:
                if data_start < zero_start:
                    segments.append((data_start, zero_start, False))
                segments.append((zero_start, p, True))
                data_start = p
            zero_start = -1

    for c in range(0, length, chunk):
        clen = min(chunk, length - c)
        is_zero = buf.startswith(blank[:clen], c)
        flags.append(is_zero)
        if min_zero is None:
            continue
        if is_zero:
            if zero_start < 0:
                zero_start = c
            continue
        for p in range(c, c + clen, ALIGN):
            if buf.startswith(page, p):
                if zero_start < 0:
                    zero_start = p
            else:
                data_page(p)
    if min_zero is None:
        return Scan(flags, segments)
    if zero_start >= 0 and length - zero_start >= min_zero:
        if data_start < zero_start:
            segments.append((data_start, zero_start, False))
        segments.append((zero_start, length, True))
    elif data_start < length:
        segments.append((data_start, length, False))
    return Scan(flags, segments)
