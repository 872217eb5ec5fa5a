"""``quit`` refuses while blocks it would free exist (issue 24): anonymous and memfd blocks
hold it back, with a message saying how to stop the daemon instead; ``file`` blocks do not
(they outlive the daemon); SIGTERM is unchanged. On both dialects, real daemons."""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from daemon import Daemon, Raw
from qemu.qmp import ExecuteError
from qmp_client_support import qmp_client

MiB = 1 << 20


def wait_exit(d: Daemon, timeout: float = 30.0) -> int:
    """The exit code of a daemon that is exiting by itself."""
    deadline = time.monotonic() + timeout
    while d.alive():
        assert time.monotonic() < deadline, "the daemon did not exit after quit"
        time.sleep(0.05)
    return d.stop()


@pytest.fixture
def memory_dir() -> Iterator[Path]:
    """A ``memory-dir`` of the test's own on tmpfs (not made yet)."""
    parent = Path(tempfile.mkdtemp(prefix="ramd-test-", dir="/dev/shm"))
    yield parent / "mem"
    shutil.rmtree(parent)


def refusal(ids: str, count: int) -> str:
    blocks = "1 RAM block that is" if count == 1 else f"{count} RAM blocks that are"
    return (
        f"quit refused: it would free {blocks} not persistent ({ids}); delete them first"
        " (ram-block-del), or stop the service to free them anyway (systemctl stop ramd, or"
        " SIGTERM)"
    )


async def test_qmp_quit_refuses_while_anonymous_or_memfd_blocks_exist(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon(qmp=True)
    async with qmp_client(d.qmp_path) as qmp:
        await qmp.execute("ram-block-add", {"id": "anon", "size": MiB})
        await qmp.execute("ram-block-add", {"id": "shm", "size": MiB, "backend": "memfd"})
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("quit")
        assert err.value.error_class == "GenericError"
        assert err.value.error.error.desc == refusal("'anon', 'shm'", 2)
        await qmp.execute("ram-block-del", {"id": "anon"})
        with pytest.raises(ExecuteError) as err:
            await qmp.execute("quit")
        assert err.value.error.error.desc == refusal("'shm'", 1)
        blocks = await qmp.execute("query-ram-blocks")
        assert [b["id"] for b in blocks] == ["shm"]  # type: ignore[index, union-attr]
        await qmp.execute("ram-block-del", {"id": "shm"})
        assert await qmp.execute("quit") == {}
    assert wait_exit(d) == 0
    assert "quit - by pid=" in d.log_text()


def test_jsonrpc_quit_refusal_counts_what_it_does_not_name(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon()
    with Raw(d.path) as r:
        for i in range(7):
            r.call("ram-block-add", id=f"b{i}", size=MiB)
        error = r.error("quit")
        assert error["data"] == {"class": "GenericError"}
        assert error["message"] == refusal("'b0', 'b1', 'b2', 'b3', 'b4' and 2 more", 7)
        assert r.call("query-stats")["blocks"] == 7
    assert d.alive()
    assert d.stop() == 0


def test_quit_with_only_file_blocks_exits_and_keeps_them(
    start_daemon: Callable[..., Daemon], memory_dir: Path
) -> None:
    d = start_daemon(f'memory-dir = "{memory_dir}"\n')
    with Raw(d.path) as r:
        r.call("ram-block-add", id="kept", size=MiB, backend="file")
        r.call("ram-block-write", id="kept", offset=0, data="cmFtZA==")
        assert r.call("quit") == {}
    assert wait_exit(d) == 0
    assert (memory_dir / "kept").read_bytes()[:4] == b"ramd"


def test_sigterm_still_frees_every_block_and_exits(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon()
    with Raw(d.path) as r:
        r.call("ram-block-add", id="anon", size=MiB)
        r.call("ram-block-add", id="shm", size=MiB, backend="memfd")
        r.error("quit")
    assert d.stop(signal.SIGTERM) == 0
    assert "shutting down" in d.log_text()
