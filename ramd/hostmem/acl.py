"""POSIX access ACLs on a block file: who, besides its owner, may open it (docs/protocol.md §8).

Block files (memfd and ``file``) are mode 0600, owned by the daemon's uid. A peer of another
uid that holds a block gets a named-user entry matching its fd (``r--`` or ``rw-``), so that
opening ``/proc/self/fd/N`` (QEMU does) works for it and never gives more than its fd. The
ACL is the kernel's ``system.posix_acl_access`` extended attribute, set on the fd itself
(``fsetxattr``), in the kernel's binary form:

    u32 version (2), then per entry: u16 tag, u16 perm, u32 id    (little-endian)

with the entries sorted by tag, named users by uid, and a mask entry whenever there is a
named entry. An ACL of the three base entries only is the mode itself: setting it removes
the attribute and leaves the mode 0600 (:func:`set_users` with no users).

Always able to open the file, whatever the ACL says: the daemon's own uid (the owner) and
root (``CAP_DAC_OVERRIDE``). Needs a filesystem with POSIX ACLs: tmpfs and memfd on a kernel
built with ``CONFIG_TMPFS_POSIX_ACL``; hugetlbfs (``MFD_HUGETLB``, or a hugetlbfs
``memory-dir``) has none: :func:`set_users` then answers False and the file stays 0600, so a
peer of another uid can map the fd it was given but cannot reopen it.

Nothing here keeps state (see :mod:`.grants`); any thread.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

#: The extended attribute that holds a file's access ACL.
XATTR = "system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
#: The id of entries that name nobody (owner, owning group, mask, other).
UNDEFINED_ID = 0xFFFFFFFF
READ, WRITE = 4, 2
#: Largest ACL decoded (the kernel's own limit is far below this).
MAX_ENTRIES = 4096

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_TAGS = (USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER)


class BadAcl(ValueError):
    """Bytes that are not a well-formed access ACL."""


@dataclass(frozen=True)
class Acl:
    """An access ACL: base permissions (``rwx`` bits 0-7) and named users and groups."""

    owner: int = READ | WRITE
    group: int = 0
    other: int = 0
    users: Mapping[int, int] = field(default_factory=dict)
    groups: Mapping[int, int] = field(default_factory=dict)
    #: The mask; None when there is none (allowed only without named entries).
    mask: int | None = None


def user_acl(users: Mapping[int, bool]) -> Acl:
    """The ACL of a block file: owner ``rw-``, nobody else but ``users`` (uid → writable),
    each ``rw-`` or ``r--``; the mask is the union of the named entries."""
    perms = {uid: READ | WRITE if writable else READ for uid, writable in users.items()}
    mask = 0
    for perm in perms.values():
        mask |= perm
    return Acl(users=perms, mask=mask if perms else None)


def encode(acl: Acl) -> bytes:
    """The kernel's binary form of ``acl`` (entries in the order the kernel requires)."""
    entries = [(USER_OBJ, acl.owner, UNDEFINED_ID)]
    entries += [(USER, perm, uid) for uid, perm in sorted(acl.users.items())]
    entries.append((GROUP_OBJ, acl.group, UNDEFINED_ID))
    entries += [(GROUP, perm, gid) for gid, perm in sorted(acl.groups.items())]
    if acl.mask is not None:
        entries.append((MASK, acl.mask, UNDEFINED_ID))
    entries.append((OTHER, acl.other, UNDEFINED_ID))
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def decode(data: bytes) -> Acl:
    """Parse the binary form; :class:`BadAcl` when malformed (wrong version or length,
    a base entry missing or repeated, entries out of order, named entries without a mask)."""
    if len(data) < _HEADER.size or (len(data) - _HEADER.size) % _ENTRY.size:
        raise BadAcl(f"bad length {len(data)}")
    if _HEADER.unpack_from(data)[0] != VERSION:
        raise BadAcl("unsupported version")
    count = (len(data) - _HEADER.size) // _ENTRY.size
    if count > MAX_ENTRIES:
        raise BadAcl(f"more than {MAX_ENTRIES} entries")
    base: dict[int, int] = {}
    named: dict[int, dict[int, int]] = {USER: {}, GROUP: {}}
    last = (-1, -1)
    for i in range(count):
        tag, perm, ident = _ENTRY.unpack_from(data, _HEADER.size + i * _ENTRY.size)
        if tag not in _TAGS or perm & ~7:
            raise BadAcl(f"bad entry {i}")
        key = (_TAGS.index(tag), ident if tag in named else -1)
        if key <= last:
            raise BadAcl(f"entry {i} out of order or repeated")
        last = key
        if tag in named:
            named[tag][ident] = perm
        else:
            base[tag] = perm
    if any(t not in base for t in (USER_OBJ, GROUP_OBJ, OTHER)):
        raise BadAcl("a base entry is missing")
    if (named[USER] or named[GROUP]) and MASK not in base:
        raise BadAcl("named entries without a mask")
    return Acl(
        base[USER_OBJ], base[GROUP_OBJ], base[OTHER], named[USER], named[GROUP], base.get(MASK)
    )


def set_users(fd: int, users: Mapping[int, bool]) -> bool:
    """Make the ACL of the file behind ``fd`` :func:`user_acl` ``(users)``; with no users,
    the file is mode 0600 with no ACL. Returns False when the filesystem has no POSIX ACLs
    (then only the mode is set: 0600, nobody else may open it); other failures raise
    ``OSError``."""
    try:
        os.setxattr(fd, XATTR, encode(user_acl(users)))
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        os.fchmod(fd, 0o600)
        return False
    return True


def get(fd: int) -> Acl:
    """The ACL of the file behind ``fd`` (its mode's, when it has no ACL attribute)."""
    try:
        return decode(os.getxattr(fd, XATTR))
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
    mode = os.fstat(fd).st_mode
    return Acl((mode >> 6) & 7, (mode >> 3) & 7, mode & 7)


__all__ = ["XATTR", "Acl", "BadAcl", "decode", "encode", "get", "set_users", "user_acl"]
