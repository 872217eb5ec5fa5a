"""Shared fixtures: a real daemon subprocess per test, on a socket in ``tmp_path``."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon import Daemon


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``start_daemon(config_toml="", *extra_args, qmp=False)``; all are stopped
    (SIGTERM) at the end of the test."""
    started: list[Daemon] = []

    def start(config: str = "", *args: str, qmp: bool = False) -> Daemon:
        d = Daemon(tmp_path, config, *args, qmp=qmp)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


@pytest.fixture(params=["asyncio", "uvloop"])
def daemon(request: pytest.FixtureRequest, start_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon with the embedded defaults, on each event loop implementation."""
    return start_daemon("", "--event-loop", request.param)


@pytest.fixture(params=["asyncio", "uvloop"])
def shared_daemon(
    request: pytest.FixtureRequest, start_daemon: Callable[..., Daemon]
) -> Iterator[Daemon]:
    """:func:`daemon` with a ``memory-dir`` of its own on tmpfs (``file`` blocks), removed
    with its files after."""
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    try:
        yield start_daemon(f'memory-dir = "{parent}/mem"\n', "--event-loop", request.param)
    finally:
        shutil.rmtree(parent)
