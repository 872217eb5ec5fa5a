"""The daemon as the shipped unit runs it: an unprivileged uid, no capabilities, a soft (and
here hard) ``RLIMIT_NOFILE`` of 1024. What only such a process sees (fds in flight counted
against its ``RLIMIT_NOFILE``, ``EMFILE`` at its fd limit) needs it.

How: as root, ``prlimit`` sets the limit and ``setpriv`` drops to :data:`UID` (which needs no
passwd entry), then ``python -m ramd`` runs from a venv any uid can read, made once per test
process from ``/usr/bin/python3`` with copies of ramd and its packages
(:func:`otheruser.portable_python`: the test interpreter may live under ``/root`` or in CI's
0700 ``mktemp -d``, which other uids cannot enter). The daemon's
directory is a fresh one in ``/tmp`` owned by that uid. Tests connect as root (the socket is
0600, root passes).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from daemon import Daemon
from otheruser import portable_python

#: The daemon's uid: one no other test run on this machine is likely to use at once (fds in
#: flight are counted per uid).
UID = 60000 + os.getpid() % 5000
SYSTEM_PYTHON = "/usr/bin/python3"


@functools.cache
def _python() -> Path:
    """The interpreter of a venv any uid can run ramd from (made once, removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="ramd-unpriv-python-"))
    atexit.register(shutil.rmtree, root, True)
    return portable_python(root, also=("uvloop",))


def _wrap(nofile: int) -> list[str]:
    return [
        "prlimit",
        f"--nofile={nofile}:{nofile}",
        "setpriv",
        f"--reuid={UID}",
        f"--regid={UID}",
        "--clear-groups",
        "--",
    ]


def _check() -> None:
    """Skip (saying why) where this cannot work."""
    if os.getuid() != 0:
        pytest.skip("needs root to start the daemon under another uid")
    if shutil.which("setpriv") is None or shutil.which("prlimit") is None:
        pytest.skip("needs setpriv and prlimit")
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"needs {SYSTEM_PYTHON}")
    probe = subprocess.run(
        [
            *_wrap(1024),
            str(_python()),
            "-c",
            "import sys, ramd.process.daemon; print(sys.version_info[:2])",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} cannot run ramd as uid {UID}: {probe.stderr[-500:]}")


@contextmanager
def unprivileged_daemon(config: str = "", *args: str, nofile: int = 1024) -> Iterator[Daemon]:
    """A daemon as uid :data:`UID` with ``RLIMIT_NOFILE`` ``nofile`` (soft and hard) and its
    own ``memory-dir``; stopped and its directory removed afterwards."""
    _check()
    tmp = Path(tempfile.mkdtemp(prefix="ramd-unpriv-"))
    try:
        os.chown(tmp, UID, UID)
        tmp.chmod(0o755)
        d = Daemon(
            tmp,
            f'memory-dir = "{tmp}/mem"\n{config}',
            *args,
            wrap=_wrap(nofile),
            python=str(_python()),
        )
        try:
            yield d
        finally:
            d.stop()
    finally:
        shutil.rmtree(tmp)
