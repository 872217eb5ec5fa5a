"""The ramd image format, version 1: constants, the fixed header, the block table, digests.

Everything here is pure (no I/O): :mod:`ramd.snapshot.writer` and :mod:`ramd.snapshot.reader`
do the file work. The layout is documented in ``docs/image-format.md``; this module is its
executable form, and the two must change together.

Layout (all integers little-endian)::

    [0, 128)                  fixed header (struct _HEADER)
    [128, 128 + table)        block table: UTF-8 JSON
    [.., data_offset)         zero padding up to the next multiple of ``align``
    [offset_i, offset_i + size_i)   block i's used range, blocks in table order, back to back;
                              all-zero pages are holes (never written)

Digests are XXH3-128 (``xxhash``). A block's digest is the digest of the concatenated digests
of its ``chunk_size`` chunks (the last one may be shorter), so an all-zero chunk costs one
precomputed constant instead of hashing its bytes. The table records every block digest; the
file digest covers the header fields before it, the table and its padding: it is the root of
that tree, so it covers every byte of the file and can be checked before any data is read.
The header digest covers the header up to itself.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import xxhash

from ramd.errors import RamdError
from ramd.ids import ID_PATTERN

#: First 8 bytes of every image.
MAGIC = b"RAMDIMG\0"
#: The only version this code reads and writes.
VERSION = 1
#: Flag bits known to this version (none yet): a reader refuses any other bit.
KNOWN_FLAGS = 0
#: Size of the fixed header; the table starts right after it.
HEADER_SIZE = 128
#: Alignment of ``data_offset``, of every block's data and of every block's size.
ALIGN = 4096
#: Bytes covered by one chunk digest. A writer may choose any power of two in
#: ``[MIN_CHUNK, MAX_CHUNK]``; this is what :func:`ramd.snapshot.writer.write_image` uses.
CHUNK_SIZE = 256 * 1024
MIN_CHUNK = ALIGN
MAX_CHUNK = 64 * 1024 * 1024
#: Upper bound on the table, so a corrupt header cannot make a reader allocate without bound.
MAX_TABLE = 64 * 1024 * 1024
#: Longest block table entry a reader accepts per block it may create (see
#: :func:`max_table_length`); the daemon writes about 300 bytes.
MAX_ENTRY_BYTES = 1024
#: Length of an XXH3-128 digest.
DIGEST_SIZE = 16

# magic, version, flags, header_size, chunk_size, align, reserved,
# table_offset, table_length, data_offset, file_length
_FIELDS = struct.Struct("<8sIIIIII QQQQ")
_FILE_DIGEST_AT = _FIELDS.size  # 64
_RESERVED_AT = _FILE_DIGEST_AT + DIGEST_SIZE  # 80
_HEADER_DIGEST_AT = HEADER_SIZE - DIGEST_SIZE  # 112

_ID_RE = re.compile(ID_PATTERN)

#: JSON values allowed in a block's ``settings``.
SettingValue = bool | int | str | None


class ImageError(RamdError):
    """The image cannot be written, read or trusted; ``desc`` says why in one line."""


class ImageCancelled(ImageError):
    """The operation stopped because its ``cancelled`` callable returned true."""

    def __init__(self) -> None:
        super().__init__("Operation canceled")


@dataclass(frozen=True)
class BlockDescriptor:
    """What the writer records about one block (its contents come from the ``read`` callable).

    ``settings`` holds the block's other settings (prealloc, merge, ...) as given at add time;
    the format stores it verbatim and gives it no meaning.
    """

    id: str
    size: int
    max_size: int
    resizable: bool
    page_size: int
    backend: str
    settings: Mapping[str, SettingValue] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageBlock:
    """One block as recorded in an image: its descriptor, where its data is, its digest."""

    desc: BlockDescriptor
    offset: int
    digest: bytes

    @property
    def id(self) -> str:
        return self.desc.id

    @property
    def size(self) -> int:
        return self.desc.size


@dataclass(frozen=True)
class ImageInfo:
    """A whole image as described by its header and table (returned by write and verify)."""

    version: int
    flags: int
    chunk_size: int
    data_offset: int
    file_length: int
    file_digest: bytes
    blocks: tuple[ImageBlock, ...]

    @property
    def data_bytes(self) -> int:
        """Sum of the blocks' sizes: the ``total`` of a save, verify or load progress."""
        return sum(b.size for b in self.blocks)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# -- digests -------------------------------------------------------------------------------


def chunk_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest of one chunk (any length up to ``chunk_size``)."""
    return xxhash.xxh3_128_digest(data)


@functools.lru_cache(maxsize=8)
def zeros(length: int) -> bytes:
    """``length`` zero bytes, allocated once per length (compared against, never written)."""
    return bytes(length)


@functools.lru_cache(maxsize=8)
def zero_chunk_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes, computed once per length."""
    return xxhash.xxh3_128_digest(zeros(length))


class BlockHasher:
    """Accumulates the chunk digests of one block, in order, into its block digest."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def add(self, digest: bytes) -> None:
        """Append one chunk digest."""
        self._h.update(digest)

    def add_zero_chunks(self, count: int, chunk_size: int) -> None:
        """Append ``count`` digests of all-zero chunks of ``chunk_size`` bytes, cheaply."""
        zero = zero_chunk_digest(chunk_size)
        batch = 4096
        while count > 0:
            n = min(count, batch)
            self._h.update(zero * n)
            count -= n

    def digest(self) -> bytes:
        return self._h.digest()


def file_digest(fields: bytes, meta: bytes) -> bytes:
    """The file digest: the header fields before it, then the table and its padding.

    The table records every block digest, and each block digest covers its block's bytes, so
    this root covers every byte of the file while a reader can check it before any data.
    """
    h = file_digest_start(fields)
    h.update(meta)
    return h.digest()


def file_digest_start(fields: bytes) -> xxhash.xxh3_128:
    """The file digest's hasher after the header fields: feed it the table and padding."""
    return xxhash.xxh3_128(fields[:_FILE_DIGEST_AT])


# -- layout --------------------------------------------------------------------------------


def check_descriptors(blocks: Sequence[BlockDescriptor]) -> None:
    """Refuse descriptors the format cannot record (the daemon's blocks always pass)."""
    seen: set[str] = set()
    for b in blocks:
        if not _ID_RE.match(b.id):
            raise ImageError(f"Invalid block id '{b.id}'")
        if b.id in seen:
            raise ImageError(f"Duplicate block id '{b.id}'")
        seen.add(b.id)
        if not _is_pow2(b.page_size) or b.page_size < ALIGN:
            raise ImageError(f"Block '{b.id}': bad page size 0x{b.page_size:x}")
        if b.size <= 0 or b.size % b.page_size or b.max_size < b.size:
            raise ImageError(f"Block '{b.id}': bad size 0x{b.size:x} (max 0x{b.max_size:x})")
        if not b.resizable and b.max_size != b.size:
            raise ImageError(f"Block '{b.id}': not resizable but max-size != size")


def _block_entry(b: ImageBlock) -> dict[str, object]:
    d = b.desc
    return {
        "id": d.id,
        "size": d.size,
        "max-size": d.max_size,
        "resizable": d.resizable,
        "page-size": d.page_size,
        "backend": d.backend,
        "settings": dict(d.settings),
        "offset": b.offset,
        "digest": b.digest.hex(),
    }


def encode_table(blocks: Sequence[ImageBlock]) -> bytes:
    """The table bytes. Its length depends only on the descriptors (digests are fixed-size hex)."""
    doc = {"format": "ramd-image", "blocks": [_block_entry(b) for b in blocks]}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()


def layout(
    blocks: Sequence[BlockDescriptor], chunk_size: int = CHUNK_SIZE
) -> tuple[ImageInfo, int]:
    """Place the blocks: returns an :class:`ImageInfo` with zero digests, and the table length.

    The writer fills in the digests once the data is written; the table length stays the same.
    """
    check_descriptors(blocks)
    placeholder = bytes(DIGEST_SIZE)
    probe = [ImageBlock(b, 0, placeholder) for b in blocks]
    # The offsets are written in the table, so the table's length depends on where the data
    # starts. Start from a lower bound and move the data up until the table fits: the length
    # only grows with the offsets, so this reaches the smallest fixed point (in two steps).
    data_offset = _align_up(HEADER_SIZE + len(encode_table(probe)), ALIGN)
    while True:
        placed, off = [], data_offset
        for b in blocks:
            placed.append(ImageBlock(b, off, placeholder))
            off += b.size
        table_length = len(encode_table(placed))
        needed = _align_up(HEADER_SIZE + table_length, ALIGN)
        if needed == data_offset:
            break
        data_offset = needed
    info = ImageInfo(VERSION, 0, chunk_size, data_offset, off, placeholder, tuple(placed))
    return info, table_length


def finish(info: ImageInfo, table_length: int) -> tuple[ImageInfo, bytes]:
    """Seal an image whose block digests are known.

    Returns the info with its file digest, and the metadata region ``[0, data_offset)``:
    header, table, zero padding.
    """
    table = encode_table(info.blocks)
    if len(table) != table_length:
        raise AssertionError("table length changed after layout")
    meta = table + bytes(info.data_offset - HEADER_SIZE - table_length)
    fields = _FIELDS.pack(
        MAGIC,
        info.version,
        info.flags,
        HEADER_SIZE,
        info.chunk_size,
        ALIGN,
        0,
        HEADER_SIZE,
        table_length,
        info.data_offset,
        info.file_length,
    )
    fdigest = file_digest(fields, meta)
    head = fields + fdigest + bytes(_HEADER_DIGEST_AT - _RESERVED_AT)
    sealed = replace(info, file_digest=fdigest)
    return sealed, head + xxhash.xxh3_128_digest(head) + meta


# -- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """The fixed header, checked: magic, version, flags, header digest, field ranges."""

    flags: int
    chunk_size: int
    table_length: int
    data_offset: int
    file_length: int
    file_digest: bytes
    raw: bytes


def parse_header(raw: bytes) -> Header:
    """Check and decode the first ``HEADER_SIZE`` bytes of an image."""
    if len(raw) < len(MAGIC) or raw[: len(MAGIC)] != MAGIC:
        raise ImageError("Bad image: bad magic")
    if len(raw) < HEADER_SIZE:
        raise ImageError("Bad image: truncated header")
    (_, version, flags, header_size, chunk, align, reserved, table_off, table_len, data_off,
     file_len) = _FIELDS.unpack_from(raw)  # fmt: skip
    if version != VERSION:
        raise ImageError(f"Bad image: unsupported version {version}")
    if xxhash.xxh3_128_digest(raw[:_HEADER_DIGEST_AT]) != raw[_HEADER_DIGEST_AT:HEADER_SIZE]:
        raise ImageError("Bad image: header checksum mismatch")
    if flags & ~KNOWN_FLAGS:
        raise ImageError(f"Bad image: unsupported flags 0x{flags:x}")
    if (
        header_size != HEADER_SIZE
        or align != ALIGN
        or reserved != 0
        or any(raw[_RESERVED_AT:_HEADER_DIGEST_AT])
        or table_off != HEADER_SIZE
        or not _is_pow2(chunk)
        or not MIN_CHUNK <= chunk <= MAX_CHUNK
        or table_len > MAX_TABLE
        or data_off != _align_up(HEADER_SIZE + table_len, ALIGN)
        or file_len < data_off
    ):
        raise ImageError("Bad image: inconsistent header")
    return Header(
        flags,
        chunk,
        table_len,
        data_off,
        file_len,
        bytes(raw[_FILE_DIGEST_AT:_RESERVED_AT]),
        bytes(raw[:HEADER_SIZE]),
    )


#: Longest integer in a table (digits): every size and offset fits in 63 bits.
MAX_INT_DIGITS = 20
#: Largest integer value in a table.
MAX_INT = (1 << 63) - 1


def _parse_int(text: str) -> int:
    """The table's integers: refused past :data:`MAX_INT_DIGITS` digits, before Python
    converts them (whose own limit and its message are not for clients)."""
    if len(text) > MAX_INT_DIGITS + 1:
        raise ImageError(f"Bad image: block table: an integer of {len(text)} digits")
    return int(text)


_DECODER = json.JSONDecoder(parse_int=_parse_int)
_SPACE = re.compile(r"[ \t\n\r]*")


class _Text:
    """A cursor over the table's JSON text, for the parse of :func:`iter_table`."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        """The next character that is not white space ("" at the end)."""
        m = _SPACE.match(self.text, self.pos)
        self.pos = m.end() if m else self.pos
        return self.text[self.pos : self.pos + 1]

    def take(self, char: str) -> bool:
        """Consume ``char`` if it is next."""
        if self.peek() != char:
            return False
        self.pos += 1
        return True

    def expect(self, char: str) -> None:
        if not self.take(char):
            raise ImageError("Bad image: block table is not JSON")

    def value(self) -> object:
        """One JSON value. Its nesting is bounded by the interpreter's recursion limit (the
        decoder raises ``RecursionError``, turned into an image error: a table nests 3 deep)."""
        self.peek()
        try:
            value, self.pos = _DECODER.raw_decode(self.text, self.pos)
        except RecursionError:
            raise ImageError("Bad image: block table nests too deep") from None
        except ImageError:
            raise
        except ValueError:  # JSONDecodeError, or a number Python refuses to convert
            raise ImageError("Bad image: block table is not JSON") from None
        return value


def iter_table(text: str, max_entries: int) -> Iterator[object]:
    """The entries of the table's ``blocks`` list, one at a time, as they are parsed.

    The table is ``{"format": "ramd-image", "blocks": [ENTRY, ...]}`` (any key order, white
    space and further keys): each entry is decoded on its own (a bounded step, so a caller
    in a worker thread lets the event loop run between entries), and an entry past
    ``max_entries`` is refused before the rest is parsed. Raises :class:`ImageError` for
    anything else, including a wrong ``format`` (checked once the object is read).
    """
    cur = _Text(text)
    cur.expect("{")
    seen: set[str] = set()
    count = 0
    more = not cur.take("}")
    while more:
        key = cur.value()
        if not isinstance(key, str) or key in seen:
            raise ImageError("Bad image: block table: bad or repeated key")
        seen.add(key)
        cur.expect(":")
        if key == "blocks":
            cur.expect("[")
            entries = not cur.take("]")
            while entries:
                count += 1
                if count > max_entries:
                    raise ImageError(
                        f"Bad image: block table: more than {max_entries} blocks (max-blocks)"
                    )
                yield cur.value()
                entries = cur.take(",")
                if not entries:
                    cur.expect("]")
        else:
            value = cur.value()
            if key == "format" and value != "ramd-image":
                raise ImageError("Bad image: block table has no 'format': 'ramd-image'")
        more = cur.take(",")
        if not more:
            cur.expect("}")
    if cur.peek():
        raise ImageError("Bad image: block table is not JSON")
    if "format" not in seen:
        raise ImageError("Bad image: block table has no 'format': 'ramd-image'")
    if "blocks" not in seen:
        raise ImageError("Bad image: block table has no 'blocks' list")


def max_table_length(max_entries: int) -> int:
    """The longest table of ``max_entries`` entries a reader reads (:data:`MAX_TABLE` at most)."""
    return min(MAX_TABLE, 64 + max_entries * MAX_ENTRY_BYTES)


def _bad_field(key: str, kind: str) -> ImageError:
    return ImageError(f"Bad image: block table: '{key}' missing or not {kind}")


def _get_int(entry: Mapping[str, object], key: str) -> int:
    value = entry.get(key)
    # bool is a subclass of int: an int field must not accept true/false.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise _bad_field(key, "a non-negative integer")
    return value


def _get_str(entry: Mapping[str, object], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str):
        raise _bad_field(key, "a string")
    return value


def _get_bool(entry: Mapping[str, object], key: str) -> bool:
    value = entry.get(key)
    if not isinstance(value, bool):
        raise _bad_field(key, "a boolean")
    return value


def _parse_settings(value: object) -> dict[str, SettingValue]:
    if not isinstance(value, dict) or not all(
        isinstance(v, bool | int | str) or v is None for v in value.values()
    ):
        raise ImageError("Bad image: block table: bad 'settings'")
    return dict(value)


def parse_table(
    header: Header, text: str, max_entries: int = MAX_TABLE
) -> list[tuple[BlockDescriptor, int, bytes]]:
    """Decode and check the table ``text`` (decoded, its digest and padding checked), of at
    most ``max_entries`` blocks (:func:`iter_table`: bounded in entries, nesting, integers).

    Returns ``(descriptor, offset, recorded digest)`` per block. The blocks must lie back to
    back from ``data_offset`` to ``file_length``, in table order.
    """
    out: list[tuple[BlockDescriptor, int, bytes]] = []
    expected = header.data_offset
    for e in iter_table(text, max_entries):
        if not isinstance(e, dict):
            raise ImageError("Bad image: block table entry is not an object")
        desc = BlockDescriptor(
            id=_get_str(e, "id"),
            size=_get_int(e, "size"),
            max_size=_get_int(e, "max-size"),
            resizable=_get_bool(e, "resizable"),
            page_size=_get_int(e, "page-size"),
            backend=_get_str(e, "backend"),
            settings=_parse_settings(e.get("settings", {})),
        )
        offset = _get_int(e, "offset")
        digest_hex = _get_str(e, "digest")
        try:
            digest = bytes.fromhex(digest_hex)
        except ValueError:
            digest = b""
        if len(digest) != DIGEST_SIZE:
            raise ImageError(f"Bad image: block '{desc.id}': bad digest")
        if offset != expected:
            raise ImageError(f"Bad image: block '{desc.id}': data offset out of place")
        out.append((desc, expected, digest))
        expected += desc.size
    try:
        check_descriptors([d for d, _, _ in out])
    except ImageError as e:
        raise ImageError(f"Bad image: block table: {e.desc}") from None
    if expected != header.file_length:
        raise ImageError("Bad image: blocks do not end at the file length")
    return out
