"""Attachments recorded with their block, so a restarted daemon can resume them (protocol.md §13).

A ``file`` block ``ID`` attached to a VMM has the record ``.ID.vmm`` beside its file in
``memory-dir`` (a name starting with ``.``: the daemon's own, never taken for a block by
adoption)::

    {"format": "ramd-attachment", "version": 1, "qmp": PATH, "as": KIND, "device": NAME,
     "vmm-pid": PID, "fdset-id": N, "fd": N}

It is written when an attach succeeds and removed when the attachment ends (detached, or the
VMM exited); a daemon that stops leaves it, and the next one reads it (:func:`load`) after
adopting the block. Writes go to ``.ID.vmm.tmp`` and are renamed over the record, so a reader
sees a whole record or none. Blocks of other backends have no record (a ``memfd`` block's
attachment is not resumed).

Thread: the loop thread (the records are small; the memory-dir is the daemon's, locked).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ramd.ramblock import RAMBlock

log = logging.getLogger(__name__)

FORMAT = "ramd-attachment"
VERSION = 1
#: Longest record read (anything larger is not a record).
MAX_BYTES = 16 * 1024


@dataclass(frozen=True)
class Record:
    """What resuming an attachment needs: where the VMM is, what ramd made in it."""

    qmp: str
    kind: str
    device: str
    vmm_pid: int
    fdset_id: int
    fd: int

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "qmp": self.qmp,
                "as": self.kind,
                "device": self.device,
                "vmm-pid": self.vmm_pid,
                "fdset-id": self.fdset_id,
                "fd": self.fd,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, text: bytes) -> Record:
        """Parse a record; ``ValueError`` when it is not one."""
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"not {FORMAT} data")
        if doc.get("version") != VERSION:
            raise ValueError(f"unsupported version {doc.get('version')!r}")
        strings = [doc.get(k) for k in ("qmp", "as", "device")]
        ints = [doc.get(k) for k in ("vmm-pid", "fdset-id", "fd")]
        if not all(isinstance(v, str) and v for v in strings):
            raise ValueError("qmp, as or device missing")
        if not all(type(v) is int and v >= 0 for v in ints):
            raise ValueError("vmm-pid, fdset-id or fd not a non-negative integer")
        qmp, kind, device = (str(v) for v in strings)
        pid, fdset, fd = (int(v) for v in ints if type(v) is int)
        return cls(qmp, kind, device, pid, fdset, fd)


def _path(block: RAMBlock) -> str | None:
    if block.backend != "file" or block.path is None:
        return None
    directory, name = os.path.split(block.path)
    return os.path.join(directory, f".{name}.vmm")


def save(block: RAMBlock, record: Record) -> None:
    """Record ``block``'s attachment (nothing for a block that is not a ``file`` block). A
    failure is logged: the attachment works, it only cannot be resumed after a restart."""
    path = _path(block)
    if path is None:
        return
    tmp = path + ".tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, record.to_json())
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        log.warning("RAM block '%s': cannot record its attachment in %s: %s", block.id, path, e)


def load(block: RAMBlock) -> Record | None:
    """``block``'s recorded attachment, or None (none, or unreadable: logged)."""
    path = _path(block)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("RAM block '%s': cannot read its attachment record: %s", block.id, e)
        return None
    try:
        text = os.read(fd, MAX_BYTES + 1)
        if len(text) > MAX_BYTES:
            raise ValueError(f"longer than {MAX_BYTES} bytes")
        return Record.from_json(text)
    except (OSError, ValueError) as e:
        log.warning("RAM block '%s': attachment record %s ignored: %s", block.id, path, e)
        remove(block)
        return None
    finally:
        os.close(fd)


def remove(block: RAMBlock) -> None:
    """Forget ``block``'s recorded attachment (absent is fine)."""
    path = _path(block)
    if path is None:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("RAM block '%s': cannot remove its attachment record: %s", block.id, e)


__all__ = ["Record", "load", "remove", "save"]
