"""Memory bounds of the host, so that what clients ask for cannot take the host (or the
daemon) down: defaults for ``max-reserved`` and ``max-used``, and the checks made before a
block is added or grown.

- ``max-reserved`` 0 (the default) becomes half of the 47-bit user address space (64 TiB), or
  half of ``RLIMIT_AS`` when that is lower: the other half stays for the interpreter, its
  heap and the kernel's placement of mappings.
- ``max-used`` 0 (the default) becomes ``MemTotal + SwapTotal``, or, when lower, the memory
  cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, the lowest one on the way
  up to the root) less the daemon's own memory (:attr:`HostLimits.own`).
- Every add or grow is checked again against the cgroup limits as they are now (the daemon
  may have been moved, or the limit changed): the blocks' sizes plus the daemon's own
  memory must stay under each limit. An add or grow that faults its memory in at once
  (``prealloc``, ``lock``) must also fit in what the cgroup has available right now (limit
  less usage, page cache that can be dropped not counted), since other processes of the
  cgroup use it too.
- A ``lock`` add or grow without ``CAP_IPC_LOCK`` must fit under ``RLIMIT_MEMLOCK`` with what
  the process has locked already (``VmLck``); the kernel enforces no such limit on a process
  holding the capability.

Every check happens before memory is touched: a refusal leaves everything as it was.

Ownership and thread: a :class:`HostLimits` is created once at start-up (it records the
daemon's own size, its capabilities and the cgroup mounts) and used on the loop thread. It
re-reads the cgroup limits at most once a second, and the cgroup usage at each check that
faults memory in.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from ramd.config import Limits

#: The user address space of x86-64 and arm64 with 4-level page tables (47 bits); ``mmap``
#: without a hint never places a mapping above it, even with 5-level page tables.
USER_ADDRESS_SPACE = 1 << 47
#: Default ``max-reserved``: half of the user address space.
DEFAULT_MAX_RESERVED = USER_ADDRESS_SPACE // 2
#: Memory kept for the daemon's growth (connections, buffers) on top of its size at start.
SELF_SLACK = 64 << 20
#: Seconds for which :meth:`HostLimits.current_limits` reuses the cgroup limits it read.
CGROUP_RECHECK = 1.0
#: A cgroup v1 limit at or above this is "no limit" (the kernel reports about 2**63).
_V1_UNLIMITED = 1 << 62
#: Bit of ``CAP_IPC_LOCK`` in the capability sets of ``/proc/self/status``.
_CAP_IPC_LOCK = 14


@dataclass(frozen=True, slots=True)
class Refusal:
    """A limit a request would exceed: its name, its value, and the figures that exceed it."""

    name: str
    value: int
    detail: str


@dataclass(frozen=True, slots=True)
class CgroupLimit:
    """One memory cgroup on the way from the daemon's cgroup to the root that has a limit."""

    cgroup: str
    directory: Path
    version: int
    limit: int

    @property
    def limit_file(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"

    def available(self) -> int:
        """Bytes the cgroup can still charge now before it must reclaim or kill (its usage
        read now, less the page cache it can drop)."""
        if self.version == 2:
            usage = _read_int(self.directory / "memory.current") or 0
            reclaimable = _memory_stat(self.directory, "inactive_file")
        else:
            usage = _read_int(self.directory / "memory.usage_in_bytes") or 0
            reclaimable = _memory_stat(self.directory, "total_inactive_file")
        return self.limit - max(0, usage - reclaimable)


@dataclass(frozen=True, slots=True)
class _Mount:
    version: int
    root: str
    mountpoint: Path


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _status_field(name: str) -> str | None:
    """A field of ``/proc/self/status`` (the text after ``name:``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return None


def _status_bytes(name: str) -> int:
    value = _status_field(name)
    return int(value.split()[0]) * 1024 if value else 0


def meminfo_total() -> int:
    """``MemTotal + SwapTotal`` in bytes."""
    total = 0
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "SwapTotal"):
                total += int(rest.split()[0]) * 1024
    return total


def has_ipc_lock() -> bool:
    """Whether the process holds ``CAP_IPC_LOCK`` (then ``RLIMIT_MEMLOCK`` does not apply)."""
    value = _status_field("CapEff")
    return value is not None and bool(int(value, 16) >> _CAP_IPC_LOCK & 1)


def _cgroup_mounts() -> list[_Mount]:
    """The memory cgroup mounts: v1 hierarchies with the memory controller, and cgroup2."""
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, superopts = fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup2":
                mounts.append(_Mount(2, fields[3], Path(fields[4])))
            elif fstype == "cgroup" and "memory" in superopts:
                mounts.append(_Mount(1, fields[3], Path(fields[4])))
    return mounts


def _memory_stat(directory: Path, key: str) -> int:
    try:
        with open(directory / "memory.stat") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


class HostLimits:
    """The host's memory bounds as the daemon sees them (see the module docstring)."""

    def __init__(self) -> None:
        self._mounts = _cgroup_mounts()
        #: Memory counted for the daemon itself: its resident size now, plus a slack.
        self.own = _status_bytes("VmRSS") + SELF_SLACK
        #: Whether the kernel exempts this process from ``RLIMIT_MEMLOCK``.
        self.ipc_lock = has_ipc_lock()
        self._limits: list[CgroupLimit] = []
        self._limits_read = -float("inf")

    # -- cgroups ---------------------------------------------------------------------------

    def _own_cgroups(self) -> list[tuple[_Mount, str]]:
        """``(mount, cgroup path)`` of this process in each memory hierarchy."""
        out: list[tuple[_Mount, str]] = []
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                version = 2 if controllers == "" else 1
                if version == 1 and "memory" not in controllers.split(","):
                    continue
                out.extend((m, path) for m in self._mounts if m.version == version)
        return out

    def cgroup_limits(self) -> list[CgroupLimit]:
        """Every memory cgroup with a limit from this process's cgroup up to the root."""
        found = []
        for mount, path in self._own_cgroups():
            rel = os.path.relpath(path, mount.root)
            if rel.startswith(".."):
                continue
            directory = mount.mountpoint / rel
            while True:
                level = self._limit_at(mount, directory)
                if level is not None:
                    found.append(level)
                if directory == mount.mountpoint:
                    break
                directory = directory.parent
        return found

    def _limit_at(self, mount: _Mount, directory: Path) -> CgroupLimit | None:
        name = "memory.max" if mount.version == 2 else "memory.limit_in_bytes"
        limit = _read_int(directory / name)
        if limit is None or (mount.version == 1 and limit >= _V1_UNLIMITED):
            return None
        rel = str(directory.relative_to(mount.mountpoint))
        return CgroupLimit("/" if rel == "." else "/" + rel, directory, mount.version, limit)

    def current_limits(self) -> list[CgroupLimit]:
        """:meth:`cgroup_limits`, read again at most every :data:`CGROUP_RECHECK` seconds
        (reading them costs about 0.3 ms here; the limits change only by an admin's hand)."""
        now = time.monotonic()
        if now - self._limits_read > CGROUP_RECHECK:
            self._limits = self.cgroup_limits()
            self._limits_read = now
        return self._limits

    # -- defaults --------------------------------------------------------------------------

    def default_max_reserved(self) -> int:
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft == resource.RLIM_INFINITY:
            return DEFAULT_MAX_RESERVED
        return min(DEFAULT_MAX_RESERVED, soft // 2)

    def default_max_used(self) -> int:
        caps = [meminfo_total()]
        caps += [max(0, c.limit - self.own) for c in self.cgroup_limits()]
        return min(caps)

    def effective(self, limits: Limits) -> Limits:
        """``limits`` with the host defaults in place of ``max-reserved``/``max-used`` 0."""
        update = {}
        if not limits.max_reserved:
            update["max_reserved"] = self.default_max_reserved()
        if not limits.max_used:
            update["max_used"] = self.default_max_used()
        return limits.model_copy(update=update)

    # -- checks ----------------------------------------------------------------------------

    def refusal(self, used: int, more: int, *, touch: bool, lock: bool) -> Refusal | None:
        """Why blocks holding ``used`` bytes may not take ``more`` (faulted in at once when
        ``touch``, locked when ``lock``), or None when they may."""
        if more <= 0:
            return None
        for c in self.current_limits():
            if used + more + self.own > c.limit:
                return Refusal(
                    f"cgroup {c.limit_file}",
                    c.limit,
                    f"cgroup {c.cgroup}: {used} used by blocks and {self.own} kept for the"
                    f" daemon, {more} more asked",
                )
            available = c.available() if touch else 0
            if touch and more + SELF_SLACK > available:
                return Refusal(
                    f"cgroup {c.limit_file}",
                    c.limit,
                    f"cgroup {c.cgroup}: {available} available now, {more} more to fault in",
                )
        if lock and not self.ipc_lock:
            soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
            locked = _status_bytes("VmLck")
            if soft != resource.RLIM_INFINITY and locked + more > soft:
                return Refusal("RLIMIT_MEMLOCK", soft, f"{locked} locked, {more} more asked")
        return None
