"""Framing, events and subscriptions against the real daemon over raw sockets."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from daemon import Daemon, Raw

PAGE = 4096
MiB = 1024 * 1024


def _req(method: str, rid: Any, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": rid}).encode()


def test_request_split_across_writes(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as rpc:
        for byte in _req("ram-block-add", 1, id="a", size=PAGE):
            rpc.send(bytes([byte]))
        assert rpc.reply()["result"]["id"] == "a"


def test_several_requests_in_one_write(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as rpc:
        rpc.send(_req("query-version", 1) + _req("query-version", 2) + b"\n" + _req("nope", 3))
        assert [rpc.reply()["id"] for _ in range(3)] == [1, 2, 3]


def test_malformed_json_then_valid_request(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as rpc:
        rpc.send(b'{"jsonrpc": "2.0", "method": oops}')
        err = rpc.reply()
        assert err["error"]["code"] == -32700 and err["id"] is None
        rpc.send(b"}")
        assert rpc.reply()["error"]["code"] == -32700
        assert rpc.call("query-version")["package"].startswith("ramd ")


def test_oversized_message_is_refused_and_others_are_served(start_daemon: Any) -> None:
    d = start_daemon('[limits]\nmax-message-size = "64K"\n')
    with Raw(d.path) as big, Raw(d.path) as other:
        big.send(b'{"jsonrpc":"2.0","method":"ram-block-write","params":{"data":"')
        for _ in range(8):
            big.send(b"A" * 16384)
            assert other.call("query-version")
        big.send(b'"},"id":1}')
        err = big.reply()
        assert err["error"]["code"] == -32700 and err["id"] is None
        assert "size limit" in err["error"]["data"]
        assert big.call("query-version")
    with Raw(d.path) as deep:
        deep.send(b"[" * 2000 + b"]" * 2000)
        assert deep.reply()["error"]["code"] == -32700
        assert deep.call("query-version")


def test_default_limit_is_8_mib(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as rpc:
        rpc.send(b'["' + b"x" * (8 * MiB + 10) + b'"]')
        assert rpc.reply()["error"]["code"] == -32700
        assert rpc.call("query-version")


def test_own_events_come_before_the_response(daemon: Daemon) -> None:
    with Raw(daemon.path) as rpc:
        rpc.call("ram-block-add", id="a", size=PAGE, **{"max-size": MiB})
        assert rpc.call("subscribe", replay=False) == {
            "seq": 1,
            "events": [
                "RAM_BLOCK_ADDED",
                "RAM_BLOCK_RESIZED",
                "RAM_BLOCK_REMOVED",
                "JOB_STATUS_CHANGE",
                "RAM_BLOCK_ATTACHED",
                "RAM_BLOCK_DETACHED",
            ],
        }
        rpc.send(_req("ram-block-resize", 7, id="a", size=2 * PAGE))
        first, second = rpc.line(), rpc.line()
        assert first["method"] == "RAM_BLOCK_RESIZED"
        assert first["params"]["data"] == {
            "seq": 2, "id": "a", "host": first["params"]["data"]["host"],
            "old-size": PAGE, "new-size": 2 * PAGE, "max-size": MiB, "ack": False,
        }  # fmt: skip
        ts = first["params"]["timestamp"]
        assert abs(ts["seconds"] + ts["microseconds"] / 1e6 - time.time()) < 60
        assert 0 <= ts["microseconds"] < 1_000_000
        assert second["id"] == 7 and second["result"]["size"] == 2 * PAGE


def test_second_client_sees_changes_with_gapless_seq(daemon: Daemon) -> None:
    with Raw(daemon.path) as a, Raw(daemon.path) as b:
        b.call("subscribe")
        a.call("ram-block-add", id="x", size=PAGE, **{"max-size": 16 * PAGE})
        for n in range(2, 8):
            a.call("ram-block-resize", id="x", size=n * PAGE)
        a.call("ram-block-resize", id="x", size=PAGE)
        a.call("ram-block-resize", id="x", size=PAGE)
        a.call("ram-block-del", id="x")
        while len(b.events) < 9:
            b.events.append(b.line())
        names = [e["method"] for e in b.events]
        assert names == ["RAM_BLOCK_ADDED"] + ["RAM_BLOCK_RESIZED"] * 7 + ["RAM_BLOCK_REMOVED"]
        assert [e["params"]["data"]["seq"] for e in b.events] == list(range(1, 10))
        assert b.events[0]["params"]["data"]["replay"] is False
        assert b.events[-1]["params"]["data"]["size"] == PAGE


def test_replay_one_added_per_block_before_the_response(daemon: Daemon) -> None:
    with Raw(daemon.path) as a:
        for name in ("c", "a", "b"):
            a.call("ram-block-add", id=name, size=PAGE)
        a.call("ram-block-resize", id="c", size=PAGE)
        with Raw(daemon.path) as s:
            s.send(_req("subscribe", 1))
            msgs = [s.line() for _ in range(4)]
            assert [m.get("method") for m in msgs[:3]] == ["RAM_BLOCK_ADDED"] * 3
            assert [m["params"]["data"]["id"] for m in msgs[:3]] == ["c", "a", "b"]
            assert all(m["params"]["data"]["replay"] is True for m in msgs[:3])
            assert all(m["params"]["data"]["seq"] == 3 for m in msgs[:3])
            assert msgs[3]["result"]["seq"] == 3
        with Raw(daemon.path) as f:
            f.send(_req("subscribe", 1, events=["RAM_BLOCK_REMOVED"]))
            assert f.line()["result"] == {"seq": 3, "events": ["RAM_BLOCK_REMOVED"]}
            a.call("ram-block-add", id="d", size=PAGE)
            a.call("ram-block-del", id="d")
            ev = f.line()
            assert (ev["method"], ev["params"]["data"]["seq"]) == ("RAM_BLOCK_REMOVED", 5)
            assert f.call("unsubscribe") == {}
            a.call("ram-block-del", id="a")
            assert f.call("query-version") and f.events == []
        err = a.error("subscribe", events=["NOPE"])
        assert err["code"] == -32602 and err["message"].startswith("events.0:")


def test_slow_subscriber_is_dropped_others_get_everything(start_daemon: Any) -> None:
    d = start_daemon("[limits]\nsubscriber-queue = 16\n")
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(str(d.path))
    slow.sendall(_req("subscribe", 1))
    rounds = 3000
    with Raw(d.path) as good, Raw(d.path) as writer:
        good.call("subscribe", replay=False)
        seqs: list[int] = []

        def consume() -> None:
            while len(seqs) < rounds + 1:
                seqs.append(good.line()["params"]["data"]["seq"])

        reader = threading.Thread(target=consume)
        reader.start()
        writer.call("ram-block-add", id="a", size=PAGE, **{"max-size": 64 * PAGE})
        rss0 = d.rss()
        for i in range(rounds):
            writer.send(_req("ram-block-resize", i, id="a", size=(2 + i % 2) * PAGE))
            if i % 100 == 99:
                for _ in range(100):
                    writer.reply()
        reader.join(60)
        assert seqs == list(range(1, rounds + 2))
        assert "disconnecting slow subscriber" in d.log_text()
        stats = writer.call("query-stats")
        assert stats["subscribers"] == 1 and stats["dropped-subscribers"] == 1
        assert d.rss() - rss0 < 64 * MiB
    slow.settimeout(5)
    total = 0
    while chunk := slow.recv(1 << 16):
        total += len(chunk)
    slow.close()
    assert total > 0


def test_client_that_writes_but_never_reads_is_held_to_bounded_memory(start_daemon: Any) -> None:
    d = start_daemon('[limits]\nio-chunk = "4M"\n')
    with Raw(d.path) as setup:
        setup.call("ram-block-add", id="m", size=4 * MiB)
    rss0 = d.rss()
    hog = socket.socket(socket.AF_UNIX)
    hog.connect(str(d.path))
    for i in range(4):  # large answers nobody reads: the daemon's output backs up
        hog.sendall(_req("ram-block-read", i, id="m", offset=0, length=4 * MiB))
    payload = "A" * (4 * MiB // 3 * 4)
    write = _req("ram-block-write", 99, id="m", offset=0, data=payload)
    hog.settimeout(2.0)
    sent = 0
    try:
        for _ in range(40):
            hog.sendall(write)
            sent += 1
    except TimeoutError:
        pass
    assert sent < 40, "the daemon kept reading from a client whose answers pile up"
    assert d.rss() - rss0 < 160 * MiB
    with Raw(d.path) as other:
        assert other.call("query-ram-blocks", id="m")[0]["size"] == 4 * MiB
    hog.close()


def test_replay_of_many_blocks_is_not_a_slow_subscriber(start_daemon: Any) -> None:
    d = start_daemon("[limits]\nsubscriber-queue = 16\n")
    count = 3000
    with Raw(d.path) as rpc:
        for first in range(0, count, 1000):
            batch = [
                {
                    "jsonrpc": "2.0",
                    "method": "ram-block-add",
                    "params": {"id": f"b{i}", "size": 1},
                    "id": i,
                }
                for i in range(first, first + 1000)
            ]
            rpc.send(json.dumps(batch).encode())
            assert len(rpc.reply()) == 1000
    with Raw(d.path) as late:
        late.send(_req("subscribe", "s"))
        time.sleep(0.5)  # not reading while the replay is written
        replayed = [late.line() for _ in range(count)]
        assert late.line()["result"]["seq"] == count
        assert [e["params"]["data"]["id"] for e in replayed] == [f"b{i}" for i in range(count)]
        assert late.call("query-version")
    assert "slow subscriber" not in d.log_text()


def test_nesting_up_to_the_limit_parses_and_long_integers_are_worded(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as rpc:
        deep = "[" * 1022 + "]" * 1022  # 1024 levels with the request and its params
        rpc.send(b'{"jsonrpc":"2.0","method":"query-version","params":{"x":' + deep.encode())
        rpc.send(b'},"id":1}')
        err = rpc.reply()["error"]
        assert err["code"] == -32602 and err["message"].startswith("x: Extra inputs")
        rpc.send(b'{"jsonrpc":"2.0","method":"ram-block-add","params":{"id":"x","size":')
        rpc.send(b"9" * 5000 + b'},"id":2}')
        err = rpc.reply()
        assert err["error"]["code"] == -32700
        assert err["error"]["data"] == "integer with too many digits"
        rpc.send(b"[" * 1025 + b"]" * 1025)
        assert rpc.reply()["error"]["code"] == -32700
        assert rpc.call("query-version")
