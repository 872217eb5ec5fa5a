"""Shared fixtures: real daemon subprocesses on sockets in temp directories.

``daemon``/``shared_daemon`` start a fresh daemon for each test. ``reused_daemon``/
``reused_shared_daemon`` hand tests daemons that live for the whole session (one per event
loop, from :class:`daemon.DaemonPool`): for tests that need "a daemon" but nothing that only a fresh
process has (counters and event seqs from zero, its whole log, its RSS, signals, restarts, a
config of their own). Before and after each test that daemon is brought back to the state of a
fresh one (no blocks, no other clients, no subscribers, no files in its memory-dir) and checked
to still be alive and answering; a test sees only its own log lines.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# Property tests draw the same examples in every run (CI gates on the suite: a run must not fail
# on an example that no earlier run drew). Loaded before the test modules define their own
# settings, which inherit it. HYPOTHESIS_PROFILE=explore draws new examples each run.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.register_profile("explore", derandomize=False)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The helper modules' asserts are checks too: rewritten like the tests' own, so that they hold
# under python -O (CI runs the suite so) instead of being stripped.
pytest.register_assert_rewrite(
    "client_support",
    "daemon",
    "fdpeer",
    "fdstore_support",
    "otheruser",
    "procfs",
    "qemu_support",
    "ramctl_support",
    "shared_load_run",
    "unprivileged",
    "vmm_support",
    "wire",
)

from daemon import Daemon, DaemonPool  # noqa: E402

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
        d = start_daemon(f'memory-dir = "{parent}/mem"\n', "--event-loop", request.param)
        yield d
        d.stop()  # first: a daemon may still write in its memory-dir
    finally:
        shutil.rmtree(parent)


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


@pytest.fixture
def any_daemon(daemon_pool: DaemonPool) -> Iterator[Daemon]:
    """A pooled daemon (as :func:`reused_daemon`) on asyncio, the default loop only: for
    tests of what the event loop cannot change (a client's output and exit codes, ...)."""
    with daemon_pool.use("asyncio") as d:
        yield d
