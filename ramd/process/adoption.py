"""Adoption at start: the blocks an earlier daemon left behind become blocks again
(docs/protocol.md §9), before any config block is created and before the socket accepts.

- ``file`` blocks: every entry ``ID`` of ``memory-dir`` that has its metadata ``ID.meta``
  (:mod:`ramd.hostmem.blockmeta`) is mapped again with its contents, in creation order.
  The directory is opened and locked (:mod:`ramd.hostmem.dirlock`) as soon as it holds any
  entry not starting with ``.``; an empty or missing ``memory-dir`` is left alone until the
  first ``file`` block, so daemons that use no ``file`` blocks never contend for the lock.
- ``memfd`` blocks come back from systemd's fd store (:mod:`ramd.process.fdstore`).

Whatever cannot be adopted (no or bad metadata, a file whose length does not fit the
metadata, not a regular file, a symbolic link) is logged and left untouched, never deleted.
The only entries ever removed are the daemon's own temporary files a crash left
(``.ID.new``, ``.ID.meta.tmp``: :func:`~ramd.hostmem.blockmeta.is_leftover`), once the
directory is locked, and only when they are regular files. Names are logged with their
non-printable characters escaped.

Config blocks whose id was adopted (:func:`kept_config_blocks`): the adopted block wins
if it matches the ``[[block]]`` (same backend, resizable or not, the same ``max-size``, or the
same ``size`` when not resizable); otherwise the start fails with a config error naming the
block, so a changed configuration never silently replaces kept memory.

Thread: the event-loop thread, at start-up.
"""

from __future__ import annotations

import logging
import os
import re
import stat

from ramd.config import BlockConfig, ConfigError
from ramd.hostmem.blockmeta import META_SUFFIX, BadMetadata, BlockMeta, is_leftover, read_meta
from ramd.hostmem.shared import FileMemory
from ramd.ids import ID_PATTERN
from ramd.ramblock import RAMList

log = logging.getLogger(__name__)

_ID_RE = re.compile(ID_PATTERN)


def adopt_memory_dir(ram: RAMList, max_used: int = 0) -> list[str]:
    """Adopt every ``file`` block of ``ram.memory_dir``; the ids adopted.

    ``max_used`` (``[limits] max-used``; 0: none): a block that would take the blocks' total
    size past it is not adopted (logged, its files left untouched), like an add would be
    refused; the blocks are taken in creation order, so the oldest are kept.

    Raises ``OSError`` (``MemoryDirInUse`` naming the holder's pid) when the directory
    holds entries but cannot be opened or locked: the daemon then exits 1.
    """
    try:
        names = os.listdir(ram.memory_dir)
    except FileNotFoundError:
        return []
    if all(name.startswith(".") and not is_leftover(name) for name in names):
        return []
    dir_fd = ram.open_memory_dir()
    listed = os.listdir(dir_fd)
    for name in listed:
        if is_leftover(name):
            _remove_leftover(dir_fd, name)
    names = sorted(n for n in listed if not n.startswith("."))
    present = set(names)
    blocks = [n for n in names if _is_id(n) and n + META_SUFFIX in present]
    for name in names:
        if name in blocks or (name.endswith(META_SUFFIX) and name[: -len(META_SUFFIX)] in blocks):
            continue
        what = "metadata without its block file" if name.endswith(META_SUFFIX) else "no metadata"
        log.warning("memory-dir: '%s' not adopted (%s): left untouched", _printable(name), what)
    found = []
    for name in blocks:
        try:
            found.append(_open(dir_fd, ram.memory_dir, name))
        except (OSError, BadMetadata) as e:
            log.warning("memory-dir: '%s' not adopted (%s): left untouched", _printable(name), e)
    adopted = []
    for mem, meta in sorted(found, key=lambda pair: (pair[1].created, pair[1].id)):
        if max_used and ram.used + meta.size > max_used:
            mem.free()
            log.warning(
                "memory-dir: '%s' not adopted (0x%x bytes: max-used is %d, %d used):"
                " left untouched",
                meta.id,
                meta.size,
                max_used,
                ram.used,
            )
            continue
        try:
            ram.adopt(mem, meta)
        except Exception as e:  # a RamdError, or the kernel refusing the mapping
            log.warning("memory-dir: '%s' not adopted (%s): left untouched", meta.id, e)
            continue
        log.info("memory-dir: adopted RAM block '%s' (0x%x bytes)", meta.id, meta.size)
        adopted.append(meta.id)
    return adopted


def _remove_leftover(dir_fd: int, name: str) -> None:
    """Remove a temporary file a crashed daemon left (the directory is locked: no other
    daemon is writing it). Only a regular file is removed; ``unlink`` never follows a link."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            log.warning("memory-dir: '%s' is not a regular file: left untouched", name)
            return
        os.unlink(name, dir_fd=dir_fd)
    except OSError as e:
        log.warning("memory-dir: cannot remove '%s': %s", name, e)
        return
    log.info("memory-dir: removed '%s', left by an interrupted write", name)


def _printable(name: str) -> str:
    """``name`` for the log: every byte outside printable ASCII (and ``\\``) as ``\\xNN``,
    so a file name cannot forge log lines or terminal escapes."""
    raw = os.fsencode(name)
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw)


def _is_id(name: str) -> bool:
    return _ID_RE.match(name) is not None


def _open(dir_fd: int, dir_path: str, name: str) -> tuple[FileMemory, BlockMeta]:
    """Open block file ``name`` for adoption, with its metadata sized to the file (see the
    size rule of :mod:`ramd.hostmem.blockmeta`); ``OSError``/``BadMetadata`` otherwise."""
    meta = read_meta(dir_fd, name)
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise BadMetadata("a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise BadMetadata("not a regular file")
    mem = FileMemory(dir_fd, dir_path, name, existing=True)
    length = mem.adopted_length
    try:
        if mem.page_size != meta.page_size:
            raise BadMetadata(f"page size 0x{mem.page_size:x} != 0x{meta.page_size:x}")
        if not meta.size <= length <= meta.max_size or length % meta.page_size:
            raise BadMetadata(
                f"size mismatch: the file is 0x{length:x} bytes, the metadata says 0x"
                f"{meta.size:x} (max-size 0x{meta.max_size:x})"
            )
    except BaseException:
        mem.free()
        raise
    if length != meta.size:
        log.info(
            "memory-dir: '%s' is 0x%x bytes, its metadata 0x%x (a resize was interrupted):"
            " the block takes the file's length",
            name,
            length,
            meta.size,
        )
    mem.meta = meta
    return mem, meta.with_size(length)


def kept_config_blocks(ram: RAMList, blocks: list[BlockConfig]) -> frozenset[str]:
    """The ids of ``[[block]]`` entries that an adopted block stands for (not to create).

    Raises ``ConfigError`` naming the first entry whose adopted block does not match it.
    """
    kept = set()
    for i, cfg in enumerate(blocks):
        if cfg.id not in ram:
            continue
        block = ram.get(cfg.id)
        page = block.page_size

        def aligned(n: int, page: int = page) -> int:
            return (n + page - 1) // page * page

        resizable = cfg.max_size is not None
        matches = (
            cfg.backend == block.backend
            and resizable == block.resizable
            and (
                aligned(cfg.max_size) == block.max_size
                if cfg.max_size is not None
                else aligned(cfg.size) == block.size
            )
        )
        if not matches:
            raise ConfigError(
                f"config: block[{i}]: RAM block '{cfg.id}' was kept from an earlier run"
                f" (backend {block.backend}, size 0x{block.size:x}, max-size"
                f" 0x{block.max_size:x}) and does not match this entry; delete it or change"
                " the entry"
            )
        log.info("config: block[%d]: RAM block '%s' kept from an earlier run", i, cfg.id)
        kept.add(cfg.id)
    return frozenset(kept)


__all__ = ["adopt_memory_dir", "kept_config_blocks"]
