"""An answer is written in the loop turn its last call ran in, so that no event of another
connection overtakes it. Before, with the pipeline's budget spent right after a call ran (a
loaded machine), the answer waited for a later turn, and any event that another client's
command sent meanwhile went first: a new mapper could see the shrink of a block before the
``ram-block-get-fd`` answer that made it a mapper (and gave the old size). Found by reading
the pipeline while chasing SIGBUS in issue 21's load test (that SIGBUS was the load client's
own bug); not observed end to end.

The pipeline runs here with its budget spent (``budget=0``), in the daemon's own classes: a
service, a JSON-RPC dialect per session, and an output on a real socket pair."""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import os
import socket
import termios
from collections.abc import Sequence
from typing import Any

from ramd.api.events import Event
from ramd.api.service import Service, Session
from ramd.transport.protocol.jsonrpc import JsonRpcDialect
from ramd.transport.sockets.fdflight import FdFlight
from ramd.transport.sockets.output import Output
from ramd.transport.sockets.pipeline import Pipeline, State

PAGE = 4096


class _Sink:
    """A session's events go to its output, as a connection sends them."""

    def __init__(self) -> None:
        self.output: Output | None = None
        self.dialect: JsonRpcDialect | None = None

    def send_event(self, event: Event, live: bool = True) -> None:
        assert self.output is not None and self.dialect is not None
        wire = self.dialect.encode_event(event)
        if wire is not None:
            self.output.event(wire, live)

    async def drained(self) -> None:
        return None


def _read_messages(sock: socket.socket) -> tuple[list[dict[str, Any]], list[int]]:
    """Every message available on ``sock`` and the fds that came with them."""
    buf, fds = b"", []
    sock.setblocking(False)
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(16))
        except BlockingIOError:
            break
        for _, _, raw in anc:
            fds.extend(array.array("i", raw[: len(raw) - len(raw) % 4]))
        buf += data
    return [json.loads(line) for line in buf.splitlines()], fds


async def _scenario() -> tuple[State, list[dict[str, Any]], list[int]]:
    loop = asyncio.get_running_loop()
    service = Service()
    service.ram.add("m", 4 * PAGE, 64 * PAGE, backend="memfd")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)

    def send_fds(first: bytes, fds: Sequence[int]) -> None:
        rights = array.array("i", fds).tobytes()
        ours.sendmsg([first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])

    sink = _Sink()
    mapper = JsonRpcDialect(Session(service, sink))

    def unread() -> int:
        count = array.array("i", [0])
        fcntl.ioctl(ours.fileno(), termios.TIOCOUTQ, count)
        return count[0]

    sink.output = output = Output(transport, 1024, lambda: None, send_fds, unread, FdFlight())
    sink.dialect = mapper
    other = JsonRpcDialect(Session(service, _Sink()))
    pipeline = Pipeline(mapper, output)
    pipeline.push(b'{"jsonrpc":"2.0","method":"ram-block-get-fd","params":{"id":"m"},"id":1}')
    state = pipeline.run(budget=0)
    # another client grows the block in the next loop turn: this session maps it now
    other.handle(
        b'{"jsonrpc":"2.0","method":"ram-block-resize","params":{"id":"m",'
        b'"size":%d},"id":1}' % (8 * PAGE)
    )
    await asyncio.sleep(0.05)
    messages, fds = _read_messages(theirs)
    transport.close()
    theirs.close()
    service.ram.close()
    return state, messages, fds


def test_an_answer_goes_out_before_events_that_follow_its_call() -> None:
    state, messages, fds = asyncio.run(_scenario())
    assert state is State.IDLE
    assert [m.get("id", m.get("method")) for m in messages] == [1, "RAM_BLOCK_RESIZED"], messages
    assert messages[0]["result"]["size"] == 4 * PAGE
    assert messages[1]["params"]["data"]["old-size"] == 4 * PAGE
    assert len(fds) == 1
    assert os.fstat(fds[0]).st_size == 8 * PAGE
    for fd in fds:
        os.close(fd)
