"""``ramd_client.shared``: get_fd, SharedBlock and AsyncSharedBlock against a real daemon,
with a second real process mapping the same block (docs/protocol.md §8)."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from client_support import WireRecorder
from daemon import Daemon, Raw
from ramd_client.error import RamdError
from ramd_client.message import Notification
from ramd_client.shared import AsyncSharedBlock, SharedBlock, get_fd

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _maps_line(addr: int) -> str:
    """This process's /proc/self/maps line holding ``addr``."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return line
    raise AssertionError(f"{addr:#x} not mapped")


def _poll_until(block: SharedBlock, method: str) -> Notification:
    for _ in range(100):
        for event in block.poll(0.2):
            if event.method == method:
                return event
    raise AssertionError(f"no {method}")


# A second process: maps the block, checks what the test wrote, writes its answer, and
# waits for "done" on stdin before it closes.
_PEER = textwrap.dedent(
    """
    import sys
    from ramd_client.shared import SharedBlock
    with SharedBlock(sys.argv[1], "m") as block:
        assert bytes(block.view[0:9]) == b"from test", bytes(block.view[0:9])
        block.view[4096:4108] = b"from process"
        print("wrote", flush=True)
        sys.stdin.readline()
        block.poll(0)
    """
)


def test_two_processes_see_each_others_writes(reused_shared_daemon: Daemon) -> None:
    with Raw(reused_shared_daemon.path) as rpc:
        rpc.call("ram-block-add", id="m", size=MiB, backend="memfd")
        with SharedBlock(reused_shared_daemon.path, "m") as block:
            assert (block.size, block.max_size, block.readonly) == (MiB, MiB, False)
            block.view[0:9] = b"from test"
            peer = subprocess.Popen(
                [sys.executable, "-c", _PEER, str(reused_shared_daemon.path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                assert peer.stdout is not None and peer.stdin is not None
                assert peer.stdout.readline() == b"wrote\n", peer.stderr
                assert bytes(block.view[4096:4108]) == b"from process"
                assert rpc.call("query-ram-blocks", id="m")[0]["mappers"] == 2
                peer.stdin.write(b"done\n")
                peer.stdin.flush()
                assert peer.wait(60) == 0
            finally:
                peer.kill()
                peer.wait()
            got = rpc.call("ram-block-read", id="m", offset=4096, length=12)
            assert base64.b64decode(got["data"]) == b"from process"
            rpc.call("ram-block-write", id="m", offset=8192, data=_b64(b"from daemon"))
            assert bytes(block.view[8192:8203]) == b"from daemon"
        assert rpc.call("query-ram-blocks", id="m")[0]["mappers"] == 0


def test_follows_a_grow_and_acknowledges_a_shrink(reused_shared_daemon: Daemon) -> None:
    with Raw(reused_shared_daemon.path) as rpc, Raw(reused_shared_daemon.path) as resizer:
        rpc.call("ram-block-add", id="m", size=MiB, backend="memfd", **{"max-size": 8 * MiB})
        with SharedBlock(reused_shared_daemon.path, "m") as block:
            base = block.address
            assert "---p" in _maps_line(base + 4 * MiB)
            rpc.call("ram-block-resize", id="m", size=4 * MiB)
            rpc.call("ram-block-write", id="m", offset=3 * MiB, data=_b64(b"new tail"))
            event = _poll_until(block, "RAM_BLOCK_RESIZED")
            assert event.params["data"]["ack"] is False
            assert block.size == 4 * MiB and block.address == base
            assert bytes(block.view[3 * MiB : 3 * MiB + 8]) == b"new tail"
            assert "rw-s" in _maps_line(base + 3 * MiB)
            # The shrink waits for this mapper: the resizer has no answer until it polls.
            resizer.send(b'{"jsonrpc":"2.0","method":"ram-block-resize",'
                         b'"params":{"id":"m","size":1048576},"id":1}')  # fmt: skip
            event = _poll_until(block, "RAM_BLOCK_RESIZED")
            assert (event.params["data"]["new-size"], event.params["data"]["ack"]) == (MiB, True)
            assert resizer.reply()["result"]["size"] == MiB
            assert block.size == MiB
            assert "---p" in _maps_line(base + 3 * MiB)
            assert "rw-s" in _maps_line(base + MiB - PAGE)
            assert len(block.view) == MiB


def test_removal_unmaps_and_acknowledges(reused_shared_daemon: Daemon) -> None:
    with Raw(reused_shared_daemon.path) as rpc, Raw(reused_shared_daemon.path) as remover:
        rpc.call("ram-block-add", id="m", size=MiB, backend="file")
        with SharedBlock(reused_shared_daemon.path, "m") as block:
            base = block.address
            remover.send(b'{"jsonrpc":"2.0","method":"ram-block-del","params":{"id":"m"},"id":1}')
            event = _poll_until(block, "RAM_BLOCK_REMOVED")
            assert event.params["data"]["ack"] is True
            assert remover.reply()["result"] == {}
            assert block.removed and block.size == 0
            with pytest.raises(ValueError, match="not mapped"):
                block.view  # noqa: B018
            with pytest.raises(AssertionError, match="not mapped"):
                _maps_line(base)
        assert rpc.call("query-ram-blocks") == []


def test_readonly_fd_gives_a_readonly_view(reused_shared_daemon: Daemon) -> None:
    with Raw(reused_shared_daemon.path) as rpc:
        rpc.call("ram-block-add", id="m", size=PAGE, backend="memfd")
        rpc.call("ram-block-write", id="m", offset=0, data=_b64(b"ro"))
        with SharedBlock(reused_shared_daemon.path, "m", readonly=True) as block:
            assert block.readonly and block.view.readonly
            assert bytes(block.view[:2]) == b"ro"
            with pytest.raises(TypeError):
                block.view[0:1] = b"x"
            assert "r--s" in _maps_line(block.address)


def test_get_fd_refusals_and_no_fd_leaks(reused_shared_daemon: Daemon) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with Raw(reused_shared_daemon.path) as rpc:
        rpc.call("ram-block-add", id="a", size=PAGE)
        with pytest.raises(RamdError, match="not shared"):
            get_fd(reused_shared_daemon.path, "a")
        with pytest.raises(RamdError) as info:
            SharedBlock(reused_shared_daemon.path, "nope")
        assert info.value.error_class == "DeviceNotFound"
        rpc.call("ram-block-add", id="m", size=PAGE, backend="memfd")
        fd, result, conn = get_fd(reused_shared_daemon.path, "m")
        assert result["size"] == PAGE and os.fstat(fd).st_size == PAGE
        os.close(fd)
        conn.close()
    assert len(os.listdir("/proc/self/fd")) == before


async def test_async_block_follows_events_on_the_loop(reused_shared_daemon: Daemon) -> None:
    seen: list[Notification] = []
    changed = asyncio.Event()

    def on_event(event: Notification) -> None:
        seen.append(event)
        changed.set()

    with Raw(reused_shared_daemon.path) as rpc:
        rpc.call("ram-block-add", id="m", size=MiB, backend="memfd", **{"max-size": 4 * MiB})
        block = await AsyncSharedBlock.open(reused_shared_daemon.path, "m", on_event=on_event)
        async with block:
            block.view[0:2] = b"hi"
            # The shrink is answered only once the loop has handled and acknowledged it.
            result = await asyncio.to_thread(rpc.call, "ram-block-resize", id="m", size=PAGE)
            assert result["size"] == PAGE
            await asyncio.wait_for(changed.wait(), 30)
            assert [e.params["data"]["new-size"] for e in seen] == [PAGE]
            assert block.size == PAGE and bytes(block.view[0:2]) == b"hi"
            assert block.error is None


def test_every_request_of_the_shared_client_validates(reused_shared_daemon: Daemon) -> None:
    """The fd commands tests/test_schemas.py cannot send through the asyncio client."""
    wire = WireRecorder()
    with Raw(reused_shared_daemon.path) as rpc, Raw(reused_shared_daemon.path) as resizer:
        rpc.call("ram-block-add", id="m", size=MiB, backend="memfd", **{"max-size": 2 * MiB})
        with SharedBlock(
            reused_shared_daemon.path, "m", readonly=True, trace=wire.trace()
        ) as block:
            done = threading.Thread(
                target=resizer.call, args=("ram-block-resize",), kwargs={"id": "m", "size": PAGE}
            )
            done.start()
            _poll_until(block, "RAM_BLOCK_RESIZED")
            done.join(60)
            block.poll(0.5)  # the acknowledgement's answer
    methods = {method for method, _ in wire.requests()}
    assert methods == {"ram-block-get-fd", "ram-block-ack", "ram-block-put-fd"}
    assert wire.check() == 3


def test_an_idle_mapper_is_never_closed_and_a_shrink_waits_for_it(start_daemon: Any) -> None:
    """docs/protocol.md §11: a connection that maps a block is exempt from ``idle-timeout``. The
    SharedBlock sends nothing while its owner does not poll (an idle VM): it stays connected
    well past the timeout, and a shrink then still waits for its acknowledgement (issue 21,
    point 3)."""
    d = start_daemon("[limits]\nidle-timeout = 1\nack-timeout = 60\n")
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="m", size=4 * MiB, backend="memfd", **{"max-size": 8 * MiB})
    with SharedBlock(d.path, "m") as block:
        with Raw(d.path) as idle:  # opened after the mapper: closed after it would be
            idle.sock.settimeout(60)
            with pytest.raises(ConnectionError):
                idle.line()
        assert "closing idle connection" in d.log_text()
        with Raw(d.path) as rpc, Raw(d.path) as resizer:
            assert rpc.call("query-ram-blocks", id="m")[0]["mappers"] == 1
            resizer.send(b'{"jsonrpc":"2.0","method":"ram-block-resize",'
                         b'"params":{"id":"m","size":1048576},"id":1}')  # fmt: skip
            event = _poll_until(block, "RAM_BLOCK_RESIZED")
            assert event.params["data"]["ack"] is True
            assert resizer.reply()["result"]["size"] == MiB
        assert block.size == MiB
