"""The client's bulk receive path: :class:`ramd_client.linereader.LineReader` cutting a real
socket's stream into lines, and :func:`ramd_client.message.decode_binary`, which must give a
``ram-block-read`` caller exactly what the plain parse gives (the same bytes, or the same
error) for every line."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import ramd_client
import uvloop
from daemon import Daemon
from ramd_client.error import ProtocolError
from ramd_client.linereader import READ, LineReader
from ramd_client.message import BULK_FROM, Binary, Response, decode, decode_binary
from ramd_client.transfer import read_range, write_range

from ramd.api import models as m

KiB, MiB = 1024, 1024 * 1024
DATA = os.urandom(96 * KiB)
B64 = base64.b64encode(DATA)  # 128 KiB of base64: over BULK_FROM


def _answer(b64: bytes, **extra: Any) -> bytes:
    """A ``ram-block-read`` answer of id 7, ``extra`` members after ``data``."""
    return b'{"jsonrpc":"2.0","id":7,"result":{"data":"%s"%s}}\n' % (
        b64,
        b"".join(b',"%s":%s' % (k.encode(), json.dumps(v).encode()) for k, v in extra.items()),
    )


def _plain_read(line: bytes) -> bytes | str:
    """What ``ram_block_read`` returns (or the error it raises) through the plain parse."""
    try:
        message, _ = decode(line)
        assert isinstance(message, Response)
        result = m.ReadResult.model_validate(message.result)
        return base64.b64decode(result.data, validate=True)
    except (ProtocolError, ValueError) as e:
        return f"{type(e).__name__}"


def _bulk_read(line: bytes, wanted: bool = True) -> tuple[bytes | str, bool]:
    """The same through the client's path (decode_binary, else the plain parse), and whether
    the bulk parse took the line."""
    padded = b"xx" + line + b"yy"  # the line is a slice of a larger buffer
    got = decode_binary(padded, 2, 2 + len(line), lambda _id: wanted)
    if got is None:
        return _plain_read(line), False
    message, raw = got
    assert isinstance(message.result, Binary) and raw["result"]["data"] is message.result
    return message.result.data, True


def test_a_large_read_answer_is_decoded_in_place() -> None:
    line = _answer(B64)
    got = decode_binary(bytearray(line), 0, len(line), lambda i: i == 7, traced=True)
    assert got is not None
    message, raw = got
    assert message == Response(7, Binary(DATA))
    assert raw == json.loads(line)  # the traced object is the plain one
    assert _bulk_read(line) == (DATA, True)


@pytest.mark.parametrize(
    "line",
    [
        _answer(B64[:1000]),  # small
        _answer(B64[:1000] + b"\\/" + B64[1000:]),  # an escape in the data
        _answer(B64[:1000] + b"\\u0041" + B64[1000:]),
        _answer(B64, note="a\\"),  # a backslash elsewhere
        _answer(B64, note="ramd-client-bulk-placeholder"),  # the placeholder elsewhere
        _answer(B64, data="QUJD"),  # a later duplicate wins
        _answer(B64).replace(b'{"data":"', b'{"data":"QUJD","data":"'),  # the first is short
        _answer(B64).replace(b'"data":"', b'"data": "'),  # spacing the search does not take
        _answer(B64).replace(b'"result"', b'"error"'),
        _answer(B64).replace(b'"jsonrpc":"2.0"', b'"jsonrpc":"1.0"'),
        _answer(B64).replace(b'"id":7,', b""),  # no id: a notification-like text
        _answer(B64).replace(b'"id":7,', b'"QMP":1,"id":7,'),
        _answer(B64).replace(b'"result":{', b'"result":[{').replace(b'"}}', b'"}]}'),
        _answer(B64).replace(b'"result":{"data":', b'"result":{"other":{"data":') + b"}",
        _answer(B64[:-4] + b"QQ=="),  # still valid base64
        _answer(B64[:5000] + b"=" + B64[5000:]),  # padding inside
        _answer(B64[:5000] + b"*" + B64[5000:]),  # not the alphabet
        _answer(B64[:5000] + b" " + B64[5000:]),
        _answer(B64[:5000] + b"\t" + B64[5000:]),  # a control byte: a JSON error too
        _answer(B64[:5000] + b"\x00" + B64[5000:]),
        _answer(B64[:5000] + "é".encode() + B64[5000:]),
        _answer(B64[:-1]),  # bad length
        _answer(B64)[:-3] + b"\n",  # truncated JSON
        _answer(B64).replace(b'"}}', b'"}}}'),
        _answer(B64).replace(b'"}}', b'"}},'),
        b"\xff" + _answer(B64),  # not UTF-8
        b"[" + _answer(B64)[:-1] + b"]\n",
        _answer(B64).replace(b'"id":7', b'"id":"7"'),
    ],
)
def test_edge_cases_give_what_the_plain_parse_gives(line: bytes) -> None:
    got, _ = _bulk_read(line)
    assert got == _plain_read(line)


def test_the_bulk_parse_takes_only_lines_it_can_prove() -> None:
    assert _bulk_read(_answer(B64))[1]
    assert _bulk_read(_answer(B64[:-4] + b"QQ=="))[1]
    assert not _bulk_read(_answer(B64), wanted=False)[1]  # another call: the plain result
    assert not _bulk_read(_answer(B64[: BULK_FROM // 2]))[1]
    assert not _bulk_read(_answer(B64[:5000] + b"*" + B64[5000:]))[1]
    assert not _bulk_read(_answer(B64, note="a\\"))[1]


# -- LineReader on a real socket pair ----------------------------------------------------------

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def _run(loop: str, body: Callable[[LineReader, socket.socket], Awaitable[Any]], limit: int) -> Any:
    """``body(reader, peer)`` with ``reader`` on one end of a socket pair, ``peer`` the other."""

    async def main() -> Any:
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        transport, reader = await asyncio.get_running_loop().create_unix_connection(
            lambda: LineReader(limit), sock=ours
        )
        try:
            with peer:
                return await body(reader, peer)
        finally:
            transport.close()
            await reader.wait_closed()

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


async def _lines(reader: LineReader, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        async with asyncio.timeout(60):  # not wait_for: its task would let the loop run first
            buf, start, end = await reader.readline()
        out.append(bytes(buf[start:end]))
    return out


def _send_slowly(peer: socket.socket, data: bytes, pieces: list[int]) -> asyncio.Task[None]:
    """Send ``data`` in pieces of the sizes given (cycled), letting the loop run in between."""

    async def send() -> None:
        pos, i = 0, 0
        while pos < len(data):
            n = pieces[i % len(pieces)]
            await asyncio.get_running_loop().sock_sendall(peer, data[pos : pos + n])
            await asyncio.sleep(0)
            pos, i = pos + n, i + 1

    peer.setblocking(False)
    return asyncio.ensure_future(send())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("pieces", [[1], [7, 3, 100_000], [READ - 1, READ + 1], [5 * MiB]])
def test_lines_come_out_whole_however_the_stream_is_cut(loop: str, pieces: list[int]) -> None:
    lines = [b"{}\n", b"x" * (3 * MiB) + b"\n", b"\n", b"y" * 5 + b"\n", b"z" * (READ + 3) + b"\n"]
    if pieces == [1]:
        lines = [line[:-1][:2000] + b"\n" for line in lines]
    stream = b"".join(lines) * 3

    async def body(reader: LineReader, peer: socket.socket) -> list[bytes]:
        sender = _send_slowly(peer, stream, pieces)
        got = await _lines(reader, 3 * len(lines))
        await sender
        return got

    got = _run(loop, body, 8 * MiB)
    assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(stream).digest()
    assert got == lines * 3


@pytest.mark.parametrize("loop", LOOPS)
def test_a_line_at_the_limit_passes_and_one_byte_more_fails(loop: str) -> None:
    limit = 3 * READ + 5

    async def body(reader: LineReader, peer: socket.socket) -> tuple[int, str]:
        sender = _send_slowly(peer, b"a" * limit + b"\n" + b"b" * (limit + 1) + b"\n", [READ])
        (first,) = await _lines(reader, 1)
        with pytest.raises(ValueError) as e:
            await _lines(reader, 1)
        sender.cancel()
        return len(first), str(e.value)

    assert _run(loop, body, limit) == (limit + 1, f"a line exceeds {limit} bytes")


@pytest.mark.parametrize("loop", LOOPS)
def test_a_stream_without_newline_fails_at_the_limit_not_later(loop: str) -> None:
    limit = 2 * READ

    async def body(reader: LineReader, peer: socket.socket) -> int:
        sender = _send_slowly(peer, b"a" * (20 * limit), [READ // 3])
        with pytest.raises(ValueError):
            await _lines(reader, 1)
        sender.cancel()
        return len(reader._buf)

    assert _run(loop, body, limit) <= limit + 2 * READ


@pytest.mark.parametrize("loop", LOOPS)
def test_unread_lines_pause_the_socket_and_the_buffer_stays_bounded(loop: str) -> None:
    limit = MiB
    line = b"q" * (100 * KiB) + b"\n"

    async def body(reader: LineReader, peer: socket.socket) -> tuple[int, int]:
        sender = _send_slowly(peer, line * 100, [len(line)])
        await asyncio.sleep(0.5)  # nobody reads meanwhile: reading pauses past the limit
        while not sender.done() and not reader._reading_paused:
            await asyncio.sleep(0.05)
        held = len(reader._buf)
        got = await _lines(reader, 100)
        await sender
        assert got == [line] * 100
        return held, len(reader._buf)

    held, after = _run(loop, body, limit)
    assert held <= limit + 2 * READ and after <= limit + 2 * READ


@pytest.mark.parametrize("loop", LOOPS)
def test_the_end_of_the_stream_gives_the_partial_line_then_nothing(loop: str) -> None:
    async def body(reader: LineReader, peer: socket.socket) -> list[bytes]:
        peer.sendall(b"one\ntwo")
        peer.shutdown(socket.SHUT_WR)
        return await _lines(reader, 3)

    assert _run(loop, body, MiB) == [b"one\n", b"two", b""]


# -- through a daemon, untraced (the fixtures' clients trace, which takes the copying path) -----


async def test_an_untraced_bulk_round_trip_keeps_every_byte(daemon: Daemon) -> None:
    size = 5 * 4 * MiB + 4321
    data = os.urandom(size)
    async with await ramd_client.connect(daemon.path) as c:
        await c.ram_block_add("bulk", 24 * MiB)
        assert await write_range(c, "bulk", 999, data) == size
        digest = hashlib.sha256()
        async for piece in read_range(c, "bulk", 999, size):
            digest.update(piece)
        assert digest.digest() == hashlib.sha256(data).digest()
        assert await c.ram_block_read("bulk", 999, 200 * KiB) == data[: 200 * KiB]
        assert await c.ram_block_read("bulk", 998, 2) == b"\0" + data[:1]
        answer = await c.call("ram-block-read", {"id": "bulk", "offset": 999, "length": MiB})
        assert answer == {"data": base64.b64encode(data[:MiB]).decode()}  # call: plain JSON
