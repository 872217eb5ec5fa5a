"""Readers of /proc for tests: mappings, their VmFlags, and RSS."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    flags: set[str] = field(default_factory=set)


def mappings(pid: int | str = "self") -> list[Mapping]:
    """Every VMA of ``pid`` from ``/proc/PID/smaps``, with its ``VmFlags``."""
    out: list[Mapping] = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = head.split("-")
                out.append(Mapping(int(lo, 16), int(hi, 16), line.split()[1]))
            elif head == "VmFlags:":
                out[-1].flags = set(line.split()[1:])
    return out


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
