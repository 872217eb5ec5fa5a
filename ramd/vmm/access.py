"""Access of a VMM's uid to a block's file: a POSIX ACL entry ``user:UID:rw-`` (protocol.md §8).

A block's file (memfd or ``file``) belongs to the daemon's uid; a VMM running as another uid
must reopen ``/proc/self/fd/N`` to map it (QEMU does), and the kernel checks the inode's
permissions then. :func:`grant` adds a named-user entry to the file's access ACL (the
``system.posix_acl_access`` extended attribute, on the fd: no path is involved) and
:func:`revoke` removes it again; the other entries are kept, the mask is recomputed, and an
ACL left with no named entry goes back to plain mode bits (the kernel drops the attribute).

Interim: the block layer's holder registry will grant and revoke access for every kind of
holder (mappers, leases, VMMs), counting the holdings of each uid; this module then gives way
to it. Until then a block has at most one VMM, so one grant per block needs no count.
"""

from __future__ import annotations

import errno
import os
import struct

XATTR = "system.posix_acl_access"
_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
READ_WRITE = 6

Acl = dict[tuple[int, int], int]


def _read(fd: int) -> Acl:
    """The file's access ACL as ``{(tag, id): perm}`` (from its mode bits when it has none)."""
    try:
        raw = os.getxattr(fd, XATTR)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise
        mode = os.fstat(fd).st_mode
        return {
            (USER_OBJ, _NO_ID): (mode >> 6) & 7,
            (GROUP_OBJ, _NO_ID): (mode >> 3) & 7,
            (OTHER, _NO_ID): mode & 7,
        }
    (version,) = _HEADER.unpack_from(raw)
    if version != _VERSION or (len(raw) - _HEADER.size) % _ENTRY.size:
        raise OSError(errno.EINVAL, "unexpected POSIX ACL format")
    acl: Acl = {}
    for tag, perm, ident in _ENTRY.iter_unpack(raw[_HEADER.size :]):
        acl[(tag, ident)] = perm
    return acl


def _write(fd: int, acl: Acl) -> None:
    named = [perm for (tag, _), perm in acl.items() if tag in (USER, GROUP)]
    acl.pop((MASK, _NO_ID), None)
    if named:
        mask = acl[(GROUP_OBJ, _NO_ID)]
        for perm in named:
            mask |= perm
        acl[(MASK, _NO_ID)] = mask
    body = b"".join(_ENTRY.pack(tag, perm, ident) for (tag, ident), perm in sorted(acl.items()))
    os.setxattr(fd, XATTR, _HEADER.pack(_VERSION) + body)


def grant(fd: int, uid: int) -> bool:
    """Give ``uid`` read-write access to the file of ``fd``; False when nothing was needed
    (``uid`` owns the file). OSError when the file system refuses ACLs."""
    if os.fstat(fd).st_uid == uid:
        return False
    acl = _read(fd)
    acl[(USER, uid)] = READ_WRITE
    _write(fd, acl)
    return True


def revoke(fd: int, uid: int) -> None:
    """Take back what :func:`grant` gave ``uid``."""
    acl = _read(fd)
    if acl.pop((USER, uid), None) is not None:
        _write(fd, acl)
