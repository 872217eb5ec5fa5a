"""``ramctl exec``: run a program that holds leases of RAM blocks (docs/protocol.md §12).

::

    ramctl exec [--block ID]... [--readonly] -- PROGRAM [ARGS...]

One connection takes a lease of each block (``ram-block-get-fd`` with ``lease``); the fds
and that connection lose close-on-exec; ``{fd:ID}`` in ARGS becomes the fd number of block
ID (and ``{fd}`` too when there is one block); then ``ramctl`` *becomes* PROGRAM with
``execvp`` (same pid). The daemon sees the leases until the last process holding the
connection closes it: PROGRAM, and whatever inherits it in turn. While they last, the blocks
cannot shrink or be removed, so PROGRAM may map all of what it was given.

Nothing is left behind on failure: before ``exec`` every refusal closes the connection
(which ends the leases already taken) and returns an exit status; a PROGRAM that cannot be
run is reported with exit status 127 (126 when not executable), as a shell would.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from typing import NoReturn

from ramd_client.cli_output import Failure
from ramd_client.cli_parser import UsageError
from ramd_client.fdchannel import FdChannel

_PLACEHOLDER = re.compile(r"\{fd(?::([^}]*))?\}")


def substitute(args: list[str], fds: dict[str, int]) -> list[str]:
    """``args`` with ``{fd:ID}`` (and ``{fd}`` for a single block) replaced by fd numbers;
    UsageError for an id not leased or ``{fd}`` with several blocks."""

    def one(match: re.Match[str]) -> str:
        block = match.group(1)
        if block is None:
            if len(fds) != 1:
                raise UsageError("", "exec: {fd} needs exactly one --block; use {fd:ID}")
            return str(next(iter(fds.values())))
        if block not in fds:
            raise UsageError("", f"exec: {{fd:{block}}} names no --block")
        return str(fds[block])

    return [_PLACEHOLDER.sub(one, arg) for arg in args]


def run_exec(args: argparse.Namespace, path: str) -> NoReturn:
    """Take the leases, then exec the program (returns only on failure)."""
    program: list[str] = list(args.program)
    if program[:1] == ["--"]:
        program = program[1:]
    if not program:
        raise UsageError("", "exec: give the program to run after --")
    blocks = list(dict.fromkeys(args.block or []))
    channel = FdChannel(path, args.timeout)
    fds: dict[str, int] = {}
    try:
        for block in blocks:
            params = {"id": block, "lease": True, "readonly": bool(args.readonly)}
            _, fd = channel.call("ram-block-get-fd", params, take_fd=True)
            if fd is None:
                raise Failure(1, f"no fd for RAM block '{block}'", "ProtocolError")
            fds[block] = fd
        argv = substitute(program, fds)
        for fd in (*fds.values(), channel.fileno()):
            os.set_inheritable(fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(argv[0], argv)
    except OSError as e:
        status = 126 if e.errno in (errno.EACCES, errno.ENOEXEC) else 127
        raise Failure(status, f"exec: {program[0]}: {e.strerror}") from None
    finally:
        # only reached when exec failed: the leases end with the connection
        for fd in fds.values():
            os.close(fd)
        channel.close()
