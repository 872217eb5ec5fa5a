"""The metadata kept beside each ``file`` block in ``memory-dir`` (docs/protocol.md §9).

Block ``ID`` is the file ``ID``; its metadata is the JSON file ``ID.meta``::

    {"format": "ramd-block", "version": 1, "id": ID, "size": N, "max-size": N,
     "resizable": B, "page-size": N, "created": NS, "settings": {"dump": B, ...}}

Writes are atomic: the text goes to ``.ID.meta.tmp`` (created ``O_EXCL|O_NOFOLLOW``
through the directory fd), is fsynced, renamed over ``ID.meta``, and the directory is
fsynced. A reader therefore sees either the old or the new metadata, never a mix.

The size rule (what makes a crash at any step safe): **the metadata's size never exceeds
the file's length**. A grow extends the file first and writes the metadata after; a shrink
writes the metadata first and shortens the file after. A crash between the two steps leaves
a file longer than its metadata says; adoption then takes the file's length (it lies in
``[meta size, max-size]``, so the block is whole: a grow's tail is zeros, a shrink's tail is
the data it was about to drop). A file shorter than its metadata, or longer than
``max-size``, is a mismatch that is never adopted.

Names starting with ``.`` (temporary files, the lock file) are the daemon's own and are
never taken for blocks. A new block file is ``.ID.new`` until its metadata is written
(:class:`ramd.hostmem.shared.FileMemory`); ``.ID.new`` and ``.ID.meta.tmp`` left by a crash
are removed at the next start (:func:`is_leftover`). Thread: the RAM list's owner thread only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from dataclasses import dataclass, field

from ramd import blocksettings

#: Suffix of a metadata file.
META_SUFFIX = ".meta"
#: Suffixes of the daemon's temporary names: a new block file, new metadata.
NEW_SUFFIX = ".new"
TMP_SUFFIX = ".tmp"
_LEFTOVER_RE = re.compile(
    r"\.[A-Za-z][A-Za-z0-9._-]{0,63}(?:"
    + re.escape(NEW_SUFFIX)
    + "|"
    + re.escape(META_SUFFIX + TMP_SUFFIX)
    + ")"
)
#: The ``format`` and ``version`` written; other versions are refused (not adopted).
FORMAT = "ramd-block"
VERSION = 1
#: Longest metadata file read (anything larger is bad metadata).
MAX_META_BYTES = 64 * 1024
#: Settings a block keeps across restarts (``RAMList.create`` keywords).
SETTINGS = tuple(s.name for s in blocksettings.SETTINGS if s.default is not None)


class BadMetadata(ValueError):
    """Metadata that cannot be used; the message says why."""


@dataclass(frozen=True)
class BlockMeta:
    """What a persistent block needs to be mapped again: sizes and settings."""

    id: str
    size: int
    max_size: int
    resizable: bool
    page_size: int
    settings: dict[str, bool] = field(default_factory=dict)
    created: int = 0

    def with_size(self, size: int) -> BlockMeta:
        return BlockMeta(
            self.id,
            size,
            self.max_size,
            self.resizable,
            self.page_size,
            self.settings,
            self.created,
        )

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "id": self.id,
                "size": self.size,
                "max-size": self.max_size,
                "resizable": self.resizable,
                "page-size": self.page_size,
                "created": self.created,
                "settings": self.settings,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, text: bytes, name: str) -> BlockMeta:
        """Parse and check metadata for the block file ``name``; :class:`BadMetadata`."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadMetadata(f"not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise BadMetadata(f"not {FORMAT} metadata")
        if doc.get("version") != VERSION:
            raise BadMetadata(f"unsupported version {doc.get('version')!r}")
        if doc.get("id") != name:
            raise BadMetadata(f"id {doc.get('id')!r} does not match the file name")
        ints = {k: doc.get(k) for k in ("size", "max-size", "page-size", "created")}
        for key, value in ints.items():
            if type(value) is not int or value < 0:
                raise BadMetadata(f"{key}: not a non-negative integer")
        settings = doc.get("settings")
        if type(doc.get("resizable")) is not bool or not isinstance(settings, dict):
            raise BadMetadata("resizable or settings missing")
        if any(k not in SETTINGS or type(v) is not bool for k, v in settings.items()):
            raise BadMetadata("unknown or non-boolean setting")
        size, max_size, page = ints["size"], ints["max-size"], ints["page-size"]
        assert isinstance(size, int) and isinstance(max_size, int) and isinstance(page, int)
        if page <= 0 or page & (page - 1) or size % page or max_size % page:
            raise BadMetadata("sizes are not multiples of a power-of-two page size")
        if not 0 < size <= max_size or (not doc["resizable"] and size != max_size):
            raise BadMetadata(f"size 0x{size:x} does not fit max-size 0x{max_size:x}")
        created = ints["created"]
        assert isinstance(created, int)
        return cls(name, size, max_size, doc["resizable"], page, dict(settings), created)


def meta_name(block_id: str) -> str:
    return block_id + META_SUFFIX


def temp_name(block_id: str) -> str:
    """The name a new block file has until its metadata is written (``.ID.new``)."""
    return f".{block_id}{NEW_SUFFIX}"


def meta_temp_name(block_id: str) -> str:
    """The name new metadata has until it is renamed over ``ID.meta``."""
    return f".{meta_name(block_id)}{TMP_SUFFIX}"


def is_leftover(name: str) -> bool:
    """Whether ``name`` is one of the daemon's own temporary names (:func:`temp_name`,
    :func:`meta_temp_name`): what a crash can leave, and only the daemon creates."""
    return _LEFTOVER_RE.fullmatch(name) is not None


def write_meta(dir_fd: int, meta: BlockMeta) -> None:
    """Replace ``ID.meta`` atomically (write a temporary file, fsync, rename, fsync the
    directory). Raises ``OSError``; the old metadata is then still in place."""
    final = meta_name(meta.id)
    tmp = meta_temp_name(meta.id)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dir_fd)  # a leftover of a crash: ours (the dir is locked)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        data = meta.to_json()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def read_meta(dir_fd: int, block_id: str) -> BlockMeta:
    """Read and check ``ID.meta``; :class:`BadMetadata` (or ``OSError``) when unusable."""
    fd = os.open(
        meta_name(block_id),
        os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
        dir_fd=dir_fd,
    )
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BadMetadata("the metadata is not a regular file")
        if st.st_size > MAX_META_BYTES:
            raise BadMetadata(f"the metadata is larger than {MAX_META_BYTES} bytes")
        text = os.pread(fd, MAX_META_BYTES + 1, 0)
    finally:
        os.close(fd)
    return BlockMeta.from_json(text, block_id)


def remove_meta(dir_fd: int, block_id: str) -> None:
    """Delete ``ID.meta`` (absent is fine)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(meta_name(block_id), dir_fd=dir_fd)


__all__ = [
    "META_SUFFIX",
    "BadMetadata",
    "BlockMeta",
    "is_leftover",
    "meta_name",
    "meta_temp_name",
    "read_meta",
    "remove_meta",
    "temp_name",
    "write_meta",
]
