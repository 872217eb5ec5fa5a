"""``RamBlockInfo`` as JSON, kept up to date by a RAM block notifier, so that answering
``query-ram-blocks`` with 16,384 blocks costs a few copies, not 16,384 encodings.

:class:`BlockInfoCache` holds each block's encoded info in creation order, in two variants:
with ``host`` (full-access peers) and without it (read-only peers, who have no use for the
daemon's addresses), and the whole listing until the next change. The JSON of a block changes
when its size or its holders do (every other field is fixed at add time). ``resident`` is never
cached: it is a scan of the block's pages, computed only when asked for
(:func:`with_resident`).

The text is ASCII-only JSON bytes (``ensure_ascii``), so both dialects splice it into their
messages as is. Loop thread only (notifiers run there).
"""

from __future__ import annotations

import json
from typing import Any

from ramd.api.models import RamBlockInfo
from ramd.ramblock import RAMBlock

_dumps = json.JSONEncoder(separators=(",", ":")).encode

#: The wire names of ``RamBlockInfo`` and the block attributes they come from, in order.
_FIELDS = tuple(
    (f.alias or name, name) for name, f in RamBlockInfo.model_fields.items() if name != "resident"
)


#: Fields only full-access peers see.
_PRIVATE = frozenset({"host", "holders"})


def _encode(block: RAMBlock, size: int, with_host: bool) -> bytes:
    info: dict[str, Any] = {}
    for wire, attr in _FIELDS:
        if attr == "size":
            value: Any = size
        elif attr == "holders":
            value = list(block.holder_list)
        else:
            value = getattr(block, attr)
        if value is not None and (with_host or attr not in _PRIVATE):
            info[wire] = value
    return _dumps(info).encode("ascii")


class BlockInfoCache:
    """A RAM block notifier that keeps every block's ``RamBlockInfo`` encoded.

    Invariant: ``_infos`` has one entry per block of the RAM list it is registered on, in
    creation order, encoded at the block's current size (a shrink is notified before the
    block takes its new size, so entries are encoded from the notified sizes).
    """

    def __init__(self) -> None:
        self._infos: dict[str, tuple[bytes, bytes]] = {}
        #: The size each entry was encoded at: the last one notified.
        self._sizes: dict[str, int] = {}
        #: The listing with and without ``host``, until the next change.
        self._listing: list[bytes | None] = [None, None]

    def added(self, block: RAMBlock) -> None:
        self._set(block, block.size)

    def resized(self, block: RAMBlock, old_size: int, new_size: int) -> None:
        self._set(block, new_size)

    def removed(self, block: RAMBlock) -> None:
        del self._infos[block.id]
        del self._sizes[block.id]
        self._listing = [None, None]

    def _set(self, block: RAMBlock, size: int) -> None:
        self._infos[block.id] = (_encode(block, size, True), _encode(block, size, False))
        self._sizes[block.id] = size
        self._listing = [None, None]

    def refresh(self, block: RAMBlock) -> None:
        """Encode ``block`` again at its last notified size (its holders changed)."""
        size = self._sizes.get(block.id)
        if size is not None:
            self._set(block, size)

    def info(self, block: RAMBlock, with_host: bool) -> bytes:
        """One block's ``RamBlockInfo`` (encoded now if the block is between a notified
        removal and its release)."""
        pair = self._infos.get(block.id)
        if pair is None:
            return _encode(block, block.size, with_host)
        return pair[0 if with_host else 1]

    def infos(self, with_host: bool) -> list[bytes]:
        """Every block's ``RamBlockInfo``, in creation order."""
        i = 0 if with_host else 1
        return [pair[i] for pair in self._infos.values()]

    def listing(self, with_host: bool) -> bytes:
        """The JSON array of every block's ``RamBlockInfo``, in creation order."""
        i = 0 if with_host else 1
        listing = self._listing[i]
        if listing is None:
            listing = self._listing[i] = json_list(self.infos(with_host))
        return listing


def with_resident(text: bytes, resident: int) -> bytes:
    """``text`` (one block's JSON object) with a ``resident`` member added."""
    return b'%s,"resident":%d}' % (text[:-1], resident)


def json_list(texts: list[bytes]) -> bytes:
    """The JSON array of ``texts``."""
    return b"[" + b",".join(texts) + b"]"
