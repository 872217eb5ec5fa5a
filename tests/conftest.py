"""Shared fixtures: real daemon subprocesses on sockets in temp directories.

``daemon``/``shared_daemon`` start a fresh daemon for each test. ``module_daemon``/
``module_shared_daemon`` hand every test of a module the same daemon per event loop: for
tests that need "a daemon" but nothing that only a fresh process has (counters from zero, its
whole log, its RSS, signals, restarts). Before and after each test that daemon is brought back
to the state of a fresh one (no blocks, no other clients, no subscribers, no files in its
memory-dir) and checked to still be alive and answering; a test sees only its own log lines.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon import Daemon, Raw

LOOPS = ["asyncio", "uvloop"]


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


@pytest.fixture(params=LOOPS)
def daemon(request: pytest.FixtureRequest, start_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon with the embedded defaults, on each event loop implementation."""
    return start_daemon("", "--event-loop", request.param)


@pytest.fixture(params=LOOPS)
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


def reset(d: Daemon, memory_dir: Path | None = None, timeout: float = 20.0) -> None:
    """Bring a used daemon back to a fresh one's state: delete every block left, wait until
    the connections of earlier tests are gone, then check that nothing is left (no block,
    nothing reserved, used or resident, no subscriber, no file in ``memory_dir``).
    AssertionError (with the log) if the daemon died or cannot be brought back."""
    assert d.alive(), f"the daemon died: {d.log_text()}"
    with Raw(d.path, timeout=timeout) as r:
        for block in r.call("query-ram-blocks"):
            r.call("ram-block-del", id=block["id"])
        deadline = time.monotonic() + timeout
        while (stats := r.call("query-stats"))["clients"] > 1 or stats["subscribers"]:
            assert time.monotonic() < deadline, f"connections left: {stats}"
            time.sleep(0.01)
        left = {k: stats[k] for k in ("blocks", "reserved", "used", "resident", "subscribers")}
        assert left == dict.fromkeys(left, 0), left
    if memory_dir is not None:
        assert not any(memory_dir.iterdir()), list(memory_dir.iterdir())


@pytest.fixture(scope="module", params=LOOPS)
def _module_daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("ramd"), "", "--event-loop", request.param)
    yield d
    d.stop()


@pytest.fixture
def module_daemon(_module_daemon: Daemon) -> Iterator[Daemon]:
    """A daemon with the embedded defaults, on each event loop implementation, shared by the
    tests of a module (see the module docstring): empty at the start of the test, emptied and
    checked after it."""
    reset(_module_daemon)
    _module_daemon.mark_log()
    yield _module_daemon
    reset(_module_daemon)


@pytest.fixture(scope="module", params=LOOPS)
def _module_shared_daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Daemon, Path]]:
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    try:
        config = f'memory-dir = "{parent}/mem"\n'
        d = Daemon(tmp_path_factory.mktemp("ramd"), config, "--event-loop", request.param)
        yield d, parent / "mem"
        d.stop()
    finally:
        shutil.rmtree(parent)


@pytest.fixture
def module_shared_daemon(_module_shared_daemon: tuple[Daemon, Path]) -> Iterator[Daemon]:
    """:func:`shared_daemon` shared by the tests of a module like :func:`module_daemon`; its
    memory-dir must be empty again after each test."""
    d, mem = _module_shared_daemon
    reset(d, mem)
    d.mark_log()
    yield d
    reset(d, mem)
