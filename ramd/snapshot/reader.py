"""Read an image: verify all of it first, then replay it into blocks through callables.

:func:`verify` only reads the file: :func:`read_info` checks the header and table,
:func:`verify_data` every block's data (and can hand the blocks listed in its ``direct``
argument to ``write`` and ``zero`` as it checks them, for blocks nobody can see yet).
:func:`load` reads the file again and hands the other blocks' contents to ``write`` and
``zero``; it hashes what it reads once more, so a file changed between the two calls is
reported (after the blocks it reached were written). Holes are found with
``SEEK_DATA``/``SEEK_HOLE`` and never read.

Threads: all run in the calling thread (in the daemon, a job's worker thread), which reads
the file and calls ``progress`` and ``cancelled``; the zero scan, the hash and the ``write``
and ``zero`` callables run in one helper thread per call (:mod:`ramd.snapshot.pipeline`), in
block and offset order, at most ``DEPTH`` buffers of ``IO_SIZE`` behind the reads. The helper
thread has ended when :func:`verify_data` or :func:`load` returns or raises. Memory:
``DEPTH + 1`` buffers (2 of ``chunk_size`` when the image's chunks are larger than
``IO_SIZE``).
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Callable, Collection

from ramd.snapshot.buffer import AlignedBuffer, BufferRing, ring_for
from ramd.snapshot.callbacks import CancelledFn, ProgressFn, never_cancelled, no_progress
from ramd.snapshot.fileio import IO_SIZE, check_regular, next_data, next_hole, pread_into
from ramd.snapshot.format import (
    HEADER_SIZE,
    MAX_TABLE,
    VERSION,
    BlockHasher,
    Header,
    ImageBlock,
    ImageCancelled,
    ImageError,
    ImageInfo,
    chunk_digest,
    file_digest_start,
    max_table_length,
    parse_header,
    parse_table,
    zero_chunk_digest,
    zeros,
)
from ramd.snapshot.pipeline import Pipeline
from ramd.snapshot.scan import scan

#: Bytes of the table read, hashed or decoded at a time (see :func:`read_info`).
TABLE_PIECE = 1 << 20
#: Buffers in flight to the hash thread (one more is being read).
DEPTH = 2

#: ``write(block_index, offset, data)``: put ``data`` at ``offset`` in the block. ``data`` is a
#: view of a buffer that is reused after the call returns: copy it, do not keep it.
WriteFn = Callable[[int, int, memoryview], None]
#: Zero runs shorter than this inside data are passed to ``write`` as data: fewer calls, at the
#: cost of backing those zero pages in the block.
MIN_ZERO_RUN = 64 * 1024
#: ``zero(block_index, offset, length)``: make the range read as zeros (discard or fill).
#: ``offset`` and ``length`` are multiples of 4096, not necessarily of the block's page size.
ZeroFn = Callable[[int, int, int], None]


def read_info(fd: int, max_blocks: int = MAX_TABLE) -> ImageInfo:
    """Check an image's header and table (not its data); returns what it describes.

    Order: magic, version, header checksum, flags and header fields, file length, file
    checksum (header and table), table. The file checksum covers every block digest, so
    what this returns can be trusted once :func:`verify_data` has checked the data against
    it. Raises :class:`ImageError` naming the first problem found.

    Bounded for a caller that must not hold the interpreter long (a job's worker thread,
    beside the event loop): a table longer than ``max_blocks`` entries can be
    (:data:`~ramd.snapshot.format.MAX_ENTRY_BYTES` each) is refused before it is read, one
    with more entries as soon as the parse gets there, and the table is read, hashed and
    decoded in pieces of :data:`TABLE_PIECE` bytes, each a short hold of the GIL.
    """
    st = check_regular(fd, writing=False)
    if st.st_size == 0:
        raise ImageError("Bad image: empty file")
    raw = _pread(fd, min(HEADER_SIZE, st.st_size), 0)
    header = parse_header(raw)
    if st.st_size < header.file_length:
        raise ImageError(f"Bad image: truncated ({st.st_size} of {header.file_length} bytes)")
    if st.st_size > header.file_length:
        raise ImageError(f"Bad image: {st.st_size - header.file_length} bytes past its end")
    if header.table_length > max_table_length(max_blocks):
        raise ImageError(
            f"Bad image: block table of {header.table_length} bytes: longer than"
            f" {max_blocks} blocks (max-blocks) take"
        )
    entries = parse_table(header, _read_table(fd, header), max_blocks)
    return ImageInfo(
        version=VERSION,
        flags=header.flags,
        chunk_size=header.chunk_size,
        data_offset=header.data_offset,
        file_length=header.file_length,
        file_digest=header.file_digest,
        blocks=tuple(ImageBlock(desc, offset, digest) for desc, offset, digest in entries),
    )


def verify_data(
    fd: int,
    info: ImageInfo,
    *,
    write: WriteFn | None = None,
    zero: ZeroFn | None = None,
    direct: Collection[int] = (),
    progress: ProgressFn = no_progress,
    cancelled: CancelledFn = never_cancelled,
) -> None:
    """Check every block's data against ``info`` (from :func:`read_info` on this fd).

    The blocks whose index is in ``direct`` also get their contents, through ``write`` and
    ``zero``, as they are checked: one pass instead of two, for blocks nobody else can see
    yet (the caller discards them if this raises). ``progress`` counts block bytes (of
    :attr:`ImageInfo.data_bytes`). Raises :class:`ImageError` naming the first block whose
    data does not match, :class:`ImageCancelled` if ``cancelled()`` turned true.
    """
    if direct and (write is None or zero is None):
        raise ValueError("direct blocks need write and zero")
    ring = ring_for(info.chunk_size, IO_SIZE, DEPTH + 1)
    with _pipeline(ring) as work:
        for index, block in enumerate(info.blocks):
            sink = _Sink(index, write, zero) if index in direct and write and zero else None
            got = _scan(fd, block, info.chunk_size, ring, work, sink, progress, cancelled)
            if got != block.digest:
                raise ImageError(f"Bad image: checksum mismatch in block '{block.id}'")


def verify(
    fd: int, *, progress: ProgressFn = no_progress, cancelled: CancelledFn = never_cancelled
) -> ImageInfo:
    """Check a whole image without changing anything: :func:`read_info`, then
    :func:`verify_data`; returns what the image describes."""
    info = read_info(fd)
    verify_data(fd, info, progress=progress, cancelled=cancelled)
    return info


def load(
    fd: int,
    info: ImageInfo,
    write: WriteFn,
    zero: ZeroFn,
    *,
    skip: Collection[int] = (),
    progress: ProgressFn = no_progress,
    cancelled: CancelledFn = never_cancelled,
) -> None:
    """Replay a verified image: every block's whole used range goes to ``write`` or ``zero``,
    except the blocks whose index is in ``skip`` (already loaded by :func:`verify_data`).

    ``info`` is what :func:`verify` returned for this fd. Block ``i`` of ``info.blocks`` is
    ``block_index`` ``i``; the caller has already given each block the image's size. A cancel
    stops between chunks: the blocks before it are complete, the current one is partly
    written. Raises :class:`ImageError` "Image changed after verification" if the file no
    longer matches ``info`` (blocks already written stay written).
    """
    st = check_regular(fd, writing=False)
    if st.st_size != info.file_length:
        raise ImageError(
            f"Image changed after verification: {st.st_size} bytes, not {info.file_length}"
        )
    ring = ring_for(info.chunk_size, IO_SIZE, DEPTH + 1)
    with _pipeline(ring) as work:
        for index, block in enumerate(info.blocks):
            if index in skip:
                continue
            sink = _Sink(index, write, zero)
            got = _scan(fd, block, info.chunk_size, ring, work, sink, progress, cancelled)
            if got != block.digest:
                raise ImageError(f"Image changed after verification: block '{block.id}'")


class _Sink:
    """Passes one block's contents on, merging neighbouring zero ranges into one call."""

    def __init__(self, index: int, write: WriteFn, zero: ZeroFn) -> None:
        self._index = index
        self._write = write
        self._zero = zero
        self._zero_start = self._zero_end = 0

    def data(self, offset: int, view: memoryview) -> None:
        self.flush()
        self._write(self._index, offset, view)

    def zeros(self, offset: int, length: int) -> None:
        if offset != self._zero_end:
            self.flush()
            self._zero_start = offset
        self._zero_end = offset + length

    def flush(self) -> None:
        if self._zero_end > self._zero_start:
            self._zero(self._index, self._zero_start, self._zero_end - self._zero_start)
        self._zero_start = self._zero_end = 0


def _read_table(fd: int, header: Header) -> str:
    """The table of a checked header, read and hashed in pieces and checked against the file
    digest, then decoded; its zero padding is checked too."""
    length = header.data_offset - HEADER_SIZE
    buf = bytearray(length)
    view = memoryview(buf)
    digest = file_digest_start(header.raw)
    decoder = codecs.getincrementaldecoder("utf-8")()
    pieces = []
    try:
        for at in range(0, length, TABLE_PIECE):
            piece = view[at : at + TABLE_PIECE]
            if pread_into(fd, piece, HEADER_SIZE + at) != len(piece):
                raise ImageError("Bad image: truncated")
            digest.update(piece)
        if digest.digest() != header.file_digest:
            raise ImageError("Bad image: file checksum mismatch")
        if any(view[header.table_length :]):
            raise ImageError("Bad image: non-zero padding after the block table")
        for at in range(0, header.table_length, TABLE_PIECE):
            pieces.append(decoder.decode(view[at : min(at + TABLE_PIECE, header.table_length)]))
        pieces.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError:
        raise ImageError("Bad image: block table is not JSON") from None
    finally:
        view.release()
    return "".join(pieces)


def _pread(fd: int, length: int, offset: int) -> bytes:
    buf = bytearray(length)
    if pread_into(fd, memoryview(buf), offset) != length:
        raise ImageError("Bad image: truncated")
    return bytes(buf)


def _pipeline(ring: BufferRing) -> Pipeline[Callable[[], None]]:
    """The helper thread that hashes what the calling thread reads (and passes it on)."""
    return Pipeline(_call, ring.depth, "ramd-image-read")


def _call(step: Callable[[], None]) -> None:
    step()


def _scan(
    fd: int,
    block: ImageBlock,
    chunk: int,
    ring: BufferRing,
    work: Pipeline[Callable[[], None]],
    sink: _Sink | None,
    progress: ProgressFn,
    cancelled: CancelledFn,
) -> bytes:
    """Hash one block's data (passing it to ``sink`` if given); returns the block digest.

    Only the file's data extents are read (``SEEK_DATA``/``SEEK_HOLE``): whole chunks inside
    holes cost one constant digest each, and the hole parts of a chunk that holds some data
    are zero-filled in the buffer rather than read (reading a hole would fill the page cache
    with zero pages). Runs of zero pages of at least ``MIN_ZERO_RUN`` go to ``sink.zeros``,
    the rest to ``sink.data``.

    The calling thread reads into ``ring``'s buffers; the zero scan, the hash and ``sink``
    run in ``work``'s helper thread, in order. On a cancel, what was read is passed on
    (:meth:`Pipeline.drain`) before :class:`ImageCancelled` is raised.
    """
    hasher = BlockHasher()
    blank = memoryview(zeros(ring.size))
    base, size = block.offset, block.size
    pos = 0  # block-relative, a multiple of chunk
    extent = _Extent(fd, base, size)
    while pos < size:
        if cancelled():
            work.drain()
            raise ImageCancelled()
        if pos >= extent.end:
            extent.find(pos)
        if extent.start - pos >= chunk or extent.start >= size:
            end = size if extent.start >= size else extent.start // chunk * chunk
            work.put(functools.partial(_holes, hasher, sink, chunk, pos, end))
            progress(end - pos)
            pos = end
            continue
        end = min(size, -(-extent.end // chunk) * chunk, pos + ring.size)
        buf = ring.next()
        view = buf.view
        cur = pos
        while cur < end:
            if cur >= extent.end:
                extent.find(cur)
            upto = min(extent.start, end)
            if cur < upto:
                view[cur - pos : upto - pos] = blank[: upto - cur]
                cur = upto
                continue
            upto = min(extent.end, end)
            if pread_into(fd, view[cur - pos : upto - pos], base + cur) != upto - cur:
                raise ImageError(f"Bad image: truncated in block '{block.id}'")
            cur = upto
        work.put(functools.partial(_data, hasher, sink, chunk, buf, pos, end - pos))
        progress(end - pos)
        pos = end
    if sink is not None:
        work.put(sink.flush)
    work.drain()
    return hasher.digest()


def _holes(hasher: BlockHasher, sink: _Sink | None, chunk: int, pos: int, end: int) -> None:
    """Helper thread: ``[pos, end)`` of the block is a hole of the file (whole chunks, and
    the end of the block)."""
    full, tail = divmod(end - pos, chunk)
    hasher.add_zero_chunks(full, chunk)
    if tail:
        hasher.add(zero_chunk_digest(tail))
    if sink is not None:
        sink.zeros(pos, end - pos)


def _data(
    hasher: BlockHasher, sink: _Sink | None, chunk: int, buf: AlignedBuffer, pos: int, n: int
) -> None:
    """Helper thread: the first ``n`` bytes of ``buf`` hold the block's bytes at ``pos``."""
    view = buf.view
    found = scan(buf.raw, n, chunk, None if sink is None else MIN_ZERO_RUN, buf.start)
    for i, is_zero in enumerate(found.zero_chunks):
        c = i * chunk
        clen = min(chunk, n - c)
        hasher.add(zero_chunk_digest(clen) if is_zero else chunk_digest(view[c : c + clen]))
    if sink is not None:
        for start, stop, is_zero in found.segments:
            if is_zero:
                sink.zeros(pos + start, stop - start)
            else:
                sink.data(pos + start, view[start:stop])


class _Extent:
    """The current data extent ``[start, end)`` of one block's range in the file, found with
    ``SEEK_DATA``/``SEEK_HOLE`` (block-relative offsets, clamped to the block's size)."""

    def __init__(self, fd: int, base: int, size: int) -> None:
        self._fd = fd
        self._base = base
        self._size = size
        self.start = self.end = 0

    def find(self, offset: int) -> None:
        """Move to the first extent that ends after ``offset``; ``start`` = ``size`` if none."""
        limit = self._base + self._size
        self.start = next_data(self._fd, self._base + offset, limit) - self._base
        if self.start >= self._size:
            self.start = self.end = self._size
        else:
            self.end = next_hole(self._fd, self._base + self.start, limit) - self._base
