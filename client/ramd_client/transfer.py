"""Reads and writes of any length, split into chunks the daemon accepts, pipelined.

One ``ram-block-read``/``ram-block-write`` moves at most the daemon's ``io-chunk`` bytes, and
a write's base64 text (4 bytes per 3) must fit in its ``max-message-size``, as must a read's
answer in the client's own message bound. :func:`chunk_size` picks the largest chunk under
all three; :func:`read_range` and :func:`write_range` keep ``window`` chunk requests in
flight on one connection, so the memory held is about ``window`` chunks whatever the length.

Memory: the first transfer fixes glibc's ``malloc`` thresholds for the whole process as the
daemon does (:func:`ramd.process.heap.keep_large_buffers`: buffers up to 32 MiB come from the heap
and
are reused, instead of being mapped afresh, and faulted in page by page, for every chunk), and
each transfer hands the heap's free pages back to the kernel when it ends
(:func:`ramd.process.heap.trim`).

All functions run on the caller side.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
)

from ramd.process import heap
from ramd_client.client import AsyncClient

__all__ = ["WINDOW", "chunk_size", "read_range", "write_range"]

#: Chunk requests in flight by default.
WINDOW = 4
#: Room left in a message for everything but the base64 data (the JSON-RPC envelope, the
#: block id of up to 64 characters, a 20-digit offset).
ENVELOPE = 1024
_ALIGN = 64 * 1024

Progress = Callable[[int], None]


def _base64_fit(message_size: int) -> int:
    """The most bytes whose base64 text fits in a message of ``message_size`` bytes."""
    return max(message_size - ENVELOPE, 4) // 4 * 3


def chunk_size(limits: Mapping[str, int], max_message_size: int) -> int:
    """The chunk for transfers with a daemon of ``limits`` (``query-stats``'s) and a client
    accepting messages of ``max_message_size`` bytes.

    The smallest of ``io-chunk`` and what base64 lets through both ways, rounded down to a
    multiple of 64 KiB when that large (whole pages, and a multiple of 3: no base64 padding).
    """
    io_chunk = limits.get("io-chunk", 4 << 20)
    peer_message = limits.get("max-message-size", 8 << 20)
    size = min(io_chunk, _base64_fit(peer_message), _base64_fit(max_message_size))
    if size >= 3 * _ALIGN:
        size -= size % (3 * _ALIGN)
    return max(size, 1)


async def transfer_chunk(client: AsyncClient) -> int:
    """:func:`chunk_size` for ``client``'s daemon (asks ``query-stats``)."""
    stats = await client.query_stats()
    return chunk_size(stats.limits, client.max_message_size)


_heap_kept = False


def _keep_large_buffers() -> None:
    """Fix the process's malloc thresholds, once (see the module docstring)."""
    global _heap_kept
    if not _heap_kept:
        heap.keep_large_buffers()
        _heap_kept = True


async def _drain(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel ``tasks`` and wait for them, swallowing their outcome."""
    pending = list(tasks)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(BaseException):
            await task


async def read_range(
    client: AsyncClient,
    block_id: str,
    offset: int,
    length: int,
    *,
    chunk: int | None = None,
    window: int = WINDOW,
) -> AsyncGenerator[bytes, None]:
    """Yield the bytes of ``[offset, offset + length)`` of block ``block_id``, in order, one
    chunk at a time, with ``window`` chunk reads in flight.

    ``chunk`` defaults to :func:`transfer_chunk`. The first refusal of the daemon is raised
    (:class:`~ramd_client.error.RamdError`); reads still in flight are then abandoned.
    """
    if chunk is None:
        chunk = await transfer_chunk(client)
    if chunk < 1 or window < 1:
        raise ValueError("chunk and window must be positive")
    end = offset + length
    position = offset
    inflight: deque[asyncio.Task[bytes]] = deque()
    _keep_large_buffers()
    try:
        while position < end or inflight:
            while position < end and len(inflight) < window:
                n = min(chunk, end - position)
                inflight.append(asyncio.ensure_future(client.ram_block_read(block_id, position, n)))
                position += n
            yield await inflight.popleft()
    finally:
        await _drain(inflight)
        heap.trim()


async def _rechunk(
    source: AsyncIterable[bytes] | Iterable[bytes], chunk: int
) -> AsyncGenerator[bytes | memoryview, None]:
    """``source``'s bytes again, in pieces of exactly ``chunk`` bytes (the last shorter).

    Whole chunks of a ``bytes`` piece are views of it, not copies (it cannot change); other
    pieces are copied first, so a source may reuse (and resize) its buffer once the next
    piece is asked for. At most one partial chunk is held here.
    """
    buffer = bytearray()

    async def pieces() -> AsyncIterator[bytes]:
        if isinstance(source, AsyncIterable):
            async for piece in source:
                yield piece
        else:
            for piece in source:
                yield piece

    async for piece in pieces():
        view = memoryview(piece if type(piece) is bytes else bytes(piece))
        if buffer:  # complete the chunk begun by earlier pieces
            take = chunk - len(buffer)
            buffer += view[:take]
            view = view[take:]
            if len(buffer) < chunk:
                continue
            yield bytes(buffer)
            buffer.clear()
        whole = len(view) - len(view) % chunk
        for start in range(0, whole, chunk):
            yield view[start : start + chunk]
        buffer += view[whole:]
    if buffer:
        yield bytes(buffer)


async def write_range(
    client: AsyncClient,
    block_id: str,
    offset: int,
    source: AsyncIterable[bytes] | Iterable[bytes] | bytes,
    *,
    chunk: int | None = None,
    window: int = WINDOW,
    progress: Progress | None = None,
) -> int:
    """Write everything ``source`` yields (or the bytes given) at ``offset`` of block
    ``block_id``, in order, with ``window`` chunk writes in flight. Returns the bytes written.

    ``progress`` is called with the byte count of each chunk once the daemon confirmed it.
    On the first refusal (e.g. the data runs past the block's size) the writes in flight are
    awaited and that error is raised; chunks before the failing one are written.
    """
    if chunk is None:
        chunk = await transfer_chunk(client)
    if chunk < 1 or window < 1:
        raise ValueError("chunk and window must be positive")
    pieces = _rechunk([source] if isinstance(source, bytes) else source, chunk)
    _keep_large_buffers()
    position = offset
    written = 0
    inflight: deque[asyncio.Task[int]] = deque()

    async def settle_one() -> None:
        nonlocal written
        n = await inflight.popleft()
        written += n
        if progress is not None:
            progress(n)

    try:
        async for piece in pieces:
            if len(inflight) >= window:
                await settle_one()
            inflight.append(
                asyncio.ensure_future(client.ram_block_write(block_id, position, piece))
            )
            position += len(piece)
        while inflight:
            await settle_one()
    except BaseException:
        # Let the writes already sent finish (they cannot be recalled), then fail.
        for task in inflight:
            with contextlib.suppress(BaseException):
                await task
        raise
    finally:
        await pieces.aclose()
        heap.trim()
    return written
