"""A stateful random test: two connections drive the same blocks (add, resize, del, get-fd
and acknowledgements, put-fd, write, discard, save, load), some steps sent in the same loop
turn, and after every step the daemon's memory must agree with what it says: each block's
``[host, host+size)`` read-write and the rest of its reservation ``PROT_NONE``, sizes in
the listing as the model expects, and never an internal error (-32603).

Each connection is a :class:`Peer`: a reader thread acknowledges at once every event that
asks for it (so a release waiting for one peer never deadlocks the driver of the other) and
hands answers to the driver thread. A connection answers its requests in order, so one that
maps a block cannot acknowledge a release it asked for itself (the acknowledgement waits
behind that request): releases are asked by a peer that does not map the block.
"""

from __future__ import annotations

import array
import base64
import json
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon import Daemon, Raw
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from procfs import mappings

PAGE = 4096
IDS = ("a", "b", "c")


class Peer:
    """One connection; see the module docstring. Thread: the driver sends and waits; the
    reader thread only reads, acknowledges and queues."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.answers: queue.Queue[dict[str, Any]] = queue.Queue()
        self.fds: dict[str, list[int]] = {}
        self._got_fds: queue.Queue[int] = queue.Queue()
        self._lock = threading.Lock()
        self._ids = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            except OSError:
                return
            for level, kind, raw in anc:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds = array.array("i")
                    fds.frombytes(raw[: len(raw) - len(raw) % 4])
                    for fd in fds:
                        self._got_fds.put(fd)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if isinstance(msg, dict) and "method" in msg and "id" not in msg:
                    event = msg["params"]["data"]
                    if event.get("ack"):
                        self._send({"method": "ram-block-ack", "params": {"seq": event["seq"]}})
                    continue
                if isinstance(msg, dict) and msg.get("id") is None and "result" in msg:
                    continue
                self.answers.put(msg)

    def _send(self, req: dict[str, Any]) -> None:
        with self._lock:
            self.sock.sendall(json.dumps({"jsonrpc": "2.0", **req}).encode())

    def send(self, method: str, **params: Any) -> int:
        """Send a request; its id (answer with :meth:`answer`)."""
        self._ids += 1
        self._send({"method": method, "params": params, "id": self._ids})
        return self._ids

    def answer(self, req_id: int, timeout: float = 30.0) -> dict[str, Any]:
        while True:
            msg = self.answers.get(timeout=timeout)
            if msg.get("id") == req_id:
                return msg
            # answers to acknowledgements sent by the reader (ids are never None there)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.answer(self.send(method, **params))

    def take_fd(self) -> int:
        return self._got_fds.get(timeout=10)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._reader.join(10)
        for fds in self.fds.values():
            for fd in fds:
                os.close(fd)
        while not self._got_fds.empty():
            os.close(self._got_fds.get())


def _checked(resp: dict[str, Any]) -> dict[str, Any]:
    """``resp``, if it is a result or a command error (never -32603)."""
    if "error" in resp:
        assert resp["error"]["code"] in (-32000, -32602), resp
    return resp


class BlockMachine(RuleBasedStateMachine):
    daemon: Daemon

    def __init__(self) -> None:
        super().__init__()
        d = self.daemon
        self.peers = [Peer(d.path), Peer(d.path)]
        self.check = Raw(d.path)
        #: id -> (size, max-size, backend) as the daemon must show them
        #: id -> (size, max-size, backend, resizable): resizable iff created with a max-size,
        #: even one equal to its size (docs/protocol.md §5).
        self.model: dict[str, tuple[int, int, str, bool]] = {}
        self.images: set[str] = set()

    def teardown(self) -> None:
        for p in self.peers:
            p.close()
        deadline = time.monotonic() + 20
        while self.check.call("query-stats")["clients"] > 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for job in self.check.call("query-jobs"):
            while job["status"] != "concluded":
                time.sleep(0.02)
                job = next(j for j in self.check.call("query-jobs") if j["id"] == job["id"])
            self.check.call("job-dismiss", id=job["id"])
        for block in self.check.call("query-ram-blocks"):
            self.check.call("ram-block-del", id=block["id"])
        self.check.close()

    def _peer(self, i: int) -> Peer:
        return self.peers[i]

    def _releaser(self, i: int, block: str) -> Peer | None:
        """Peer ``i``, or the other one if ``i`` maps ``block``; None if both do."""
        for peer in (self.peers[i], self.peers[1 - i]):
            if not peer.fds.get(block):
                return peer
        return None

    @rule(
        i=st.integers(0, 1),
        block=st.sampled_from(IDS),
        backend=st.sampled_from(["anonymous", "memfd"]),
        pages=st.integers(1, 16),
        extra=st.integers(0, 48),
        resizable=st.booleans(),
    )
    def add(
        self, i: int, block: str, backend: str, pages: int, extra: int, resizable: bool
    ) -> None:
        params: dict[str, Any] = {"id": block, "size": pages * PAGE, "backend": backend}
        if resizable:
            params["max-size"] = (pages + extra) * PAGE
        resp = _checked(self._peer(i).call("ram-block-add", **params))
        if block in self.model:
            assert "already exists" in resp["error"]["message"], resp
        else:
            assert "result" in resp, resp
            max_size = params.get("max-size", pages * PAGE)
            self.model[block] = (pages * PAGE, max_size, backend, resizable)

    @rule(
        i=st.integers(0, 1),
        block=st.sampled_from(IDS),
        pages=st.integers(1, 64),
        mode=st.sampled_from(["safe", "hard"]),
    )
    def resize(self, i: int, block: str, pages: int, mode: str) -> None:
        peer = self._releaser(i, block)
        if peer is None:
            return
        resp = _checked(peer.call("ram-block-resize", id=block, size=pages * PAGE, mode=mode))
        if block not in self.model:
            assert "not found" in resp["error"]["message"], resp
            return
        size, max_size, backend, resizable = self.model[block]
        new = pages * PAGE
        if new == size:
            assert "result" in resp, resp
        elif not resizable:
            assert "Size mismatch" in resp["error"]["message"], resp
        elif new > max_size:
            assert "Size too large" in resp["error"]["message"], resp
        elif "result" in resp:
            self.model[block] = (new, max_size, backend, resizable)
        else:
            assert "busy" in resp["error"]["message"], resp

    @rule(i=st.integers(0, 1), block=st.sampled_from(IDS), mode=st.sampled_from(["safe", "hard"]))
    def delete(self, i: int, block: str, mode: str) -> None:
        peer = self._releaser(i, block)
        if peer is None:
            return
        resp = _checked(peer.call("ram-block-del", id=block, mode=mode))
        if block not in self.model:
            assert "not found" in resp["error"]["message"], resp
        elif "result" in resp:
            del self.model[block]
            for p in self.peers:
                for fd in p.fds.pop(block, []):
                    os.close(fd)
        else:
            assert "busy" in resp["error"]["message"], resp

    @rule(i=st.integers(0, 1), block=st.sampled_from(IDS), readonly=st.booleans())
    def get_fd(self, i: int, block: str, readonly: bool) -> None:
        peer = self._peer(i)
        resp = _checked(peer.call("ram-block-get-fd", id=block, readonly=readonly))
        if "result" in resp:
            assert block in self.model and self.model[block][2] != "anonymous", resp
            fd = peer.take_fd()
            assert os.fstat(fd).st_size == resp["result"]["size"] == self.model[block][0]
            peer.fds.setdefault(block, []).append(fd)

    @rule(i=st.integers(0, 1), block=st.sampled_from(IDS))
    def put_fd(self, i: int, block: str) -> None:
        peer = self._peer(i)
        resp = _checked(peer.call("ram-block-put-fd", id=block))
        assert ("result" in resp) == bool(peer.fds.get(block)), resp
        for fd in peer.fds.pop(block, []):
            os.close(fd)

    @rule(i=st.integers(0, 1), block=st.sampled_from(IDS), page=st.integers(0, 63))
    def write_and_discard(self, i: int, block: str, page: int) -> None:
        peer = self._peer(i)
        data = base64.b64encode(bytes([page + 1]) * 100).decode()
        resp = _checked(peer.call("ram-block-write", id=block, offset=page * PAGE, data=data))
        inside = block in self.model and page * PAGE + 100 <= self.model[block][0]
        assert ("result" in resp) == inside, resp
        if inside:
            back = peer.call("ram-block-read", id=block, offset=page * PAGE, length=100)
            assert base64.b64decode(back["result"]["data"]) == bytes([page + 1]) * 100
            _checked(peer.call("ram-block-discard", id=block, offset=page * PAGE, length=PAGE))

    def _wait_job(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:
            job = next(j for j in self.check.call("query-jobs") if j["id"] == job_id)
            if job["status"] == "concluded":
                self.check.call("job-dismiss", id=job_id)
                return job  # type: ignore[no-any-return]
            assert time.monotonic() < deadline
            time.sleep(0.01)

    @precondition(lambda self: self.model)
    @rule(i=st.integers(0, 1), name=st.sampled_from(["x", "y"]))
    def save(self, i: int, name: str) -> None:
        resp = _checked(self._peer(i).call("ram-save", target={"file": name}))
        assert "result" in resp, resp
        job = self._wait_job(resp["result"]["job-id"])
        assert "error" not in job, job
        self.images.add(name)

    @precondition(lambda self: self.images)
    @rule(i=st.integers(0, 1), name=st.sampled_from(["x", "y"]))
    def load(self, i: int, name: str) -> None:
        if name not in self.images:
            return
        resp = _checked(self._peer(i).call("ram-load", source={"file": name}))
        assert "result" in resp, resp
        self._wait_job(resp["result"]["job-id"])
        self._resync()

    @rule(
        i=st.integers(0, 1),
        block=st.sampled_from(IDS),
        pages=st.integers(1, 64),
        other=st.sampled_from(
            ["ram-save", "ram-block-del", "ram-block-get-fd", "ram-block-resize"]
        ),
    )
    def same_turn(self, i: int, block: str, pages: int, other: str) -> None:
        """A resize from one peer and another command on the same block from the other,
        both read by the daemon in one loop turn: each is done or refused, never -32603."""
        first, second = self._peer(i), self._peer(1 - i)
        if first.fds.get(block) or (other != "ram-block-get-fd" and second.fds.get(block)):
            return
        params: dict[str, Any] = {"id": block}
        if other == "ram-save":
            params = {"target": {"file": "z"}, "blocks": [block]}
        elif other == "ram-block-resize":
            params["size"] = PAGE
        os.kill(self.daemon.pid, signal.SIGSTOP)
        try:
            a = first.send("ram-block-resize", id=block, size=pages * PAGE)
            b = second.send(other, **params)
        finally:
            os.kill(self.daemon.pid, signal.SIGCONT)
        _checked(first.answer(a))
        resp = _checked(second.answer(b))
        if other == "ram-save" and "result" in resp:
            self._wait_job(resp["result"]["job-id"])
        if other == "ram-block-get-fd" and "result" in resp:
            second.fds.setdefault(block, []).append(second.take_fd())
        self._resync()

    def _resync(self) -> None:
        """Take the daemon's listing as the model (after steps whose order is not fixed)."""
        listed = {b["id"]: b for b in self.check.call("query-ram-blocks")}
        self.model = {k: _facts(b) for k, b in listed.items()}
        for p in self.peers:
            for block in [k for k in p.fds if k not in listed]:
                for fd in p.fds.pop(block):
                    os.close(fd)

    @invariant()
    def memory_agrees_with_the_listing(self) -> None:
        listed = self.check.call("query-ram-blocks")
        got = {b["id"]: _facts(b) for b in listed}
        assert got == self.model
        maps = mappings(self.daemon.pid)
        for b in listed:
            host, size = b["host"], b["size"]
            end = host + b["max-size"] + b["page-size"]
            for m in maps:
                lo, hi = max(m.start, host), min(m.end, end)
                if lo >= hi:
                    continue
                if hi <= host + size:
                    assert m.perms.startswith("rw"), (b, m)
                else:
                    assert lo >= host + size and m.perms.startswith("---"), (b, m)


def _facts(block: dict[str, Any]) -> tuple[int, int, str, bool]:
    """What the model keeps of a listed block."""
    return (block["size"], block["max-size"], block["backend"], block["resizable"])


def test_two_connections_keep_every_block_consistent(
    start_daemon: Callable[..., Daemon],
) -> None:
    BlockMachine.daemon = start_daemon("[limits]\nack-timeout = 2\n")
    run_state_machine_as_test(
        BlockMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    assert BlockMachine.daemon.alive()
