"""Exec a command under a seccomp filter built like systemd's ``SystemCallFilter=``.

Usage: ``python seccomp_exec.py ALLOW DENY -- COMMAND...``, where ALLOW and DENY are
space-separated ``@group`` or syscall names, as in ``SystemCallFilter=ALLOW`` followed by
``SystemCallFilter=~DENY``. Everything else fails with EPERM (``SystemCallErrorNumber=EPERM``).
The groups come from ``systemd-analyze syscall-filter`` (the same tables systemd uses); the
filter is loaded with libseccomp through ctypes. The caller must have set no_new_privs
(``setpriv --no-new-privs``), as systemd does with ``NoNewPrivileges=yes``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
import sys

SCMP_ACT_ALLOW = 0x7FFF0000


def scmp_act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


def syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name.startswith("@"):
            todo.extend(groups[name])
        else:
            found.add(name)
    return found


def main() -> None:
    sep = sys.argv.index("--")
    allow_spec, deny_spec = sys.argv[1], sys.argv[2]
    command = sys.argv[sep + 1 :]
    groups = syscall_groups()
    allowed = expand(allow_spec.split(), groups) - expand(deny_spec.split(), groups)
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(scmp_act_errno(errno.EPERM))
    for name in sorted(allowed):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a syscall of this architecture
            continue
        if lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) != 0:
            sys.exit(f"seccomp_rule_add {name} failed")
    if lib.seccomp_load(ctx) != 0:
        sys.exit("seccomp_load failed (no_new_privs not set?)")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
