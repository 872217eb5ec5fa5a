"""The client library (``ramd_client``) against a real daemon subprocess.

Every client made here records its traffic (``wire``): at the end of each test the params of
every request it sent are checked against the JSON Schema (and agree with the daemon's
verdict), as are the results and events it received.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ramd_client
from client_support import WireRecorder
from daemon import Daemon
from ramd_client import (
    AsyncClient,
    BlockTable,
    Client,
    ConnectError,
    ConnectionLost,
    EventOverflow,
    RamBlockInfo,
    RamdClientError,
    RamdError,
)
from ramd_client.transfer import chunk_size, read_range, write_range

from ramd.api.commands import COMMANDS
from ramd.api.models import EVENT_NAMES, RamBlockAddedData, RamBlockResizedData
from ramd.api.schema import schema_document

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")

Connect = Callable[..., Awaitable[AsyncClient]]


@pytest.fixture
def wire() -> Iterator[WireRecorder]:
    recorder = WireRecorder()
    yield recorder
    assert recorder.check() > 0


@pytest.fixture
async def aconnect(wire: WireRecorder) -> AsyncIterator[Connect]:
    """``await aconnect(path, **kw)``: a traced AsyncClient, closed at the end."""
    clients: list[AsyncClient] = []

    async def make(path: Path | str | None, **kw: Any) -> AsyncClient:
        client = await ramd_client.connect(path, trace=wire.trace(), **kw)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
def sconnect(wire: WireRecorder) -> Iterator[Callable[..., Client]]:
    """``sconnect(path, **kw)``: a traced synchronous Client, closed at the end."""
    clients: list[Client] = []

    def make(path: Path | str | None, **kw: Any) -> Client:
        client = Client(path, trace=wire.trace(), **kw)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- connecting ------------------------------------------------------------------------------


async def test_connect_reads_version_and_closes(reused_daemon: Daemon, aconnect: Connect) -> None:
    client = await aconnect(reused_daemon.path)
    assert client.connected and client.path == str(reused_daemon.path)
    assert client.version is not None and client.version.package.startswith("ramd ")
    async with client:
        assert (await client.query_stats()).clients == 1
    assert not client.connected
    with pytest.raises(ConnectionLost):
        await client.query_version()


async def test_connect_default_path_follows_ramd_socket(
    reused_daemon: Daemon, aconnect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAMD_SOCKET", str(reused_daemon.path))
    client = await aconnect(None)
    assert client.path == str(reused_daemon.path)
    assert await client.query_ram_blocks() == []


async def test_connect_default_path_follows_xdg_runtime_dir(
    reused_daemon: Daemon, aconnect: Connect, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    (xdg / "ramd").symlink_to(reused_daemon.dir, target_is_directory=True)
    monkeypatch.delenv("RAMD_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    client = await aconnect(None)
    assert client.path == str(xdg / "ramd" / "ramd.sock")


async def test_connect_error_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sock"
    with pytest.raises(ConnectError) as info:
        await ramd_client.connect(missing)
    assert info.value.path == str(missing)
    assert info.value.errno == errno.ENOENT
    assert str(missing) in str(info.value)
    assert isinstance(info.value, RamdClientError)


async def test_connect_error_when_nobody_listens(daemon: Daemon) -> None:
    daemon.stop(signal.SIGKILL)  # leaves the socket file behind, with no listener
    with pytest.raises(ConnectError) as info:
        await ramd_client.connect(daemon.path)
    assert info.value.errno == errno.ECONNREFUSED


# -- every command -----------------------------------------------------------------------


async def test_every_command_async(reused_daemon: Daemon, aconnect: Connect) -> None:
    async with await aconnect(reused_daemon.path) as c:
        added = await c.ram_block_add(
            "ram0", 4 * MiB, max_size=64 * MiB, merge=True, dump=False, align=2 * MiB
        )
        assert isinstance(added, RamBlockInfo)
        assert (added.id, added.size, added.max_size, added.resizable) == (
            "ram0",
            4 * MiB,
            64 * MiB,
            True,
        )
        assert added.merge and not added.dump and added.host % (2 * MiB) == 0
        fixed = await c.ram_block_add("fixed", 5000, prealloc=True, lock=True)
        assert (fixed.size, fixed.max_size, fixed.resizable) == (2 * PAGE, 2 * PAGE, False)
        assert fixed.prealloc and fixed.lock and fixed.resident is None
        (listed,) = await c.query_ram_blocks("fixed", resident=True)
        assert listed.resident == fixed.size

        assert [b.id for b in await c.query_ram_blocks()] == ["ram0", "fixed"]
        (only,) = await c.query_ram_blocks("fixed")
        assert [only] == await c.query_ram_blocks(id="fixed") and only.id == "fixed"

        grown = await c.ram_block_resize("ram0", 16 * MiB)
        assert grown.size == 16 * MiB and grown.host == added.host

        payload = os.urandom(3 * PAGE)
        assert await c.ram_block_write("ram0", PAGE, payload) == len(payload)
        assert await c.ram_block_read("ram0", PAGE, len(payload)) == payload
        await c.ram_block_discard("ram0", 2 * PAGE, PAGE)
        assert await c.ram_block_read("ram0", PAGE, 3 * PAGE) == (
            payload[:PAGE] + bytes(PAGE) + payload[2 * PAGE :]
        )

        stats = await c.query_stats()
        assert stats.blocks == 2 and stats.used == 16 * MiB + 2 * PAGE
        assert stats.limits["io-chunk"] > 0 and stats.limits["max-message-size"] > 0
        version = await c.query_version()
        assert version == c.version
        assert [ci.name for ci in await c.query_commands()] == list(COMMANDS)
        assert await c.query_schema() == schema_document()

        assert await c.ram_block_del("fixed") is None
        assert [b.id for b in await c.query_ram_blocks()] == ["ram0"]
        assert await c.call("query-version") == version.model_dump(mode="json", by_alias=True)


async def test_write_of_exactly_io_chunk_is_accepted(
    reused_daemon: Daemon, aconnect: Connect
) -> None:
    """The daemon's io-chunk check counts base64 padding out (4 MiB is not a multiple of 3)."""
    c = await aconnect(reused_daemon.path)
    chunk = (await c.query_stats()).limits["io-chunk"]
    await c.ram_block_add("ram0", chunk)
    data = os.urandom(chunk)
    assert await c.ram_block_write("ram0", 0, data) == chunk
    assert await c.ram_block_read("ram0", 0, chunk) == data
    with pytest.raises(RamdError, match="io-chunk"):
        await c.ram_block_write("ram0", 0, data + b"x")


# -- errors ----------------------------------------------------------------------------------


async def test_refusals_carry_class_and_message(reused_daemon: Daemon, aconnect: Connect) -> None:
    c = await aconnect(reused_daemon.path)
    with pytest.raises(RamdError) as info:
        await c.ram_block_del("ghost")
    assert (info.value.error_class, info.value.desc) == (
        "DeviceNotFound",
        "RAM block 'ghost' not found",
    )
    assert info.value.code == -32000 and not info.value.invalid_params

    await c.ram_block_add("fixed", MiB)
    with pytest.raises(RamdError) as info:
        await c.ram_block_resize("fixed", 2 * MiB)
    assert info.value.error_class == "GenericError"
    assert info.value.desc == "Size mismatch: fixed: 0x200000 != 0x100000: Invalid argument"
    assert str(info.value) == f"GenericError: {info.value.desc}"

    with pytest.raises(RamdError) as info:
        await c.ram_block_add("fixed", MiB)
    assert info.value.error_class == "GenericError"


async def test_argument_errors_are_generic_errors_with_code(
    reused_daemon: Daemon, aconnect: Connect
) -> None:
    c = await aconnect(reused_daemon.path)
    with pytest.raises(RamdError) as info:
        await c.ram_block_add("ram0", 0)
    err = info.value
    assert (err.error_class, err.code, err.invalid_params) == ("GenericError", -32602, True)
    assert err.desc == "size: Input should be greater than 0"
    with pytest.raises(RamdError, match="id: String should match pattern"):
        await c.ram_block_add("0bad", MiB)
    with pytest.raises(RamdError) as info:
        await c.call("no-such-command")
    assert (info.value.error_class, info.value.code) == ("CommandNotFound", -32601)
    assert await c.query_ram_blocks() == []  # the connection is still fine


async def test_call_in_flight_gets_connection_lost(
    daemon: Daemon, aconnect: Connect, wire: WireRecorder
) -> None:
    c = await aconnect(daemon.path)
    events = c.events()
    await events.subscribe()
    os.kill(daemon.pid, signal.SIGSTOP)  # it cannot answer from now on
    call = asyncio.ensure_future(c.ram_block_add("ram0", MiB))
    conversation = wire.conversations[-1]
    await wait_until(lambda: conversation.sent[-1]["method"] == "ram-block-add")
    daemon.stop(signal.SIGKILL)
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(call, 10)
    assert not c.connected
    with pytest.raises(ConnectionLost):
        await c.query_version()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(anext(events), 10)


async def test_daemon_shutdown_ends_calls_and_streams(daemon: Daemon, aconnect: Connect) -> None:
    c = await aconnect(daemon.path)
    await c.ram_block_add("ram0", MiB)
    async with c.events(replay=False) as events:
        assert daemon.stop() == 0
        seen = []
        with pytest.raises(ConnectionLost):
            async for event in events:
                seen.append(event)
        # Whatever came before the end was delivered first (shutdown frees the blocks).
        assert all(e.name == "RAM_BLOCK_REMOVED" for e in seen)
    with pytest.raises(ConnectionLost):
        await c.query_stats()


# -- pipelining and bounds -------------------------------------------------------------------


async def test_concurrent_calls_are_matched_by_id(reused_daemon: Daemon, aconnect: Connect) -> None:
    c = await aconnect(reused_daemon.path)
    await c.ram_block_add("ram0", 256 * PAGE)
    pages = [os.urandom(PAGE) for _ in range(256)]
    written = await asyncio.gather(
        *(c.ram_block_write("ram0", i * PAGE, p) for i, p in enumerate(pages))
    )
    assert written == [PAGE] * 256
    reads = await asyncio.gather(*(c.ram_block_read("ram0", i * PAGE, PAGE) for i in range(256)))
    assert reads == pages
    mixed = await asyncio.gather(
        c.query_version(),
        c.ram_block_del("ghost"),
        c.query_ram_blocks(),
        return_exceptions=True,
    )
    assert mixed[0] == c.version
    assert isinstance(mixed[1], RamdError) and mixed[1].error_class == "DeviceNotFound"
    assert isinstance(mixed[2], list) and [b.id for b in mixed[2]] == ["ram0"]


async def test_calls_in_flight_are_bounded(
    reused_daemon: Daemon, aconnect: Connect, wire: WireRecorder
) -> None:
    c = await aconnect(reused_daemon.path, max_pending=3)
    outstanding = 0
    peak = 0
    original = c.trace
    assert original is not None

    def trace(direction: str, message: dict[str, Any]) -> None:
        nonlocal outstanding, peak
        outstanding += 1 if direction == "send" else -1
        peak = max(peak, outstanding)
        original(direction, message)

    c.trace = trace
    results = await asyncio.gather(*(c.query_stats() for _ in range(50)))
    assert len(results) == 50
    assert peak == 3


async def test_oversized_message_ends_the_connection(
    reused_daemon: Daemon, aconnect: Connect
) -> None:
    c = await aconnect(reused_daemon.path, max_message_size=64 * 1024)
    await c.ram_block_add("ram0", MiB)
    assert len(await c.ram_block_read("ram0", 0, 1024)) == 1024
    with pytest.raises(ConnectionLost, match="exceeds 65536 bytes"):
        await c.ram_block_read("ram0", 0, 512 * 1024)


# -- events ------------------------------------------------------------------------------------


async def test_events_replay_then_live_in_seq_order(daemon: Daemon, aconnect: Connect) -> None:
    watcher = await aconnect(daemon.path)
    actor = await aconnect(daemon.path)
    for name in ("a", "b", "c"):
        await actor.ram_block_add(name, MiB, max_size=64 * MiB)
    async with watcher.events() as events:
        assert events.seq == 3 and events.replayed == 3
        # Changes from another connection, many at once.
        await asyncio.gather(
            *(actor.ram_block_resize(n, (2 + i) * MiB) for n in "abc" for i in range(5))
        )
        await actor.ram_block_add("d", MiB)
        await actor.ram_block_del("a")
        got = [await asyncio.wait_for(anext(events), 10) for _ in range(3 + 15 + 2)]
    replayed, live = got[:3], got[3:]
    assert [(e.name, e.data.id, e.replay, e.seq) for e in replayed] == [
        ("RAM_BLOCK_ADDED", n, True, 3) for n in "abc"
    ]
    assert [e.seq for e in live] == list(range(4, 4 + 17))
    assert not any(e.replay for e in live)
    assert {e.name for e in live[:15]} == {"RAM_BLOCK_RESIZED"}
    assert all(isinstance(e.data, RamBlockResizedData) for e in live[:15])
    assert [e.name for e in live[15:]] == ["RAM_BLOCK_ADDED", "RAM_BLOCK_REMOVED"]
    assert isinstance(live[15].data, RamBlockAddedData) and live[15].data.id == "d"
    stamps = [e.timestamp for e in got]
    assert stamps == sorted(stamps) and stamps[0].tzinfo is not None
    assert got[3].to_dict()["event"] == "RAM_BLOCK_RESIZED"


async def test_events_filtered_per_stream_on_one_connection(
    reused_daemon: Daemon, aconnect: Connect
) -> None:
    c = await aconnect(reused_daemon.path)
    await c.ram_block_add("old", MiB)
    everything = c.events(replay=False)
    removals = c.events(["RAM_BLOCK_REMOVED"], replay=True)
    async with everything, removals:
        assert removals.replayed == 0  # nothing to replay for RAM_BLOCK_REMOVED
        assert (await c.query_stats()).subscribers == 1
        await c.ram_block_add("new", MiB, max_size=2 * MiB)
        await c.ram_block_resize("new", 2 * MiB)
        await c.ram_block_del("old")
        assert [(await anext(everything)).name for _ in range(3)] == [
            "RAM_BLOCK_ADDED",
            "RAM_BLOCK_RESIZED",
            "RAM_BLOCK_REMOVED",
        ]
        removed = await anext(removals)
        assert (removed.name, removed.data.id) == ("RAM_BLOCK_REMOVED", "old")
        await removals.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(removals)
        await c.ram_block_del("new")
        assert (await anext(everything)).data.id == "new"
    assert (await c.query_stats()).subscribers == 0


async def test_second_stream_replay_is_its_own(reused_daemon: Daemon, aconnect: Connect) -> None:
    c = await aconnect(reused_daemon.path)
    await c.ram_block_add("a", MiB)
    async with c.events(replay=True) as first:
        assert (await anext(first)).replay
        async with c.events(replay=True) as second:
            assert second.replayed == 1 and (await anext(second)).data.id == "a"
        await c.ram_block_del("a")
        event = await anext(first)  # the second stream's replay did not reach the first
        assert (event.name, event.replay) == ("RAM_BLOCK_REMOVED", False)


def test_unknown_event_name_is_refused_before_sending() -> None:
    client = AsyncClient()
    with pytest.raises(ValueError, match="unknown event"):
        client.events(["RAM_BLOCK_EXPLODED"])


async def test_slow_consumer_overflows_then_resync_recovers(
    daemon: Daemon, aconnect: Connect
) -> None:
    watcher = await aconnect(daemon.path)
    actor = await aconnect(daemon.path)
    for name in ("keep", "grow", "gone"):
        await actor.ram_block_add(name, MiB, max_size=64 * MiB)
    table = BlockTable()
    async with watcher.events(max_queue=5) as events:
        for _ in range(events.replayed):
            table.apply(await anext(events))
        assert set(table.blocks) == {"keep", "grow", "gone"}
        for i in range(2, 12):
            await actor.ram_block_resize("grow", i * MiB)
        await actor.ram_block_del("gone")
        await actor.ram_block_add("born", MiB)
        await watcher.query_version()  # answered after every event queued for it before
        for _ in range(10):  # the queued events are forfeit: the stream stops at once
            with pytest.raises(EventOverflow) as info:
                await anext(events)
        assert info.value.limit == 5 and info.value.last_seq == 3 + 5
    async with (r := await ramd_client.resync(table, daemon.path)).client:
        assert (r.diff.added, r.diff.removed, r.diff.resized, r.diff.replaced) == (
            ("born",),
            ("gone",),
            ("grow",),
            (),
        )
        assert r.table == BlockTable.from_infos(await actor.query_ram_blocks())
        assert r.table.blocks["grow"].size == 11 * MiB
        assert r.seq == 3 + 10 + 2 and r.table.seq == r.seq
        await actor.ram_block_resize("keep", 3 * MiB)
        event = await asyncio.wait_for(anext(r.events), 10)
        assert (event.seq, event.data.id) == (r.seq + 1, "keep")
        r.table.apply(event)
        assert r.table.blocks["keep"].size == 3 * MiB


async def test_resync_recovers_full_state_after_daemon_restart(
    start_daemon: Callable[..., Daemon], aconnect: Connect
) -> None:
    first = start_daemon()
    c = await aconnect(first.path)
    await c.ram_block_add("a", MiB, max_size=4 * MiB)
    await c.ram_block_add("b", MiB)
    table = BlockTable()
    stream = c.events()
    async with stream:
        for _ in range(stream.replayed):
            table.apply(await anext(stream))
        await c.ram_block_resize("a", 2 * MiB)
        table.apply(await anext(stream))
        assert table.blocks["a"].size == 2 * MiB and table.seq == 3

        first.stop(signal.SIGKILL)  # the connection dies with it, without a goodbye
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(anext(stream), 10)

    config = """
[[block]]
id = "a"
size = "2M"
max-size = "8M"

[[block]]
id = "c"
size = "1M"
"""
    # resync keeps retrying while the new daemon comes up on the same path.
    resyncing = asyncio.ensure_future(ramd_client.resync(table, first.path, timeout=30))
    await asyncio.sleep(0.2)
    assert not resyncing.done()
    second = await asyncio.to_thread(start_daemon, config)
    r = await asyncio.wait_for(resyncing, 30)
    async with r.client:
        assert r.attempts > 1
        assert (r.diff.added, r.diff.removed, r.diff.resized, r.diff.replaced) == (
            ("c",),
            ("b",),
            (),
            ("a",),
        )
        probe = await aconnect(second.path)
        assert r.table == BlockTable.from_infos(await probe.query_ram_blocks())
        assert list(r.table.blocks) == ["a", "c"]
        await probe.ram_block_del("c")
        event = await asyncio.wait_for(anext(r.events), 10)
        assert (event.name, event.data.id, event.seq) == ("RAM_BLOCK_REMOVED", "c", r.seq + 1)


async def test_resync_gives_up_after_timeout(tmp_path: Path) -> None:
    with pytest.raises(ConnectError):
        await ramd_client.resync(None, tmp_path / "never.sock", timeout=0.3)


# -- chunked transfers -------------------------------------------------------------------------


def test_chunk_size_respects_every_limit() -> None:
    assert chunk_size({"io-chunk": 4 * MiB, "max-message-size": 8 * MiB}, 64 * MiB) == (
        4 * MiB // (192 * 1024) * (192 * 1024)
    )
    small = chunk_size({"io-chunk": 4 * MiB, "max-message-size": 512 * 1024}, 64 * MiB)
    assert (small + 2) // 3 * 4 + 1024 <= 512 * 1024
    assert chunk_size({"io-chunk": 1000, "max-message-size": 8 * MiB}, 64 * MiB) == 1000
    assert chunk_size({"io-chunk": 4 * MiB, "max-message-size": 8 * MiB}, 100_000) < 100_000


async def test_read_and_write_range_split_under_tight_limits(
    start_daemon: Callable[..., Daemon], aconnect: Connect
) -> None:
    d = start_daemon('[limits]\nio-chunk = "64K"\nmax-message-size = "48K"\n')
    c = await aconnect(d.path)
    await c.ram_block_add("ram0", 4 * MiB)
    data = os.urandom(3 * MiB + 12345)
    done: list[int] = []
    written = await write_range(c, "ram0", 777, [data[:1000], data[1000:]], progress=done.append)
    assert written == len(data) == sum(done) and len(done) > 64
    back = b"".join([chunk async for chunk in read_range(c, "ram0", 777, len(data))])
    assert back == data
    with pytest.raises(RamdError):
        await write_range(c, "ram0", 4 * MiB - 10, data)


async def test_bulk_round_trip_at_the_default_limits_keeps_every_byte(
    daemon: Daemon, aconnect: Connect
) -> None:
    size = 3 * 4 * MiB + 12345  # whole default chunks and a ragged tail, at an odd offset
    c = await aconnect(daemon.path)
    await c.ram_block_add("bulk", 16 * MiB)
    data = os.urandom(size)
    assert await write_range(c, "bulk", 4097, data) == size
    digest = hashlib.sha256()
    async for piece in read_range(c, "bulk", 4097, size):
        digest.update(piece)
    assert digest.digest() == hashlib.sha256(data).digest()
    assert await c.ram_block_read("bulk", 4096, 1) == b"\0"


async def test_a_source_that_reuses_its_buffer_is_written_as_it_was(
    daemon: Daemon, aconnect: Connect
) -> None:
    c = await aconnect(daemon.path)
    await c.ram_block_add("bulk", 8 * MiB)
    pieces = [os.urandom(n) for n in (MiB, 3 * MiB + 5, 2 * MiB, 7)]
    shared = bytearray()

    def source() -> Iterator[bytearray]:
        for piece in pieces:  # the same buffer each time, overwritten after each yield
            shared[:] = piece
            yield shared

    written = await write_range(c, "bulk", 0, source(), chunk=MiB + 1)
    data = b"".join(pieces)
    assert written == len(data)
    assert b"".join([p async for p in read_range(c, "bulk", 0, len(data))]) == data


async def test_pipelined_writes_stop_at_the_first_refused_chunk(
    daemon: Daemon, aconnect: Connect
) -> None:
    c = await aconnect(daemon.path)
    await c.ram_block_add("bulk", 2 * MiB)
    chunk = 256 * 1024
    data = os.urandom(3 * MiB)  # chunk 8 (from 2 MiB on) runs past the end; 4 in flight
    done: list[int] = []
    with pytest.raises(RamdError, match="Range out of bounds"):
        await write_range(c, "bulk", 0, data, chunk=chunk, window=4, progress=done.append)
    assert sum(done) == 2 * MiB  # every chunk before the refusal landed
    back = b"".join([p async for p in read_range(c, "bulk", 0, 2 * MiB, chunk=chunk)])
    assert back == data[: 2 * MiB]
    with pytest.raises(RamdError):  # a read refused in the middle of a pipelined range
        async for _ in read_range(c, "bulk", MiB, 2 * MiB, chunk=chunk, window=4):
            pass
    assert (await c.query_version()).package.startswith("ramd")


# -- the synchronous client --------------------------------------------------------------------


def test_sync_client_every_command(reused_daemon: Daemon, sconnect: Callable[..., Client]) -> None:
    with sconnect(reused_daemon.path) as c:
        assert c.version is not None and c.connected
        block = c.ram_block_add("ram0", MiB, max_size=8 * MiB, hugepages=False)
        assert isinstance(block, RamBlockInfo) and block.max_size == 8 * MiB
        assert c.ram_block_resize("ram0", 2 * MiB).size == 2 * MiB
        assert [b.id for b in c.query_ram_blocks()] == ["ram0"]
        assert c.query_ram_blocks("ram0")[0].size == 2 * MiB
        assert c.ram_block_write("ram0", 10, b"hello") == 5
        assert c.ram_block_read("ram0", 8, 9) == b"\0\0hello\0\0"
        c.ram_block_discard("ram0", 0, PAGE)
        assert c.ram_block_read("ram0", 8, 9) == bytes(9)
        assert c.query_stats().blocks == 1
        assert c.query_version() == c.version
        assert {ci.name for ci in c.query_commands()} == set(COMMANDS)
        assert c.query_schema()["commands"].keys() == COMMANDS.keys()
        with pytest.raises(RamdError) as info:
            c.ram_block_resize("ram0", 16 * MiB)
        assert info.value.desc == "Size too large: ram0: 0x1000000 > 0x800000: Invalid argument"
        c.ram_block_del("ram0")
        assert c.query_ram_blocks() == []
    assert not c.connected
    c.close()  # idempotent


def test_sync_client_events(reused_daemon: Daemon, sconnect: Callable[..., Client]) -> None:
    c = sconnect(reused_daemon.path)
    c.ram_block_add("a", MiB, max_size=4 * MiB)
    with c.events() as events:
        first = events.get(timeout=10)
        assert (first.name, first.replay) == ("RAM_BLOCK_ADDED", True)
        with pytest.raises(TimeoutError):
            events.get(timeout=0.1)
        c.ram_block_resize("a", 2 * MiB)
        c.ram_block_del("a")
        names = [next(events).name for _ in range(2)]
        assert names == ["RAM_BLOCK_RESIZED", "RAM_BLOCK_REMOVED"]
    assert c.query_stats().subscribers == 0


def test_sync_client_from_many_threads(
    reused_daemon: Daemon, sconnect: Callable[..., Client]
) -> None:
    c = sconnect(reused_daemon.path)
    c.ram_block_add("ram0", 64 * PAGE)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            data = bytes([i]) * PAGE
            for _ in range(20):
                c.ram_block_write("ram0", i * PAGE, data)
                assert c.ram_block_read("ram0", i * PAGE, PAGE) == data
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_sync_client_connect_error_leaves_no_thread(tmp_path: Path) -> None:
    before = threading.active_count()
    with pytest.raises(ConnectError) as info:
        Client(tmp_path / "missing.sock")
    assert info.value.errno == errno.ENOENT
    assert threading.active_count() == before


def test_sync_client_sees_daemon_go_away(daemon: Daemon, sconnect: Callable[..., Client]) -> None:
    c = sconnect(daemon.path)
    assert c.query_ram_blocks() == []
    daemon.stop(signal.SIGKILL)
    with pytest.raises(ConnectionLost):
        for _ in range(100):  # the loss is noticed by the reader task, shortly
            c.query_stats()
            time.sleep(0.05)


def test_event_names_are_the_models() -> None:
    assert set(EVENT_NAMES) == set(schema_document()["events"])
