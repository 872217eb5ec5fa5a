"""``memfd`` blocks in systemd's fd store, so a restart of the unit loses none
(docs/protocol.md §9).

systemd gives no explicit signal that the store is enabled (``FileDescriptorStoreMax=`` in
the unit); when ``$NOTIFY_SOCKET`` is set the daemon pushes each new ``memfd`` block with
``FDSTORE=1`` and ``FDNAME=NAME`` (the memfd sent as ``SCM_RIGHTS``) and removes it with
``FDSTOREREMOVE=1`` at ``ram-block-del``; without a store, systemd just drops the fds. On
the next start systemd passes the stored fds back like sockets (``LISTEN_FDS``,
``LISTEN_FDNAMES``); names starting ``ram.`` are blocks, everything else a socket.

``NAME`` carries what ``fstat`` of the memfd cannot give (its length is the block's size,
the page size comes from the fd): ``ram.MAX.FLAGS.ID``, where ``MAX`` is ``max-size`` in hex
(``-`` when not resizable), ``FLAGS`` the settings that differ from the defaults (``h``
hugetlb, ``p`` prealloc, ``n`` no dump, ``l`` lock; ``-`` for none) and ``ID`` the block id
(last, since an id may contain dots). At most 6 + 16 + 4 + 64 < 255 characters, all valid
in an ``FDNAME``. Blocks pushed by this daemon stay in the store at shutdown (that is the
point); adopted blocks are already there and are not pushed again.

Thread: the event-loop thread (like :func:`ramd.process.systemd.notify`).
"""

from __future__ import annotations

import logging
import os
import re
import stat

from ramd import blocksettings
from ramd.hostmem.blockmeta import BlockMeta
from ramd.hostmem.mmap_alloc import mmap_pagesize
from ramd.hostmem.shared import MemfdMemory
from ramd.ids import ID_PATTERN
from ramd.process import systemd
from ramd.ramblock import RAMBlock, RAMList

log = logging.getLogger(__name__)

PREFIX = "ram."
_FLAGS = tuple((s.letter, s.name, s.default) for s in blocksettings.KEPT)
_LETTERS = "".join(letter for letter, _, _ in _FLAGS)
_NAME_RE = re.compile(
    rf"ram\.(-|[0-9a-f]{{1,16}})\.([{_LETTERS}]{{1,{len(_LETTERS)}}}|-)\.({ID_PATTERN.strip('^$')})"
)


def is_block_name(name: str) -> bool:
    """A name of a passed fd that is a block (as opposed to a socket)."""
    return name.startswith(PREFIX)


def fd_name(block: RAMBlock) -> str:
    """The ``FDNAME`` of ``block`` (see the module docstring)."""
    values = blocksettings.kept_of(block)
    flags = "".join(letter for letter, key, default in _FLAGS if values[key] != default)
    size = f"{block.max_size:x}" if block.resizable else "-"
    return f"{PREFIX}{size}.{flags or '-'}.{block.id}"


def push(block: RAMBlock) -> None:
    """Hand a new ``memfd`` block's fd to the service manager's fd store (if any)."""
    if block.backend == "memfd" and os.environ.get("NOTIFY_SOCKET"):
        systemd.notify(f"FDSTORE=1\nFDNAME={fd_name(block)}", fds=[block.fd])


def forget(block: RAMBlock) -> None:
    """Take a deleted ``memfd`` block out of the fd store (if any)."""
    if block.backend == "memfd" and os.environ.get("NOTIFY_SOCKET"):
        systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={fd_name(block)}")


def adopt_stored(ram: RAMList, passed: list[tuple[int, str]], max_used: int = 0) -> list[str]:
    """Adopt the ``memfd`` blocks passed back from the fd store (``(fd, name)`` pairs, fds
    taken over); the ids adopted. One that cannot be adopted is logged and its fd closed
    (the store keeps it until a ``ram-block-del`` of that id or the unit's stop); so is one
    that would take the blocks' total size past ``max_used`` (``[limits] max-used``; 0:
    none), as an add would be refused."""
    adopted = []
    for fd, name in passed:
        m = _NAME_RE.fullmatch(name)
        if m is None:
            log.warning("fd store: '%s' is not a RAM block name: not adopted", name)
            os.close(fd)
            continue
        block_id = m.group(3)
        try:
            meta = _meta(fd, block_id, m.group(1), m.group(2))
        except (OSError, ValueError) as e:
            log.warning("fd store: RAM block '%s' not adopted: %s", block_id, e)
            os.close(fd)
            continue
        if max_used and ram.used + meta.size > max_used:
            log.warning(
                "fd store: RAM block '%s' not adopted (0x%x bytes: max-used is %d, %d used)",
                block_id,
                meta.size,
                max_used,
                ram.used,
            )
            os.close(fd)
            continue
        try:  # takes the fd over, closed on failure too
            mem = MemfdMemory(f"ramd:{block_id}", hugetlb="h" in m.group(2), fd=fd)
        except OSError as e:
            log.warning("fd store: RAM block '%s' not adopted: %s", block_id, e)
            continue
        mem.adopted_length = meta.size
        try:
            ram.adopt(mem, meta)
        except Exception as e:  # a RamdError, or the kernel refusing the mapping
            log.warning("fd store: RAM block '%s' not adopted: %s", block_id, e)
            continue
        log.info("fd store: adopted RAM block '%s' (0x%x bytes)", block_id, meta.size)
        adopted.append(block_id)
    return adopted


def _meta(fd: int, block_id: str, max_text: str, flags: str) -> BlockMeta:
    """The block's metadata from its fd and name; ``ValueError`` when they do not fit."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("not a regular file")
    size = st.st_size
    page = mmap_pagesize(fd)
    resizable = max_text != "-"
    max_size = int(max_text, 16) if resizable else size
    if size == 0 or size % page or max_size % page or size > max_size:
        raise ValueError(f"size 0x{size:x} does not fit max-size 0x{max_size:x}")
    settings = {key: (letter in flags) != default for letter, key, default in _FLAGS}
    return BlockMeta(block_id, size, max_size, resizable, page, settings)


__all__ = ["adopt_stored", "fd_name", "forget", "is_block_name", "push"]
