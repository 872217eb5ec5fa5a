"""Each JSON-RPC call goes through jsonrpcserver (ramd/transport/protocol/jsonrpc_core.py): the wire
forms it builds, the refusals ramd logs, and calls whose outcome is pending (a shrink that
waits for a mapper's acknowledgement) holding back what follows them, in a batch or on the
connection. Real daemon, real sockets."""

from __future__ import annotations

import json
from typing import Any

from daemon import Daemon, Raw

PAGE = 4096


def _req(method: str, params: Any, req_id: Any = None) -> dict[str, Any]:
    req = {"jsonrpc": "2.0", "method": method, "params": params}
    return req if req_id is None else {**req, "id": req_id}


def _mapped_block(mapper: Raw) -> None:
    """Block ``m`` (4 pages, up to 8) with ``mapper`` as its mapper (the fd the daemon sends
    is dropped by the kernel, as ``Raw`` takes no ancillary data; the daemon counts the
    mapper all the same)."""
    mapper.call("ram-block-add", id="m", size=4 * PAGE, backend="memfd", **{"max-size": 8 * PAGE})
    mapper.call("ram-block-get-fd", id="m")


def _wire_line(raw: Raw) -> bytes:
    """The next line from the daemon, as sent."""
    while b"\n" not in raw.buf:
        raw.buf += raw.sock.recv(1 << 16)
    line, raw.buf = raw.buf.split(b"\n", 1)
    return line + b"\n"


def _next_event(raw: Raw) -> dict[str, Any]:
    if raw.events:
        return raw.events.pop(0)
    event = raw.line()
    assert isinstance(event, dict) and "id" not in event, event
    return event


def _acknowledge_shrink(mapper: Raw, new_size: int) -> None:
    event = _next_event(mapper)
    data = event["params"]["data"]
    assert (event["method"], data["new-size"], data["ack"]) == ("RAM_BLOCK_RESIZED", new_size, True)
    assert mapper.call("ram-block-ack", seq=data["seq"]) == {}


def test_pending_calls_of_a_batch_run_one_after_another(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as mapper, Raw(reused_daemon.path) as rpc:
        _mapped_block(mapper)
        batch = [
            _req("ram-block-resize", {"id": "m", "size": 2 * PAGE}, 1),
            _req("ram-block-resize", {"id": "m", "size": PAGE}),  # a notification
            _req("query-ram-blocks", {"id": "m"}, 2),
        ]
        rpc.send(json.dumps(batch).encode())
        # The notification's shrink starts only once the first one is acknowledged (run
        # while the first waits, it would be refused as busy, and send no event).
        _acknowledge_shrink(mapper, 2 * PAGE)
        _acknowledge_shrink(mapper, PAGE)
        first, query = rpc.reply()
        assert (first["id"], first["result"]["size"]) == (1, 2 * PAGE)
        assert (query["id"], [b["size"] for b in query["result"]]) == (2, [PAGE])
        assert query["result"][0]["mappers"] == 1


def test_a_pending_notification_holds_the_next_message_back(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as mapper, Raw(reused_daemon.path) as rpc:
        _mapped_block(mapper)
        rpc.send(json.dumps(_req("ram-block-resize", {"id": "m", "size": PAGE})).encode())
        rpc.send(json.dumps(_req("query-ram-blocks", {"id": "m"}, 7)).encode())
        _acknowledge_shrink(mapper, PAGE)
        answer = rpc.reply()
        assert (answer["id"], [b["size"] for b in answer["result"]]) == (7, [PAGE])


def test_an_answer_settled_later_keeps_its_id_and_wording(reused_daemon: Daemon) -> None:
    with Raw(reused_daemon.path) as mapper, Raw(reused_daemon.path) as rpc:
        _mapped_block(mapper)
        rpc.send(json.dumps(_req("ram-block-del", {"id": "m"}, "del \u00e9")).encode())
        event = _next_event(mapper)
        assert event["method"] == "RAM_BLOCK_REMOVED"
        mapper.call("ram-block-ack", seq=event["params"]["data"]["seq"])
        assert rpc.line() == {"jsonrpc": "2.0", "result": {}, "id": "del \u00e9"}
        rpc.send(json.dumps(_req("ram-block-del", {"id": "m"}, 2.5)).encode())
        assert _wire_line(rpc) == (
            b'{"jsonrpc":"2.0","error":{"code":-32000,"message":"RAM block \'m\' not found",'
            b'"data":{"class":"DeviceNotFound"}},"id":2.5}\n'
        )


WIRE = [
    (
        b'{"jsonrpc":"2.0","method":"no-such-command","id":1}',
        b'{"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found",'
        b'"data":"no-such-command"},"id":1}\n',
    ),
    (
        b'{"jsonrpc":"2.0","method":"query-version","params":[],"id":2}',
        b'{"jsonrpc":"2.0","error":{"code":-32602,"message":"Invalid params",'
        b'"data":"params must be an object (by-name), not an array"},"id":2}\n',
    ),
    (
        b'{"jsonrpc":"2.0","method":"ram-block-add","params":{"id":"a","size":0},"id":3}',
        b'{"jsonrpc":"2.0","error":{"code":-32602,'
        b'"message":"size: Input should be greater than 0"},"id":3}\n',
    ),
    (
        b'{"jsonrpc":"2.0","method":"query-version","id":4,"x":1}',
        b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid request",'
        b'"data":"The request failed schema validation"},"id":null}\n',
    ),
    (
        b'[{"jsonrpc":"2.0","method":"query-ram-blocks","params":{"id":"zz"},"id":"q"},'
        b'{"jsonrpc":"2.0","method":"no-such-command"},7]',
        b'[{"jsonrpc":"2.0","error":{"code":-32000,"message":"RAM block \'zz\' not found",'
        b'"data":{"class":"DeviceNotFound"}},"id":"q"},'
        b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid request",'
        b'"data":"The request failed schema validation"},"id":null}]\n',
    ),
]


def test_wire_forms_of_jsonrpcserver_responses(daemon: Daemon) -> None:
    with Raw(daemon.path) as rpc:
        for request, answer in WIRE:
            rpc.send(request)
            assert _wire_line(rpc) == answer, request
    log = daemon.log_text()
    assert log.count("refused 'no-such-command'") == 2, log
