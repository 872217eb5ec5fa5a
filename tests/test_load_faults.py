"""Reliability under load and faults (issue 6), against the real daemon on real sockets.

Load: 32 concurrent clients (both dialects) on their own and on shared blocks while two
subscribers rebuild the block table from events alone. Faults: clients that vanish
mid-message, a SIGSTOPped subscriber process, connections past ``max-connections``, a storm
of grows the kernel refuses, a SIGKILLed daemon restarted on the same path. Throughout, a
probe client keeps being served; afterwards the daemon's RSS is bounded and its fds are back
to the baseline. No assertion is about time: deadlines only bound loops and waits.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from procfs import mappings
from wire import INTERNAL, Conn, Qmp, Rpc, b64

PAGE = 4096
MiB = 1024 * 1024
#: Generous bound on RSS growth across a fault: nothing a fault does may stay resident.
RSS_SLACK = 64 * MiB

StartDaemon = Callable[..., Daemon]


def settle_fds(d: Daemon, baseline: int, within: float = 15.0) -> int:
    """Wait (closes are asynchronous) until the daemon holds at most ``baseline`` fds."""
    deadline = time.monotonic() + within
    while True:
        n = d.fd_count()
        if n <= baseline or time.monotonic() > deadline:
            assert n <= baseline, (n, baseline, sorted(os.listdir(f"/proc/{d.pid}/fd")))
            return n
        time.sleep(0.05)


def wait_until(cond: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


class Probe:
    """A client that must keep being served while a fault goes on: each check runs a
    query, a write and a read on its own block."""

    def __init__(self, d: Daemon) -> None:
        self.rpc = Rpc(d.path)
        self.rpc.call("ram-block-add", {"id": "probe", "size": PAGE})
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        data = self.checks.to_bytes(8, "little")
        self.rpc.call("ram-block-write", {"id": "probe", "offset": 8, "data": b64(data)})
        got = self.rpc.call("ram-block-read", {"id": "probe", "offset": 8, "length": 8})
        assert got == {"data": b64(data)}

    def stats(self) -> dict[str, Any]:
        return self.rpc.call("query-stats")  # type: ignore[no-any-return]

    def close(self) -> None:
        self.rpc.close()


# -- load -----------------------------------------------------------------------------------

N_CLIENTS = 32
LOAD_SECONDS = 5.0
SHARED = ["shared0", "shared1", "shared2", "boot0"]
LOAD_CONFIG = """
[limits]
subscriber-queue = 1000000

[[block]]
id = "boot0"
size = "64K"
max-size = "256K"

[[block]]
id = "boot1"
size = "4K"
"""
OK_OR_REFUSED = {"ok", "GenericError", "DeviceNotFound"}


class LoadClient:
    """One client: random operations on its own blocks (which must all succeed and whose
    contents it models) and on shared blocks (which may be refused, never internally)."""

    def __init__(self, path: Path, index: int, dialect: str, stop_at: float) -> None:
        self.conn: Rpc | Qmp = Rpc(path) if dialect == "jsonrpc" else Qmp(path)
        self.index = index
        self.rng = random.Random(index)
        self.stop_at = stop_at
        self.own: dict[str, bytearray] = {}
        self.ops = 0
        self.refused = 0

    def run(self) -> None:
        while time.monotonic() < self.stop_at:
            if self.rng.random() < 0.6:
                self.own_op()
            else:
                self.shared_op()
            self.ops += 1
        for block_id, data in self.own.items():
            got = self.conn.call(
                "ram-block-read", {"id": block_id, "offset": 0, "length": len(data)}
            )
            assert got["data"] == b64(bytes(data)), f"{block_id}: contents lost"
        self.conn.close()

    def own_op(self) -> None:
        rng, call = self.rng, self.conn.call
        block_id = f"c{self.index}-{rng.randrange(3)}"
        data = self.own.get(block_id)
        if data is None:
            size = rng.randint(1, 4) * PAGE
            info = call("ram-block-add", {"id": block_id, "size": size, "max-size": 8 * PAGE})
            assert info["size"] == size
            self.own[block_id] = bytearray(size)
            return
        op = rng.choice(["resize", "write", "write", "read", "discard", "del"])
        if op == "resize":
            size = rng.randint(1, 8) * PAGE
            assert call("ram-block-resize", {"id": block_id, "size": size})["size"] == size
            if size > len(data):
                data += bytes(size - len(data))
            else:
                del data[size:]
        elif op == "write":
            offset = rng.randrange(len(data))
            chunk = rng.randbytes(rng.randint(0, min(600, len(data) - offset)))
            args = {"id": block_id, "offset": offset, "data": b64(chunk)}
            assert call("ram-block-write", args) == {"written": len(chunk)}
            data[offset : offset + len(chunk)] = chunk
        elif op == "read":
            offset = rng.randrange(len(data))
            length = rng.randint(0, len(data) - offset)
            got = call("ram-block-read", {"id": block_id, "offset": offset, "length": length})
            assert got["data"] == b64(bytes(data[offset : offset + length])), block_id
        elif op == "discard":
            pages = len(data) // PAGE
            first = rng.randrange(pages)
            n = rng.randint(0, pages - first)
            args = {"id": block_id, "offset": first * PAGE, "length": n * PAGE}
            assert call("ram-block-discard", args) == {}
            data[first * PAGE : (first + n) * PAGE] = bytes(n * PAGE)
        else:
            assert call("ram-block-del", {"id": block_id}) == {}
            del self.own[block_id]

    def shared_op(self) -> None:
        rng = self.rng
        block_id = rng.choice(SHARED)
        op = rng.choice(["add", "resize", "resize", "del", "read", "write", "discard"])
        pages = rng.randint(1, 8)
        if op == "add":
            args: dict[str, Any] = {"id": block_id, "size": pages * PAGE, "max-size": 64 * PAGE}
            kind, value = self.conn.outcome("ram-block-add", args)
        elif op == "resize":
            kind, value = self.conn.outcome(
                "ram-block-resize", {"id": block_id, "size": pages * PAGE}
            )
        elif op == "del":
            if block_id == "boot0":
                return
            kind, value = self.conn.outcome("ram-block-del", {"id": block_id})
        elif op == "read":
            args = {"id": block_id, "offset": rng.randrange(4) * PAGE, "length": PAGE}
            kind, value = self.conn.outcome("ram-block-read", args)
        elif op == "write":
            args = {"id": block_id, "offset": rng.randrange(4) * PAGE, "data": b64(b"s" * 100)}
            kind, value = self.conn.outcome("ram-block-write", args)
        else:
            args = {"id": block_id, "offset": rng.randrange(4) * PAGE, "length": PAGE}
            kind, value = self.conn.outcome("ram-block-discard", args)
        assert kind != INTERNAL and kind in OK_OR_REFUSED, (op, block_id, kind, value)
        self.refused += kind != "ok"


class TableSubscriber:
    """Subscribes with replay, then records every event until told to stop; ``table()``
    rebuilds the block table from those events alone and checks ``seq``."""

    def __init__(self, path: Path) -> None:
        self.conn = Rpc(path)
        self.conn.send_request("subscribe", {"replay": True}, req_id="sub")
        self.replay: list[dict[str, Any]] = []
        while (msg := self.conn.msg()).get("id") != "sub":
            self.replay.append(msg)
        self.first_seq: int = msg["result"]["seq"]
        self.live: list[dict[str, Any]] = []
        self.final_seq = -1
        self.done = threading.Event()

    def run(self) -> None:
        self.conn.sock.settimeout(0.2)
        while not self.done.is_set():
            try:
                self.live.append(self.conn.msg())
            except TimeoutError:
                continue
        self.conn.sock.settimeout(30)
        # Every event emitted before this request is queued ahead of its answer.
        self.conn.send_request("query-stats", req_id="end")
        while (msg := self.conn.msg()).get("id") != "end":
            self.live.append(msg)
        self.final_seq = msg["result"]["events-emitted"]
        self.conn.close()

    def table(self) -> list[tuple[str, int, int]]:
        table: dict[str, tuple[int, int]] = {}
        for ev in self.replay:
            data = ev["params"]["data"]
            assert ev["method"] == "RAM_BLOCK_ADDED" and data["replay"] is True, ev
            assert data["seq"] == self.first_seq and data["id"] not in table, ev
            table[data["id"]] = (data["size"], data["max-size"])
        seqs = [ev["params"]["data"]["seq"] for ev in self.live]
        assert seqs == list(range(self.first_seq + 1, self.final_seq + 1)), "gap or duplicate"
        for ev in self.live:
            name, data = ev["method"], ev["params"]["data"]
            if name == "RAM_BLOCK_ADDED":
                assert data["replay"] is False and data["id"] not in table, ev
                table[data["id"]] = (data["size"], data["max-size"])
            elif name == "RAM_BLOCK_RESIZED":
                assert table[data["id"]] == (data["old-size"], data["max-size"]), ev
                table[data["id"]] = (data["new-size"], data["max-size"])
            else:
                assert name == "RAM_BLOCK_REMOVED", ev
                assert table.pop(data["id"]) == (data["size"], data["max-size"]), ev
        return [(block_id, size, max_size) for block_id, (size, max_size) in table.items()]


def _run_threads(targets: list[Callable[[], None]], within: float) -> None:
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                errors.append(e)

        return run

    threads = [threading.Thread(target=guarded(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(within)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads), "a client hung"


def test_32_clients_and_event_rebuilt_tables_agree(start_daemon: StartDaemon) -> None:
    d = start_daemon(LOAD_CONFIG, qmp=True)
    assert d.qmp_path is not None
    subscribers = [TableSubscriber(d.path) for _ in range(2)]
    sub_threads = [threading.Thread(target=s.run, daemon=True) for s in subscribers]
    for t in sub_threads:
        t.start()
    stop_at = time.monotonic() + LOAD_SECONDS
    clients = [
        LoadClient(
            d.qmp_path if i % 4 == 3 else d.path, i, "qmp" if i % 4 == 3 else "jsonrpc", stop_at
        )
        for i in range(N_CLIENTS)
    ]
    _run_threads([c.run for c in clients], within=LOAD_SECONDS + 120)
    for s in subscribers:
        s.done.set()
    for t in sub_threads:
        t.join(60)
        assert not t.is_alive(), "a subscriber hung"
    with Rpc(d.path) as rpc:
        blocks = [(b["id"], b["size"], b["max-size"]) for b in rpc.call("query-ram-blocks")]
        emitted = rpc.call("query-stats")["events-emitted"]
    tables = [s.table() for s in subscribers]
    assert tables[0] == blocks and tables[1] == blocks
    assert subscribers[0].final_seq == emitted
    assert len(subscribers[0].live) == emitted - subscribers[0].first_seq
    assert sum(c.ops for c in clients) > N_CLIENTS, "the load did not run"
    assert sum(len(c.own) for c in clients) == sum(1 for b in blocks if b[0].startswith("c"))
    assert d.alive() and "disconnecting slow subscriber" not in d.log_text()


# -- faults ---------------------------------------------------------------------------------


def test_clients_vanishing_mid_message_leak_nothing(start_daemon: StartDaemon) -> None:
    d = start_daemon(qmp=True)
    assert d.qmp_path is not None
    probe = Probe(d)
    probe.check()
    fds0, rss0 = d.fd_count(), d.rss()
    add = json.dumps(
        {
            "jsonrpc": "2.0",
            "method": "ram-block-add",
            "params": {"id": "half", "size": PAGE},
            "id": 1,
        }
    ).encode()
    halves = [
        add[: len(add) // 2],
        add[:-1],
        b'{"execute":"ram-block-add","arguments":{"id":"half","size":4096}',
        b'{"jsonrpc":"2.0","method":"ram-block-write","params":{"data":"' + b"A" * 300_000,
        b"[" * 900,
        b'"unterminated \\',
        b"12345",
    ]
    for i in range(240):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(d.path if i % 2 else d.qmp_path))
        sock.sendall(halves[i % len(halves)])
        if i % 3 == 0:  # close with RST instead of FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        if i % 20 == 0:
            probe.check()
    # Many at once, each holding half a large message in the daemon, then all gone.
    held = []
    for _ in range(40):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(d.path))
        sock.sendall(halves[3])
        held.append(sock)
    probe.check()
    for sock in held:
        sock.close()
    probe.check()
    assert [b["id"] for b in probe.rpc.call("query-ram-blocks")] == ["probe"]
    wait_until(lambda: probe.stats()["clients"] == 1, "vanished clients forgotten")
    settle_fds(d, fds0)
    assert d.rss() <= rss0 + RSS_SLACK
    probe.check()
    probe.close()
    assert d.alive()


SUBSCRIBER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b'{"jsonrpc":"2.0","method":"subscribe","params":{"replay":false},"id":1}')
    buf = b""
    while b"\\n" not in buf:
        buf += s.recv(65536)
    print("subscribed", flush=True)
    n = 0
    try:
        while chunk := s.recv(65536):
            n += chunk.count(b"\\n")
    except ConnectionResetError:
        pass
    print("closed", n, flush=True)
    """
)


def test_sigstopped_subscriber_process_is_dropped_others_served(start_daemon: StartDaemon) -> None:
    d = start_daemon("[limits]\nsubscriber-queue = 8\n", qmp=True)
    probe = Probe(d)
    wait_until(lambda: probe.stats()["clients"] == 1, "start-up probe gone")
    fds0, rss0 = d.fd_count(), d.rss()
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, str(d.path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "subscribed"
        assert probe.stats()["subscribers"] == 1
        os.kill(proc.pid, signal.SIGSTOP)
        with Rpc(d.path) as writer:
            writer.call("ram-block-add", {"id": "w", "size": PAGE, "max-size": 64 * PAGE})
            for _batch in range(200):
                for i in range(200):
                    writer.send_request("ram-block-resize", {"id": "w", "size": (1 + i % 2) * PAGE})
                for _ in range(200):
                    assert "result" in writer.answer()
                probe.check()
                if "disconnecting slow subscriber" in d.log_text():
                    break
            else:
                raise AssertionError("the stopped subscriber was never dropped")
            assert probe.stats()["subscribers"] == 0
            assert d.rss() <= rss0 + RSS_SLACK
            os.kill(proc.pid, signal.SIGCONT)
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0 and out.startswith("closed"), out
            writer.call("ram-block-del", {"id": "w"})
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    probe.check()
    settle_fds(d, fds0)
    assert d.rss() <= rss0 + RSS_SLACK
    probe.close()


def test_connections_up_to_and_past_the_limit(start_daemon: StartDaemon) -> None:
    d = start_daemon("[limits]\nmax-connections = 6\n", qmp=True)
    assert d.qmp_path is not None
    probe = Probe(d)
    wait_until(lambda: probe.stats()["clients"] == 1, "start-up probe gone")
    held: list[Rpc | Qmp] = [Rpc(d.path) if i % 2 else Qmp(d.qmp_path) for i in range(5)]
    for conn in held:
        assert conn.call("query-version")
    fds0, rss0 = d.fd_count(), d.rss()
    limit = "Limit exceeded: max-connections is 6"
    for i in range(150):
        with Conn(d.path if i % 2 else d.qmp_path) as extra:
            lines = [json.loads(extra.raw_line())]
            if i % 3 == 0:  # talking to a refused connection changes nothing
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    extra.send(b'{"execute":"query-version"}{"jsonrpc":"2.0","method":"x","id":1}')
            lines += [json.loads(line) for line in extra.lines_until_eof()]
            if i % 2:
                assert lines == [
                    {"jsonrpc": "2.0", "id": None,
                     "error": {"code": -32000, "message": limit, "data": {"class": "GenericError"}}}
                ]  # fmt: skip
            else:
                assert lines == [{"error": {"class": "GenericError", "desc": limit}}]
        if i % 10 == 0:
            probe.check()
            assert held[i % 5].call("query-version")
    settle_fds(d, fds0)
    assert d.rss() <= rss0 + RSS_SLACK
    for conn in held:
        conn.close()
    wait_until(lambda: probe.stats()["clients"] == 1, "held clients forgotten")
    again = [Rpc(d.path) for _ in range(5)]
    for conn in again:
        assert conn.call("query-version")
        conn.close()
    probe.check()
    probe.close()


def _ram_plus_swap() -> int:
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            fields[key] = int(value.split()[0]) * 1024
    return fields["MemTotal"] + fields["SwapTotal"]


def test_storm_of_grows_the_kernel_refuses(start_daemon: StartDaemon) -> None:
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("vm.overcommit_memory=1 grants any grow: no ENOMEM to provoke")
    # max-used above RAM + swap, so the grows reach the kernel.
    d = start_daemon("[limits]\nmax-used = 18446744073709551615\n", qmp=True)
    probe = Probe(d)
    impossible = 2 * _ram_plus_swap() // PAGE * PAGE
    with Rpc(d.path) as rpc, Rpc(d.path) as watcher:
        info = rpc.call("ram-block-add", {"id": "big", "size": 2 * PAGE, "max-size": 4 * 2**40})
        rpc.call("ram-block-write", {"id": "big", "offset": PAGE - 2, "data": b64(b"keep")})
        seq = watcher.call("subscribe", {"replay": False})["seq"]
        host, end = info["host"], info["host"] + info["max-size"] + PAGE

        def layout() -> list[tuple[int, int, str]]:
            """The daemon's mappings over the block's reservation, clipped to it."""
            return [
                (max(m.start, host), min(m.end, end), m.perms)
                for m in mappings(d.pid)
                if m.end > host and m.start < end
            ]

        before, rss0 = layout(), d.rss()
        assert before[0] == (host, host + 2 * PAGE, "rw-p"), before
        want = {
            "code": -32000,
            "message": f"Cannot grow big to 0x{impossible:x}: Cannot allocate memory",
            "data": {"class": "GenericError"},
        }
        for burst in range(10):
            for _ in range(20):
                rpc.send_request("ram-block-resize", {"id": "big", "size": impossible})
            for _ in range(20):
                assert rpc.answer()["error"] == want
            probe.check()
            assert d.rss() <= rss0 + RSS_SLACK, burst
        assert layout() == before
        assert rpc.call("query-ram-blocks", {"id": "big", "resident": True}) == [
            {**info, "resident": 2 * PAGE}
        ]
        got = rpc.call("ram-block-read", {"id": "big", "offset": PAGE - 2, "length": 4})
        assert got == {"data": b64(b"keep")}
        assert rpc.call("query-stats")["events-emitted"] == seq
        assert watcher.call("query-version") and watcher.events == []
    assert d.rss() <= rss0 + RSS_SLACK
    probe.check()
    probe.close()


def test_sigkilled_daemon_restarts_on_the_same_paths(start_daemon: StartDaemon) -> None:
    for cycle in range(3):
        d = start_daemon(qmp=True)
        assert d.qmp_path is not None
        with Rpc(d.path) as rpc, Qmp(d.qmp_path) as qmp:
            assert rpc.call("query-ram-blocks") == [], "state survived a SIGKILL"
            rpc.call("ram-block-add", {"id": f"k{cycle}", "size": PAGE, "max-size": 8 * PAGE})
            assert [e["event"] for e in _events_after(qmp)] == ["RAM_BLOCK_ADDED"]
            for i in range(50):  # requests in flight when the daemon dies
                rpc.send_request(
                    "ram-block-resize", {"id": f"k{cycle}", "size": (1 + i % 8) * PAGE}
                )
            d.proc.send_signal(signal.SIGKILL)
            assert d.proc.wait(30) == -signal.SIGKILL
            with pytest.raises((ConnectionError, OSError)):
                while True:
                    rpc.answer()
        assert d.path.is_socket() and d.qmp_path.is_socket(), "no stale socket left to replace"
        for path in (d.path, d.qmp_path):
            with pytest.raises(ConnectionRefusedError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
    d = start_daemon(qmp=True)
    assert d.qmp_path is not None
    with Rpc(d.path) as rpc, Qmp(d.qmp_path) as qmp:
        assert rpc.call("query-ram-blocks") == []
        assert qmp.call("query-version")["package"].startswith("ramd ")
    assert d.stop() == 0
    assert not d.path.exists() and not d.qmp_path.exists()


def _events_after(qmp: Qmp) -> list[dict[str, Any]]:
    """The QMP events that precede the answer to one more command."""
    qmp.call("query-version")
    events, qmp.events = qmp.events, []
    return events
