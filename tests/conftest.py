"""Shared fixtures: real daemon subprocesses on sockets in temp directories.

``daemon``/``shared_daemon`` start a fresh daemon for each test. ``reused_daemon``/
``reused_shared_daemon`` hand tests daemons that live for the whole session (one per event
loop, from :class:`DaemonPool`): for tests that need "a daemon" but nothing that only a fresh
process has (counters and event seqs from zero, its whole log, its RSS, signals, restarts, a
config of their own). Before and after each test that daemon is brought back to the state of a
fresh one (no blocks, no other clients, no subscribers, no files in its memory-dir) and checked
to still be alive and answering; a test sees only its own log lines.
"""

from __future__ import annotations

import contextlib
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


class DaemonPool:
    """Daemons kept for the whole session, started on first use: one per event loop, with
    the embedded defaults and a QMP socket, and one per loop with a ``memory-dir`` of its own
    on tmpfs. Owned by the session; used by one test at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: dict[tuple[str, bool], tuple[Daemon, Path | None]] = {}

    def _get(self, loop: str, memory_dir: bool) -> tuple[Daemon, Path | None]:
        key = (loop, memory_dir)
        if key not in self.daemons:
            tmp = self.root / f"{loop}{'-mem' if memory_dir else ''}"
            tmp.mkdir()
            mem: Path | None = None
            config = ""
            if memory_dir:
                mem = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm")) / "mem"
                config = f'memory-dir = "{mem}"\n'
            self.daemons[key] = (Daemon(tmp, config, "--event-loop", loop, qmp=True), mem)
        return self.daemons[key]

    @contextlib.contextmanager
    def use(self, loop: str, memory_dir: bool = False) -> Iterator[Daemon]:
        """The pooled daemon, reset (see :func:`reset`) before and after the test, which sees
        only its own log lines."""
        d, mem = self._get(loop, memory_dir)
        reset(d, mem)
        d.mark_log()
        yield d
        reset(d, mem)

    def close(self) -> None:
        for d, mem in self.daemons.values():
            d.stop()
            if mem is not None:
                shutil.rmtree(mem.parent)


@pytest.fixture(scope="session")
def daemon_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonPool]:
    pool = DaemonPool(tmp_path_factory.mktemp("pool"))
    yield pool
    pool.close()


@pytest.fixture(params=LOOPS)
def reused_daemon(request: pytest.FixtureRequest, daemon_pool: DaemonPool) -> Iterator[Daemon]:
    """Like :func:`daemon` (with a QMP socket too), but the process serves other tests too
    (see the module docstring)."""
    with daemon_pool.use(request.param) as d:
        yield d


@pytest.fixture(params=LOOPS)
def reused_shared_daemon(
    request: pytest.FixtureRequest, daemon_pool: DaemonPool
) -> Iterator[Daemon]:
    """Like :func:`shared_daemon` (with a QMP socket too), but the process serves other tests
    too; its memory-dir must be empty again after each test."""
    with daemon_pool.use(request.param, memory_dir=True) as d:
        yield d
