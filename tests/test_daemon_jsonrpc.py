"""Every command of docs/protocol.md §5 over raw JSON-RPC 2.0 against the real daemon."""

from __future__ import annotations

import base64
import json
import select
import time
from typing import Any

import pytest
from daemon import Daemon, Raw
from procfs import mem_total_bytes, swap_total_bytes

PAGE = 4096
MiB = 1024 * 1024
GiB = 1024 * MiB
TiB = 1024 * GiB

INFO_KEYS = {
    "id", "size", "max-size", "resizable", "page-size", "host", "offset", "backend",
    "shared", "persistent", "prealloc", "merge", "dump", "hugepages", "hugetlb", "lock", "sealed",
    "mappers", "leases", "holders",
}  # fmt: skip


@pytest.fixture
def rpc(reused_daemon: Daemon) -> Any:
    """A connection to the daemon that the tests of this module share."""
    with Raw(reused_daemon.path) as r:
        yield r


@pytest.fixture
def fresh_rpc(daemon: Daemon) -> Any:
    """A connection to a daemon of this test's own (counters start from zero)."""
    with Raw(daemon.path) as r:
        yield r


def test_add_returns_ram_block_info(rpc: Raw) -> None:
    info = rpc.call("ram-block-add", id="ram0", size=PAGE + 1, **{"max-size": TiB})
    assert set(info) == INFO_KEYS
    assert info["size"] == 2 * PAGE and info["max-size"] == TiB and info["resizable"] is True
    assert (info["backend"], info["page-size"], info["offset"]) == ("anonymous", PAGE, 0)
    assert info["dump"] is True and info["prealloc"] is False
    (listed,) = rpc.call("query-ram-blocks", id="ram0", resident=True)
    assert listed == {**info, "resident": 0}
    fixed = rpc.call("ram-block-add", id="f", size=3 * PAGE)
    assert fixed["max-size"] == fixed["size"] == 3 * PAGE and fixed["resizable"] is False
    assert fixed["offset"] == TiB


def test_query_in_creation_order_and_by_id(rpc: Raw) -> None:
    for name in ("c", "a", "b"):
        rpc.call("ram-block-add", id=name, size=PAGE)
    assert [b["id"] for b in rpc.call("query-ram-blocks")] == ["c", "a", "b"]
    only = rpc.call("query-ram-blocks", id="a")
    assert [b["id"] for b in only] == ["a"]
    err = rpc.error("query-ram-blocks", id="zz")
    assert err == {
        "code": -32000,
        "message": "RAM block 'zz' not found",
        "data": {"class": "DeviceNotFound"},
    }


def test_resize_grow_shrink_and_noop(rpc: Raw) -> None:
    rpc.call("ram-block-add", id="r", size=PAGE, **{"max-size": 64 * MiB})
    assert rpc.call("ram-block-resize", id="r", size=32 * MiB)["size"] == 32 * MiB
    assert rpc.call("ram-block-resize", id="r", size=100)["size"] == PAGE
    assert rpc.call("ram-block-resize", id="r", size=PAGE)["size"] == PAGE


def test_resize_error_texts(rpc: Raw) -> None:
    rpc.call("ram-block-add", id="fixed", size=4 * PAGE)
    rpc.call("ram-block-add", id="r", size=4 * PAGE, **{"max-size": 8 * PAGE})
    assert rpc.error("ram-block-resize", id="fixed", size=8 * PAGE) == {
        "code": -32000,
        "message": "Size mismatch: fixed: 0x8000 != 0x4000: Invalid argument",
        "data": {"class": "GenericError"},
    }
    err = rpc.error("ram-block-resize", id="r", size=9 * PAGE)
    assert err["message"] == "Size too large: r: 0x9000 > 0x8000: Invalid argument"
    assert err["data"] == {"class": "GenericError"}
    err = rpc.error("ram-block-resize", id="none", size=PAGE)
    assert err["message"] == "RAM block 'none' not found"
    assert err["data"]["class"] == "DeviceNotFound"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_grow_the_kernel_refuses_changes_nothing_and_emits_nothing(
    start_daemon: Any, loop: str
) -> None:
    # max-used above RAM + swap, so the grow reaches the kernel.
    daemon = start_daemon("[limits]\nmax-used = 18446744073709551615\n", "--event-loop", loop)
    with Raw(daemon.path) as a, Raw(daemon.path) as watcher:
        a.call("ram-block-add", id="big", size=PAGE, **{"max-size": 4 * TiB})
        a.call("ram-block-write", id="big", offset=0, data=base64.b64encode(b"keep").decode())
        seq = watcher.call("subscribe", replay=False)["seq"]
        impossible = (mem_total_bytes() + swap_total_bytes()) * 2 // PAGE * PAGE
        err = a.error("ram-block-resize", id="big", size=impossible)
        assert err == {
            "code": -32000,
            "message": f"Cannot grow big to 0x{impossible:x}: Cannot allocate memory",
            "data": {"class": "GenericError"},
        }
        assert a.call("query-ram-blocks", id="big")[0]["size"] == PAGE
        assert base64.b64decode(a.call("ram-block-read", id="big", offset=0, length=4)["data"]) == (
            b"keep"
        )
        a.call("ram-block-resize", id="big", size=2 * PAGE)
        watcher.call("query-version")
        assert [e["params"]["data"]["seq"] for e in watcher.events] == [seq + 1]
        assert watcher.events[0]["method"] == "RAM_BLOCK_RESIZED"


def test_add_errors(rpc: Raw) -> None:
    rpc.call("ram-block-add", id="a", size=PAGE)
    dup = rpc.error("ram-block-add", id="a", size=PAGE)
    assert dup["data"] == {"class": "GenericError"} and "already exists" in dup["message"]
    pre = rpc.error("ram-block-add", id="p", size=PAGE, prealloc=True, **{"max-size": 2 * PAGE})
    assert pre["data"] == {"class": "GenericError"}
    assert "prealloc is not supported" in pre["message"]
    small = rpc.error("ram-block-add", id="s", size=2 * PAGE, **{"max-size": PAGE})
    assert small["message"] == "Size too large: s: 0x2000 > 0x1000: Invalid argument"
    align = rpc.error("ram-block-add", id="al", size=PAGE, align=3 * PAGE)
    assert align == {
        "code": -32602,
        "message": "align: Value error, must be a power of two",
    }
    small = rpc.error("ram-block-add", id="al", size=PAGE, align=PAGE // 2)
    assert small["data"] == {"class": "GenericError"}
    assert small["message"].startswith("Invalid align: al: 0x800: must be a power of two")


def test_del(rpc: Raw) -> None:
    rpc.call("ram-block-add", id="a", size=PAGE)
    assert rpc.call("ram-block-del", id="a") == {}
    assert rpc.call("query-ram-blocks") == []
    assert rpc.error("ram-block-del", id="a")["data"] == {"class": "DeviceNotFound"}


def test_read_write_discard(rpc: Raw) -> None:
    rpc.call("ram-block-add", id="m", size=4 * PAGE, **{"max-size": 16 * PAGE})
    payload = bytes(range(256)) * 32
    assert rpc.call("ram-block-write", id="m", offset=100, data=base64.b64encode(payload).decode())
    back = rpc.call("ram-block-read", id="m", offset=100, length=len(payload))["data"]
    assert base64.b64decode(back) == payload
    assert rpc.call("query-ram-blocks", id="m", resident=True)[0]["resident"] == 3 * PAGE
    assert rpc.call("ram-block-discard", id="m", offset=0, length=2 * PAGE) == {}
    assert rpc.call("query-ram-blocks", id="m", resident=True)[0]["resident"] == PAGE
    zeros = rpc.call("ram-block-read", id="m", offset=0, length=2 * PAGE)["data"]
    assert base64.b64decode(zeros) == bytes(2 * PAGE)


def _bulk_write(req_id: int, offset: int, data: bytes) -> bytes:
    head = b'{"jsonrpc":"2.0","method":"ram-block-write","id":%d,' % req_id
    return head + b'"params":{"id":"m","offset":%d,"data":"%s"}}' % (offset, data)


def test_pipelined_bulk_writes_answer_in_order_around_refused_ones(rpc: Raw) -> None:
    """Large writes sent at once (the daemon's bulk parse): each is answered in order; a
    refused one in the middle changes nothing and the ones after it still run."""
    rpc.call("ram-block-add", id="m", size=4 * 1024 * 1024)
    first, last = bytes([1]) * 1024 * 1024, bytes([3]) * 1024 * 1024
    bad = base64.b64encode(bytes([2]) * 1024 * 1024)
    rpc.send(
        _bulk_write(1, 0, base64.b64encode(first))
        + _bulk_write(2, 1024 * 1024, bad[:1000] + b"*" + bad[1001:])  # not base64
        + _bulk_write(3, 1024 * 1024, bad[:1000] + b"\xff" + bad[1001:])  # not UTF-8
        + _bulk_write(4, 4 * 1024 * 1024 - 10, bad)  # past the end
        + _bulk_write(5, 2 * 1024 * 1024, base64.b64encode(last))
    )
    answers = [rpc.reply() for _ in range(5)]
    assert answers[0] == {"jsonrpc": "2.0", "result": {"written": len(first)}, "id": 1}
    assert answers[1]["id"] == 2 and answers[1]["error"]["code"] == -32602
    assert answers[1]["error"]["message"].startswith("data: ")
    assert answers[2]["id"] is None and answers[2]["error"]["code"] == -32700
    assert answers[3]["id"] == 4 and answers[3]["error"]["message"].startswith("Range out of")
    assert answers[4] == {"jsonrpc": "2.0", "result": {"written": len(last)}, "id": 5}
    got = base64.b64decode(
        rpc.call("ram-block-read", id="m", offset=0, length=3 * 1024 * 1024)["data"]
    )
    assert got == first + bytes(1024 * 1024) + last


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("ram-block-read", {"offset": 4 * PAGE, "length": 1}),
        ("ram-block-read", {"offset": 0, "length": 4 * PAGE + 1}),
        ("ram-block-read", {"offset": 2**64 - 1, "length": 2**64 - 1}),
        ("ram-block-write", {"offset": 4 * PAGE - 1, "data": "AAA="}),
        ("ram-block-write", {"offset": 2**63, "data": "AA=="}),
        ("ram-block-discard", {"offset": 4 * PAGE, "length": PAGE}),
        ("ram-block-discard", {"offset": 1, "length": PAGE}),
        ("ram-block-discard", {"offset": 0, "length": 2**64 - PAGE}),
    ],
)
def test_access_outside_used_range_is_generic_error(
    rpc: Raw, method: str, args: dict[str, Any]
) -> None:
    rpc.call("ram-block-add", id="m", size=4 * PAGE, **{"max-size": 16 * PAGE})
    err = rpc.error(method, id="m", **args)
    assert err["code"] == -32000 and err["data"] == {"class": "GenericError"}
    assert rpc.call("query-ram-blocks", id="m")[0]["size"] == 4 * PAGE


def test_bad_base64_and_io_chunk_limit(start_daemon: Any) -> None:
    d = start_daemon('[limits]\nio-chunk = "8K"\n')
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="m", size=64 * PAGE)
        err = rpc.error("ram-block-write", id="m", offset=0, data="not base64!")
        assert err == {"code": -32602, "message": "data: Value error, not valid base64"}
        err = rpc.error("ram-block-write", id="m", offset=0, data=12)
        assert err == {"code": -32602, "message": "data: Input should be a valid string"}
        err = rpc.error("ram-block-read", id="m", offset=0, length=8 * 1024 + 1)
        assert err["message"].startswith("Limit exceeded: io-chunk is 8192")
        assert len(rpc.call("ram-block-read", id="m", offset=0, length=8 * 1024)["data"]) > 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"id": "a", "size": 0}, "size: Input should be greater than 0"),
        ({"id": "a"}, "size: Field required"),
        ({"id": "a", "size": 1, "bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"id": "a", "size": "1"}, "size: Input should be a valid integer"),
        ({"id": "a", "size": 1.5}, "size: Input should be a valid integer"),
        ({"id": "a", "size": True}, "size: Input should be a valid integer"),
        ({"id": "a", "size": 2**64}, "size: Input should be less than or equal to"),
        ({"id": "a", "size": -1}, "size: Input should be greater than 0"),
        ({"id": "9a", "size": 1}, "id: String should match pattern"),
        ({"id": "a" * 65, "size": 1}, "id: String should match pattern"),
        ({"id": "a", "size": 1, "dump": 1}, "dump: Input should be a valid boolean"),
    ],
)
def test_invalid_params_name_the_field(rpc: Raw, params: dict[str, Any], message: str) -> None:
    err = rpc.error("ram-block-add", params)
    assert err["code"] == -32602
    assert err["message"].startswith(message)


def test_protocol_errors(rpc: Raw) -> None:
    rpc.send(b'{"jsonrpc":"2.0","method":"nope","id":1}')
    assert rpc.reply()["error"]["code"] == -32601
    rpc.send(b'{"jsonrpc":"2.0","method":"query-version","params":[1],"id":2}')
    assert rpc.reply() == {
        "jsonrpc": "2.0",
        "error": {
            "code": -32602,
            "message": "Invalid params",
            "data": "params must be an object (by-name), not an array",
        },
        "id": 2,
    }
    for bad in (b'{"method":"query-version","id":3}', b"42", b'{"jsonrpc":"2.0","id":4}'):
        rpc.send(bad + b"\n")
        resp = rpc.reply()
        assert resp["error"]["code"] == -32600 and resp["id"] is None, bad
    rpc.send(b"[]")
    assert rpc.reply()["error"]["code"] == -32600


def test_batch_runs_in_order_and_notifications_get_no_response(rpc: Raw) -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "ram-block-add", "params": {"id": "b", "size": 1}, "id": 1},
        {"jsonrpc": "2.0", "method": "ram-block-resize", "params": {"id": "b", "size": 1}},
        {"jsonrpc": "2.0", "method": "ram-block-del", "params": {"id": "b"}, "id": 2},
        {"jsonrpc": "2.0", "method": "ram-block-del", "params": {"id": "b"}, "id": "x"},
        5,
    ]
    rpc.send(json.dumps(batch).encode())
    resp = rpc.reply()
    assert [r["id"] for r in resp] == [1, 2, "x", None]
    assert "result" in resp[0] and resp[1]["result"] == {}
    assert resp[2]["error"]["data"] == {"class": "DeviceNotFound"}
    assert resp[3]["error"]["code"] == -32600
    rpc.send(b'{"jsonrpc":"2.0","method":"ram-block-add","params":{"id":"n","size":1}}')
    rpc.send(b'[{"jsonrpc":"2.0","method":"query-version"}]')
    assert [b["id"] for b in rpc.call("query-ram-blocks")] == ["n"]


def test_prealloc_block_is_resident(rpc: Raw) -> None:
    info = rpc.call("ram-block-add", id="p", size=32 * MiB, prealloc=True)
    assert info["prealloc"] is True and "resident" not in info
    assert rpc.call("query-ram-blocks", id="p", resident=True)[0]["resident"] == 32 * MiB


def test_query_version_commands_schema_stats(fresh_rpc: Raw) -> None:
    import ramd

    rpc = fresh_rpc
    v = rpc.call("query-version")
    major, minor, micro = (int(x) for x in ramd.__version__.split("."))
    assert v == {
        "version": {"major": major, "minor": minor, "micro": micro},
        "package": f"ramd {ramd.__version__}",
    }
    names = {c["name"] for c in rpc.call("query-commands")}
    assert names >= {
        "ram-block-add", "ram-block-del", "ram-block-resize", "query-ram-blocks",
        "ram-block-read", "ram-block-write", "ram-block-discard", "subscribe", "unsubscribe",
        "query-stats", "query-version", "query-commands", "query-schema",
    }  # fmt: skip
    schema = rpc.call("query-schema")
    assert set(schema["commands"]) == names
    assert set(schema["events"]) == {
        "RAM_BLOCK_ADDED", "RAM_BLOCK_RESIZED", "RAM_BLOCK_REMOVED", "JOB_STATUS_CHANGE",
        "RAM_BLOCK_ATTACHED", "RAM_BLOCK_DETACHED",
    }  # fmt: skip
    rpc.call("ram-block-add", id="a", size=MiB, **{"max-size": GiB})
    rpc.call("ram-block-write", id="a", offset=0, data=base64.b64encode(b"x").decode())
    stats = rpc.call("query-stats")
    assert {
        "blocks", "reserved", "used", "resident", "clients", "subscribers", "events-emitted",
        "uptime",
    } <= set(stats)  # fmt: skip
    assert stats["blocks"] == 1 and stats["used"] == MiB and stats["reserved"] == GiB + PAGE
    assert stats["resident"] == PAGE and stats["clients"] == 1 and stats["subscribers"] == 0
    assert stats["events-emitted"] == 1 and stats["uptime"] >= 0


def test_batch_answer_is_bounded_by_max_message_size(start_daemon: Any) -> None:
    d = start_daemon('[limits]\nmax-message-size = "64K"\nio-chunk = "16K"\n')
    with Raw(d.path) as rpc:
        rpc.call("ram-block-add", id="m", size=16 * 1024)
        read = {"id": "m", "offset": 0, "length": 16 * 1024}
        batch = [
            {"jsonrpc": "2.0", "method": "ram-block-read", "params": read, "id": i}
            for i in range(8)
        ]
        batch.insert(6, {"jsonrpc": "2.0", "method": "ram-block-del", "params": {"id": "m"}})
        rpc.send(json.dumps(batch).encode())
        rpc.sock.settimeout(10)
        while b"\n" not in rpc.buf:
            rpc.buf += rpc.sock.recv(1 << 20)
        assert rpc.buf.index(b"\n") + 1 <= 64 * 1024
        resp = rpc.reply()
        assert [r["id"] for r in resp] == list(range(8))
        ran = [r for r in resp if "result" in r]
        refused = [r for r in resp if "error" in r]
        assert len(ran) == 2 and len(refused) == 6
        assert all(len(base64.b64decode(r["result"]["data"])) == 16 * 1024 for r in ran)
        for r in refused:
            assert r["error"]["data"] == {"class": "GenericError"}
            assert r["error"]["message"].startswith("Limit exceeded: max-message-size is 65536")
        assert refused[0]["error"]["message"].endswith("ran but its answer was dropped")
        assert all(r["error"]["message"].endswith("was not run") for r in refused[1:])
        assert [b["id"] for b in rpc.call("query-ram-blocks")] == ["m"]


def test_a_large_batch_does_not_stall_other_clients(start_daemon: Any) -> None:
    daemon = start_daemon("[limits]\nmax-batch = 200000\n")
    note = {"jsonrpc": "2.0", "method": "query-version"}
    batch = [note] * 100_000 + [{**note, "id": "last"}]
    with Raw(daemon.path, timeout=60) as big, Raw(daemon.path) as other:
        big.send(json.dumps(batch).encode())
        time.sleep(0.05)
        assert other.call("query-version")
        batch_done = select.select([big.sock], [], [], 0)[0] != []
        assert big.reply() == [
            {"jsonrpc": "2.0", "result": other.call("query-version"), "id": "last"}
        ]
        assert not batch_done, "the other client was answered only after the whole batch"
