"""Readers of /proc for tests: mappings, their VmFlags and sizes, and RSS."""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass, field

#: ``madvise`` advice (Linux 6.1+), not in Python 3.11's mmap module.
MADV_COLLAPSE = 25
MAP_FIXED = 0x10
PMD = 2 << 20


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    flags: set[str] = field(default_factory=set)
    #: The file mapped (or ``[heap]``...), empty for anonymous memory.
    name: str = ""
    #: The smaps sizes in bytes: ``Rss``, ``ShmemPmdMapped``...
    sizes: dict[str, int] = field(default_factory=dict)


def mappings(pid: int | str = "self") -> list[Mapping]:
    """Every VMA of ``pid`` from ``/proc/PID/smaps``, with its ``VmFlags`` and sizes."""
    out: list[Mapping] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = head.split("-")
                fields = line.split(None, 5)
                name = fields[5].strip() if len(fields) > 5 else ""
                out.append(Mapping(int(lo, 16), int(hi, 16), fields[1], name=name))
            elif head == "VmFlags:":
                out[-1].flags = set(line.split()[1:])
            elif line.endswith(" kB\n"):
                out[-1].sizes[head.rstrip(":")] = int(line.split()[1]) * 1024
    return out


def shmem_collapse_works() -> bool:
    """Whether this kernel makes a transparent huge page of a memfd's pages on
    ``MADV_COLLAPSE`` (6.1+; shmem THP not ``deny``): tried on a throwaway memfd, mapped
    here 2 MiB-aligned at file offset 0, and read back from this process's smaps."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fd = os.memfd_create("ramd-test-thp")
    area = libc.mmap(None, 2 * PMD, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    try:
        os.ftruncate(fd, PMD)
        base = -(-area // PMD) * PMD
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        if libc.mmap(base, PMD, rw, mmap.MAP_SHARED | MAP_FIXED, fd, 0) != base:
            return False
        ctypes.c_char.from_address(base).value = b"\1"
        if libc.madvise(base, PMD, MADV_COLLAPSE) != 0:
            return False
        vma = next(v for v in mappings() if v.start == base)
        return vma.sizes.get("ShmemPmdMapped", 0) == PMD
    finally:
        libc.munmap(area, 2 * PMD)
        os.close(fd)


def covering(start: int, end: int, pid: int | str = "self") -> list[Mapping]:
    """The VMAs overlapping ``[start, end)``, clipped to it, in address order."""
    res = []
    for m in mappings(pid):
        if m.end > start and m.start < end:
            res.append(Mapping(max(m.start, start), min(m.end, end), m.perms, m.flags))
    return res


def rss_bytes(pid: int | str = "self") -> int:
    """VmRSS of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(("MemTotal:",)):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def swap_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    return 0


PAGE = os.sysconf("SC_PAGESIZE")
