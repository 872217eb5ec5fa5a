"""Attachments recorded with their block, so a restarted daemon can resume them
(docs/protocol.md §13).

A ``file`` block ``ID`` attached to a VMM has the record ``.ID.vmm`` beside its file in
``memory-dir`` (a name starting with ``.``: the daemon's own, never taken for a block by
adoption)::

    {"format": "ramd-attachment", "version": 1, "qmp": PATH, "as": KIND, "device": NAME,
     "vmm-pid": PID, "fdset-id": N, "fd": N}

A ``memfd`` block's record is the name of an entry in systemd's fd store (when
``$NOTIFY_SOCKET`` is set, as for the block itself: :mod:`ramd.fdstore`)::

    vmm,ID,DEVICE,KIND,PID,FDSET,FD,QMP

(``,``-separated: ids and QEMU device names cannot contain one, and the QMP path, which may,
is last; an ``FDNAME`` has no ``:``, at most 255 characters: a record that does not fit is
not made, logged). The fd stored under it is an empty memfd of its own (systemd keeps one
entry per distinct file). On the next start the service manager passes it back like the
blocks: :func:`take_stored` takes these entries out of the passed fds (closing their fds).

A record is written when an attach succeeds and removed when the attachment ends (detached,
or the VMM exited); a daemon that stops leaves it, and the next one reads it (:func:`load`)
after adopting the block. File records are written to ``.ID.vmm.tmp`` and renamed over the
record, so a reader sees a whole record or none. Blocks of other backends have no record.

Thread: the loop thread (the records are small; the memory-dir is the daemon's, locked).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ramd.process import systemd
from ramd.ramblock import RAMBlock

log = logging.getLogger(__name__)

FORMAT = "ramd-attachment"
VERSION = 1
#: Longest record read (anything larger is not a record).
MAX_BYTES = 16 * 1024
#: Prefix of an fd store entry that is an attachment record.
STORE_PREFIX = "vmm,"
#: Longest ``FDNAME`` systemd takes.
FDNAME_MAX = 255


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

    def store_name(self, block_id: str) -> str:
        """The fd store entry's name of this record for block ``block_id``."""
        fields = (block_id, self.device, self.kind, self.vmm_pid, self.fdset_id, self.fd)
        return STORE_PREFIX + ",".join(map(str, fields)) + "," + self.qmp

    @classmethod
    def from_store_name(cls, name: str) -> tuple[str, Record]:
        """The block id and the record of an fd store entry; ``ValueError`` if not one."""
        fields = name.removeprefix(STORE_PREFIX).split(",", 6)
        if not name.startswith(STORE_PREFIX) or len(fields) != 7:
            raise ValueError(f"not an attachment record: {name!r}")
        block_id, device, kind, pid, fdset, fd, qmp = fields
        if not (block_id and device and kind and qmp):
            raise ValueError(f"not an attachment record: {name!r}")
        if not all(v.isdecimal() for v in (pid, fdset, fd)):
            raise ValueError(f"not an attachment record: {name!r}")
        return block_id, cls(qmp, kind, device, int(pid), int(fdset), int(fd))


def take_stored(passed: list[tuple[int, str]]) -> tuple[list[tuple[int, str]], dict[str, Record]]:
    """Split the fds the service manager passed (``(fd, name)``): the records among them
    (their fds closed), by block id, and the rest. An entry that is not a valid record is
    dropped from the store."""
    rest: list[tuple[int, str]] = []
    found: dict[str, Record] = {}
    for fd, name in passed:
        if not name.startswith(STORE_PREFIX):
            rest.append((fd, name))
            continue
        os.close(fd)
        try:
            block_id, rec = Record.from_store_name(name)
        except ValueError as e:
            log.warning("fd store: %s: dropped", e)
            systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
            continue
        found[block_id] = rec
    return rest, found


def forget_stored(block_id: str, rec: Record) -> None:
    """Drop a record that :func:`take_stored` found from the fd store."""
    systemd.notify(f"FDSTOREREMOVE=1\nFDNAME={rec.store_name(block_id)}")


def _store(block: RAMBlock, rec: Record) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    name = rec.store_name(block.id)
    if len(name) > FDNAME_MAX or ":" in name or not name.isprintable() or not name.isascii():
        log.warning(
            "RAM block '%s': its attachment cannot be recorded in the fd store (QMP path %r):"
            " it will not be resumed after a restart",
            block.id,
            rec.qmp,
        )
        return
    carrier = os.memfd_create(f"ramd-vmm:{block.id}", os.MFD_CLOEXEC)
    try:
        systemd.notify(f"FDSTORE=1\nFDNAME={name}", fds=[carrier])
    finally:
        os.close(carrier)


def _path(block: RAMBlock) -> str | None:
    if block.backend != "file" or block.path is None:
        return None
    directory, name = os.path.split(block.path)
    return os.path.join(directory, f".{name}.vmm")


def save(block: RAMBlock, record: Record) -> None:
    """Record ``block``'s attachment (beside a ``file`` block, in the fd store for a
    ``memfd`` block; nothing otherwise). A failure is logged: the attachment works, it only
    cannot be resumed after a restart."""
    if block.backend == "memfd":
        _store(block, record)
        return
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
    """A ``file`` block's recorded attachment, or None (none, or unreadable: logged)."""
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
        _unlink(block, path)
        return None
    finally:
        os.close(fd)


def remove(block: RAMBlock, record: Record) -> None:
    """Forget ``block``'s recorded attachment ``record`` (absent is fine)."""
    if block.backend == "memfd":
        if os.environ.get("NOTIFY_SOCKET"):
            forget_stored(block.id, record)
        return
    path = _path(block)
    if path is None:
        return
    _unlink(block, path)


def _unlink(block: RAMBlock, path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("RAM block '%s': cannot remove its attachment record: %s", block.id, e)


__all__ = ["Record", "forget_stored", "load", "remove", "save", "take_stored"]
