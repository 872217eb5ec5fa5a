"""The QMP dialect (docs/protocol.md §3) against the real daemon: qemu.qmp's clients, qmp-shell, raw
sockets for every wire rule, and a scripted session whose results must match JSON-RPC's."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon, Raw
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

import ramd
from ramd.api.commands import version_triple

PAGE = 4096
MiB = 1024 * 1024
VERSION = version_triple().model_dump()
PACKAGE = f"ramd {ramd.__version__}"


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class Qmp:
    """A blocking raw QMP connection; checks that every message is one compact ``\\r\\n`` line
    and keeps events apart from responses."""

    def __init__(self, path: Path | str | None, negotiate: bool = True) -> None:
        assert path is not None
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting = self.message()
        if negotiate:
            assert self.execute("qmp_capabilities") == {"return": {}}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def raw_message(self) -> bytes:
        """The next message's bytes, ``\\r\\n`` included."""
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        assert raw.endswith(b"\r"), raw
        return raw + b"\n"

    def message(self) -> dict[str, Any]:
        raw = self.raw_message()
        obj = json.loads(raw)
        assert raw == _compact(obj) + b"\r\n", raw
        assert type(obj) is dict
        return obj

    def reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while "event" in (msg := self.message()):
            self.events.append(msg)
        return msg

    def execute(self, name: Any, arguments: Any = None, **members: Any) -> dict[str, Any]:
        """Send one command (``members`` adds e.g. ``id``); its whole response."""
        request: dict[str, Any] = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        request.update(members)
        self.send(_compact(request))
        return self.reply()

    def ok(self, name: str, **arguments: Any) -> Any:
        response = self.execute(name, arguments)
        assert set(response) == {"return"}, response
        return response["return"]

    def fail(self, name: Any, arguments: Any = None) -> dict[str, Any]:
        response = self.execute(name, arguments)
        assert set(response) == {"error"}, response
        return response["error"]  # type: ignore[no-any-return]

    def expect_silence(self, seconds: float = 0.2) -> None:
        """Nothing arrives for ``seconds``."""
        assert self.buf == b""
        self.sock.settimeout(seconds)
        try:
            data: bytes | None = self.sock.recv(1 << 16)
        except TimeoutError:
            data = None
        finally:
            self.sock.settimeout(10)
        assert data is None, data


def generic(desc: str) -> dict[str, str]:
    return {"class": "GenericError", "desc": desc}


@pytest.fixture
def qd(any_daemon: Daemon) -> Daemon:
    """A daemon with a QMP socket, which other tests use too (see conftest.py)."""
    return any_daemon


@pytest.fixture
def fresh_qd(start_daemon: Callable[..., Daemon]) -> Daemon:
    """A daemon with a QMP socket of this test's own: event seqs start from 1."""
    return start_daemon(qmp=True)


@pytest.fixture
def qmp(qd: Daemon) -> Iterator[Qmp]:
    with Qmp(qd.qmp_path) as q:
        yield q


@pytest.fixture
def fresh_qmp(fresh_qd: Daemon) -> Iterator[Qmp]:
    with Qmp(fresh_qd.qmp_path) as q:
        yield q


# -- qemu.qmp: the asynchronous QMPClient ---------------------------------------------------


async def test_qmp_client_runs_every_command(qd: Daemon) -> None:
    client = QMPClient("ramd-test")
    await client.connect(str(qd.qmp_path))
    try:
        greeting = client.greeting
        assert greeting is not None
        assert greeting.QMP.version == {"qemu": VERSION, "package": PACKAGE}

        async def run(name: str, arguments: dict[str, Any] | None = None) -> Any:
            return await client.execute(name, arguments)

        info: Any = await run("ram-block-add", {"id": "r", "size": PAGE, "max-size": 64 * MiB})
        assert (info["id"], info["size"], info["max-size"], info["resizable"]) == (
            "r", PAGE, 64 * MiB, True,
        )  # fmt: skip
        fixed: Any = await run("ram-block-add", {"id": "f", "size": 2 * PAGE})
        assert fixed["resizable"] is False and fixed["max-size"] == 2 * PAGE
        pre: Any = await run("ram-block-add", {"id": "p", "size": 4 * PAGE, "prealloc": True})
        assert pre["prealloc"] is True
        (listed,) = await run("query-ram-blocks", {"id": "p", "resident": True})
        assert listed["resident"] == 4 * PAGE

        assert (await run("ram-block-resize", {"id": "r", "size": 8 * MiB}))["size"] == 8 * MiB
        assert (await run("ram-block-resize", {"id": "r", "size": 1}))["size"] == PAGE
        blocks: Any = await run("query-ram-blocks")
        assert [b["id"] for b in blocks] == ["r", "f", "p"]
        assert [b["id"] for b in await run("query-ram-blocks", {"id": "f"})] == ["f"]

        data = base64.b64encode(b"hello qmp").decode()
        assert await run("ram-block-write", {"id": "f", "offset": 10, "data": data}) == {
            "written": 9
        }
        read = await run("ram-block-read", {"id": "f", "offset": 10, "length": 9})
        assert read == {"data": data}
        assert await run("ram-block-discard", {"id": "f", "offset": 0, "length": PAGE}) == {}
        zeros = base64.b64encode(bytes(9)).decode()
        assert await run("ram-block-read", {"id": "f", "offset": 10, "length": 9}) == {
            "data": zeros
        }

        sub: Any = await run("subscribe", {"events": ["RAM_BLOCK_REMOVED"], "replay": False})
        assert sub == {"seq": sub["seq"], "events": ["RAM_BLOCK_REMOVED"]} and sub["seq"] >= 5
        assert await run("unsubscribe") == {}
        stats: Any = await run("query-stats")
        assert stats["blocks"] == 3 and stats["clients"] >= 1
        assert await run("query-version") == {"qemu": VERSION, "package": PACKAGE}
        names = [c["name"] for c in await run("query-commands")]
        assert {"ram-block-add", "query-schema", "subscribe"} <= set(names)
        schema: Any = await run("query-schema")
        assert isinstance(schema, dict) and schema

        for name in ("r", "f", "p"):
            assert await run("ram-block-del", {"id": name}) == {}
        assert await run("query-ram-blocks") == []
    finally:
        await client.disconnect()


async def test_qmp_client_execute_errors_carry_the_class(qd: Daemon) -> None:
    client = QMPClient("ramd-test")
    await client.connect(str(qd.qmp_path))
    try:

        async def error(cmd: str, args: dict[str, Any] | None = None) -> tuple[str, str]:
            with pytest.raises(ExecuteError) as exc:
                await client.execute(cmd, args)
            return exc.value.error_class, exc.value.error.error.desc

        await client.execute("ram-block-add", {"id": "fixed", "size": 4 * PAGE})
        await client.execute("ram-block-add", {"id": "r", "size": PAGE, "max-size": 8 * PAGE})
        assert await error("ram-block-resize", {"id": "nope", "size": PAGE}) == (
            "DeviceNotFound", "RAM block 'nope' not found",
        )  # fmt: skip
        assert await error("ram-block-resize", {"id": "fixed", "size": 8 * PAGE}) == (
            "GenericError", "Size mismatch: fixed: 0x8000 != 0x4000: Invalid argument",
        )  # fmt: skip
        assert await error("ram-block-resize", {"id": "r", "size": 9 * PAGE}) == (
            "GenericError", "Size too large: r: 0x9000 > 0x8000: Invalid argument",
        )  # fmt: skip
        cls, _ = await error("ram-block-add", {"id": "r", "size": PAGE})
        assert cls == "GenericError"
        assert await error("ram-block-add", {"id": "x"}) == (
            "GenericError", "Parameter 'size' is missing",
        )  # fmt: skip
        assert await error("no-such-command") == (
            "CommandNotFound", "The command no-such-command has not been found",
        )  # fmt: skip
    finally:
        await client.disconnect()


async def test_event_listener_gets_resize_made_by_a_jsonrpc_client(fresh_qd: Daemon) -> None:
    client = QMPClient("ramd-test")
    await client.connect(str(fresh_qd.qmp_path))
    try:
        with client.listener("RAM_BLOCK_RESIZED") as listener, Raw(fresh_qd.path) as rpc:
            rpc.call("ram-block-add", id="shared", size=PAGE, **{"max-size": 16 * PAGE})
            rpc.call("ram-block-resize", id="shared", size=3 * PAGE)
            event = await asyncio.wait_for(listener.get(), 10)
        assert event["event"] == "RAM_BLOCK_RESIZED"
        data = event["data"]
        assert (data["id"], data["old-size"], data["new-size"], data["max-size"]) == (
            "shared", PAGE, 3 * PAGE, 16 * PAGE,
        )  # fmt: skip
        assert data["seq"] == 2
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    finally:
        await client.disconnect()


async def test_event_listener_of_every_event_sees_the_whole_lifecycle(fresh_qd: Daemon) -> None:
    client = QMPClient("ramd-test")
    await client.connect(str(fresh_qd.qmp_path))
    listener = EventListener()
    try:
        with client.listen(listener):
            await client.execute("ram-block-add", {"id": "a", "size": PAGE, "max-size": 2 * PAGE})
            await client.execute("ram-block-resize", {"id": "a", "size": 2 * PAGE})
            await client.execute("ram-block-del", {"id": "a"})
            got = [await asyncio.wait_for(listener.get(), 10) for _ in range(3)]
        assert [(e["event"], e["data"]["seq"]) for e in got] == [
            ("RAM_BLOCK_ADDED", 1), ("RAM_BLOCK_RESIZED", 2), ("RAM_BLOCK_REMOVED", 3),
        ]  # fmt: skip
        assert got[0]["data"]["replay"] is False
    finally:
        await client.disconnect()


# -- qemu.qmp: the legacy synchronous client and qmp-shell ----------------------------------


def test_legacy_sync_client_negotiates_and_queries(qd: Daemon) -> None:
    with Raw(qd.path) as rpc:
        rpc.call("ram-block-add", id="legacy", size=PAGE)
    mon = QEMUMonitorProtocol(str(qd.qmp_path))
    try:
        greeting = mon.connect(negotiate=True)
        assert greeting is not None and greeting["QMP"]["version"]["package"] == PACKAGE
        blocks: Any = mon.cmd("query-ram-blocks")
        assert [b["id"] for b in blocks] == ["legacy"]
        error = mon.cmd_raw("ram-block-del", {"id": "nope"})
        assert error["error"]["class"] == "DeviceNotFound"
    finally:
        mon.close()


def test_qmp_shell_runs_commands_from_piped_stdin(qd: Daemon, tmp_path: Path) -> None:
    shell = Path(sys.executable).with_name("qmp-shell")
    script = "query-commands\nram-block-add id=x size=1048576\nquery-ram-blocks\n"
    proc = subprocess.run(
        [str(shell), str(qd.qmp_path)],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(tmp_path)},  # its history file goes there
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Welcome to the QMP low-level shell!" in out
    assert "Connected to QEMU {major}.{minor}.{micro}".format(**VERSION) in out
    replies = [json.loads(line[line.index("{") :]) for line in out.splitlines() if "{" in line]
    assert len(replies) == 3, out
    assert {"name": "ram-block-add"} in replies[0]["return"]
    assert replies[1]["return"]["id"] == "x" and replies[1]["return"]["size"] == MiB
    assert [b["id"] for b in replies[2]["return"]] == ["x"]


# -- raw sockets: §3 rule by rule -------------------------------------------------------------


def test_greeting_shape_and_crlf(qd: Daemon) -> None:
    with Qmp(qd.qmp_path, negotiate=False) as q:
        assert q.greeting == {
            "QMP": {"version": {"qemu": VERSION, "package": PACKAGE}, "capabilities": []}
        }
        q.send(b'{"execute":"qmp_capabilities"}')
        assert q.raw_message() == b'{"return":{}}\r\n'
        q.send(b'{"execute":"query-version","id":"v"}')
        expected = {"return": {"qemu": VERSION, "package": PACKAGE}, "id": "v"}
        assert q.raw_message() == _compact(expected) + b"\r\n"


def test_commands_before_negotiation_are_refused(qd: Daemon) -> None:
    with Qmp(qd.qmp_path, negotiate=False) as q:
        expecting = {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        }
        assert q.execute("query-version", id=1) == {"error": expecting, "id": 1}
        assert q.execute("no-such-command") == {"error": expecting}
        # Malformed requests are still worded as such.
        assert q.execute(7) == {"error": generic("QMP input member 'execute' must be a string")}
        assert q.execute("qmp_capabilities", id=2) == {"return": {}, "id": 2}
        assert q.ok("query-version") == {"qemu": VERSION, "package": PACKAGE}


def test_second_negotiation_is_refused(qmp: Qmp) -> None:
    assert qmp.execute("qmp_capabilities", id="again") == {
        "error": {
            "class": "CommandNotFound",
            "desc": "Capabilities negotiation is already complete, command ignored",
        },
        "id": "again",
    }
    assert qmp.ok("query-ram-blocks") == []


def test_negotiation_arguments(qd: Daemon) -> None:
    with Qmp(qd.qmp_path, negotiate=False) as q:
        assert q.fail("qmp_capabilities", {"enable": ["oob"]}) == generic(
            "Capability oob not available"
        )
        assert q.fail("qmp_capabilities", {"enable": ["oob", "x"]}) == generic(
            "Capability oob, x not available"
        )
        assert q.fail("qmp_capabilities", {"enable": "oob"}) == generic(
            "Invalid parameter type for 'enable', expected: array"
        )
        assert q.fail("qmp_capabilities", {"enable": [1]}) == generic(
            "Invalid parameter type for 'enable[0]', expected: string"
        )
        assert q.fail("qmp_capabilities", {"bogus": 1}) == generic(
            "Parameter 'bogus' is unexpected"
        )
        # Still not negotiated after the failures; an empty list is fine.
        assert q.fail("query-version")["class"] == "CommandNotFound"
        assert q.execute("qmp_capabilities", {"enable": []}) == {"return": {}}


def test_unknown_command(qmp: Qmp) -> None:
    assert qmp.execute("ram-block-frobnicate", id=3) == {
        "error": {
            "class": "CommandNotFound",
            "desc": "The command ram-block-frobnicate has not been found",
        },
        "id": 3,
    }


@pytest.mark.parametrize(
    ("request_", "desc"),
    [
        ({"execute": 1, "id": 5}, "QMP input member 'execute' must be a string"),
        ({"execute": None, "id": 5}, "QMP input member 'execute' must be a string"),
        (
            {"execute": "query-version", "arguments": [], "id": 5},
            "QMP input member 'arguments' must be an object",
        ),
        (
            {"execute": "query-version", "arguments": None, "id": 5},
            "QMP input member 'arguments' must be an object",
        ),
        (
            {"execute": "query-version", "bogus": 1, "id": 5},
            "QMP input member 'bogus' is unexpected",
        ),
        ({"exec-oob": "query-version", "id": 5}, "QMP input member 'exec-oob' is unexpected"),
        ({"arguments": {}, "id": 5}, "QMP input lacks member 'execute'"),
    ],
)
def test_bad_members_echo_the_id(qmp: Qmp, request_: dict[str, Any], desc: str) -> None:
    qmp.send(_compact(request_))
    assert qmp.reply() == {"error": generic(desc), "id": 5}
    assert qmp.ok("query-ram-blocks") == []


def test_input_that_is_not_an_object_gets_no_id(qmp: Qmp) -> None:
    for text in (b'[{"execute":"query-version","id":1}]', b'"query-version"', b"42 ", b"null "):
        qmp.send(text)
        assert qmp.reply() == {"error": generic("QMP input must be a JSON object")}


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({"id": "a"}, "Parameter 'size' is missing"),
        ({"size": PAGE}, "Parameter 'id' is missing"),
        ({"id": "a", "size": PAGE, "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"id": "a", "size": "4096"}, "Invalid parameter type for 'size', expected: integer"),
        ({"id": "a", "size": 1.5}, "Invalid parameter type for 'size', expected: integer"),
        ({"id": "a", "size": True}, "Invalid parameter type for 'size', expected: integer"),
        (
            {"id": "a", "size": PAGE, "max-size": "1G"},
            "Invalid parameter type for 'max-size', expected: integer",
        ),
        ({"id": 1, "size": PAGE}, "Invalid parameter type for 'id', expected: string"),
        (
            {"id": "a", "size": PAGE, "dump": 1},
            "Invalid parameter type for 'dump', expected: boolean",
        ),
        ({"id": "a", "size": 0}, "Parameter 'size' is invalid: Input should be greater than 0"),
        ({"id": "1a", "size": PAGE}, "Parameter 'id' is invalid: String should match pattern"),
        (
            {"id": "a", "size": 2**64},
            "Parameter 'size' is invalid: Input should be less than or equal to",
        ),
    ],
)
def test_argument_errors_name_the_parameter(qmp: Qmp, arguments: dict[str, Any], desc: str) -> None:
    error = qmp.fail("ram-block-add", arguments)
    assert error["class"] == "GenericError"
    assert error["desc"].startswith(desc), error
    assert qmp.ok("query-ram-blocks") == []


def test_argument_errors_for_lists_and_enums(qmp: Qmp) -> None:
    assert qmp.fail("subscribe", {"events": "RAM_BLOCK_ADDED"}) == generic(
        "Invalid parameter type for 'events', expected: array"
    )
    assert qmp.fail("subscribe", {"events": ["RAM_BLOCK_ADDED", "NOPE"]}) == generic(
        "Parameter 'events[1]' does not accept value 'NOPE'"
    )
    assert qmp.fail("subscribe", {"events": [3]}) == generic(
        "Invalid parameter type for 'events[0]', expected: string"
    )
    assert qmp.fail("query-version", {"x": 1}) == generic("Parameter 'x' is unexpected")


def test_malformed_json_then_a_valid_command_on_the_same_connection(qmp: Qmp) -> None:
    qmp.send(b'{"execute": }{"execute":"query-version","id":1}')
    error = qmp.reply()
    assert set(error) == {"error"} and error["error"]["class"] == "GenericError"
    assert error["error"]["desc"].startswith("JSON parse error, ")
    assert qmp.reply() == {"return": {"qemu": VERSION, "package": PACKAGE}, "id": 1}
    for bad in (b"{]", b'{"execute":"query-version",}', b"{'execute':'x'}", b"[NaN]", b"[1e999]"):
        qmp.send(bad + b'{"execute":"query-ram-blocks","id":2}')
        error = qmp.reply()
        assert set(error) == {"error"}, (bad, error)
        assert error["error"]["desc"].startswith("JSON parse error, "), error
        assert qmp.reply() == {"return": [], "id": 2}


def test_stray_closer_is_a_parse_error(qmp: Qmp) -> None:
    qmp.send(b'}{"execute":"query-ram-blocks","id":1}')
    assert qmp.reply() == {"error": generic("JSON parse error, stray '}'")}
    assert qmp.reply() == {"return": [], "id": 1}


@pytest.mark.parametrize("byte", [b"\x00", b"\x01", b"\t", b"\x1f"])
def test_a_raw_control_byte_in_a_string_costs_only_its_message(qmp: Qmp, byte: bytes) -> None:
    """No newline between the messages, as ``qemu.qmp`` sends them: the bad message is one
    parse error and the request right after it is answered (issue 21, point 9)."""
    bad = b'{"execute":"query-version","arguments":{"x":"a' + byte + b'b}"},"id":0}'
    qmp.send(bad + b'{"execute":"query-ram-blocks","id":1}')
    error = qmp.reply()
    assert error == {"error": generic(error["error"]["desc"])}
    assert error["error"]["desc"].startswith("JSON parse error, "), error
    assert qmp.reply() == {"return": [], "id": 1}
    qmp.expect_silence()


def test_too_large_and_too_deep_messages_are_parse_errors(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon("[limits]\nmax-message-size = 1024\nmax-depth = 8\n", qmp=True)
    with Qmp(d.qmp_path) as q:
        big = _compact({"execute": "query-version", "id": "x" * 2000})
        q.send(big + b'{"execute":"query-ram-blocks","id":1}')
        assert q.reply() == {"error": generic("JSON token size limit exceeded")}
        assert q.reply() == {"return": [], "id": 1}
        deep = b'{"execute":"query-version","id":' + b"[" * 9 + b"]" * 9 + b"}"
        q.send(deep + b'{"execute":"query-ram-blocks","id":2}')
        assert q.reply() == {"error": generic("JSON nesting depth limit exceeded")}
        assert q.reply() == {"return": [], "id": 2}


def test_a_command_split_over_several_writes(qmp: Qmp) -> None:
    text = _compact({"execute": "ram-block-add", "arguments": {"id": "s", "size": PAGE}, "id": 9})
    for i in range(0, len(text), 7):
        qmp.send(text[i : i + 7])
        time.sleep(0.01)
    response = qmp.reply()
    assert response["id"] == 9 and response["return"]["id"] == "s"


def test_two_commands_in_one_write_without_separator(qmp: Qmp) -> None:
    qmp.send(b'{"execute":"query-ram-blocks","id":1}{"execute":"query-version","id":2}')
    assert qmp.reply() == {"return": [], "id": 1}
    assert qmp.reply()["id"] == 2


@pytest.mark.parametrize(
    "req_id",
    [
        "abc",
        "",
        7,
        -1,
        2**70,
        1.5,
        -0.25,
        None,
        True,
        False,
        [],
        [1, "a", None],
        {},
        {"k": {"n": [1]}},
    ],
)
def test_ids_of_every_json_type_are_echoed(qmp: Qmp, req_id: Any) -> None:
    ok = qmp.execute("query-ram-blocks", id=req_id)
    assert ok == {"return": [], "id": req_id}
    assert type(ok["id"]) is type(req_id)
    error = qmp.execute("no-such-command", id=req_id)
    assert error["id"] == req_id and type(error["id"]) is type(req_id)


def test_no_id_when_the_request_has_none(qmp: Qmp) -> None:
    assert qmp.execute("query-ram-blocks") == {"return": []}
    assert qmp.execute("no-such-command")["error"]["class"] == "CommandNotFound"
    assert "id" not in qmp.execute("no-such-command")


def test_events_start_at_negotiation_without_subscribe(fresh_qd: Daemon) -> None:
    with Qmp(fresh_qd.qmp_path, negotiate=False) as q, Raw(fresh_qd.path) as rpc:
        rpc.call("ram-block-add", id="early", size=PAGE, **{"max-size": 4 * PAGE})
        q.expect_silence()
        # The event raised before negotiation was dropped, not queued: the very next
        # message is the negotiation's answer, and there is no replay.
        q.send(b'{"execute":"qmp_capabilities"}')
        assert q.message() == {"return": {}}
        q.expect_silence()
        rpc.call("ram-block-resize", id="early", size=2 * PAGE)
        event = q.message()
        assert set(event) == {"event", "data", "timestamp"}
        assert event["event"] == "RAM_BLOCK_RESIZED"
        assert event["data"] == {
            "seq": 2, "id": "early", "host": event["data"]["host"],
            "old-size": PAGE, "new-size": 2 * PAGE, "max-size": 4 * PAGE, "ack": False,
        }  # fmt: skip
        ts = event["timestamp"]
        assert set(ts) == {"seconds", "microseconds"} and 0 <= ts["microseconds"] < 1_000_000
        assert abs(ts["seconds"] - time.time()) < 60


def test_events_of_a_command_come_before_its_response(qmp: Qmp) -> None:
    qmp.send(_compact({"execute": "ram-block-add", "arguments": {"id": "o", "size": PAGE}}))
    assert qmp.message()["event"] == "RAM_BLOCK_ADDED"
    assert qmp.message()["return"]["id"] == "o"


def test_subscribe_filters_and_replays_unsubscribe_stops(fresh_qmp: Qmp) -> None:
    fresh_qmp.ok("ram-block-add", id="a", size=PAGE, **{"max-size": 4 * PAGE})
    assert [e["event"] for e in fresh_qmp.events] == ["RAM_BLOCK_ADDED"]
    fresh_qmp.events.clear()
    sub = fresh_qmp.ok("subscribe", events=["RAM_BLOCK_ADDED", "RAM_BLOCK_REMOVED"])
    assert sub == {"seq": 1, "events": ["RAM_BLOCK_ADDED", "RAM_BLOCK_REMOVED"]}
    assert [(e["event"], e["data"]["replay"]) for e in fresh_qmp.events] == [
        ("RAM_BLOCK_ADDED", True)
    ]
    fresh_qmp.events.clear()
    fresh_qmp.ok("ram-block-resize", id="a", size=2 * PAGE)  # filtered out
    fresh_qmp.ok("ram-block-del", id="a")
    assert [e["event"] for e in fresh_qmp.events] == ["RAM_BLOCK_REMOVED"]
    fresh_qmp.events.clear()
    assert fresh_qmp.ok("unsubscribe") == {}
    fresh_qmp.ok("ram-block-add", id="b", size=PAGE)
    assert fresh_qmp.events == []


def test_refused_connection_gets_a_generic_error_without_id(
    start_daemon: Callable[..., Daemon],
) -> None:
    d = start_daemon("[limits]\nmax-connections = 1\n", qmp=True)
    deadline = time.monotonic() + 10
    while True:  # the daemon's readiness probe may still hold the only slot for a moment
        first = Qmp(d.qmp_path, negotiate=False)
        if "QMP" in first.greeting or time.monotonic() > deadline:
            break
        first.close()
        time.sleep(0.05)
    with first, socket.socket(socket.AF_UNIX) as s:
        assert "QMP" in first.greeting
        s.settimeout(10)
        s.connect(str(d.qmp_path))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data == _compact({"error": generic("Limit exceeded: max-connections is 1")}) + (
            b"\r\n"
        )


# -- the same session through both dialects ---------------------------------------------------

# query-version is not in it: each dialect answers it in its own shape (test_qmp_fidelity.py).
_SCRIPT: list[tuple[str, dict[str, Any]]] = [
    ("subscribe", {"replay": False}),
    ("ram-block-add", {"id": "r", "size": PAGE + 1, "max-size": 16 * PAGE}),
    ("ram-block-add", {"id": "f", "size": 2 * PAGE, "dump": False}),
    ("ram-block-add", {"id": "r", "size": PAGE}),
    ("ram-block-add", {"id": "bad", "size": 0}),
    ("ram-block-add", {"id": "x", "size": PAGE, "max-size": 4 * PAGE, "prealloc": True}),
    ("ram-block-resize", {"id": "r", "size": 8 * PAGE}),
    ("ram-block-resize", {"id": "r", "size": 8 * PAGE}),
    ("ram-block-resize", {"id": "r", "size": 3 * PAGE}),
    ("ram-block-resize", {"id": "r", "size": 17 * PAGE}),
    ("ram-block-resize", {"id": "f", "size": PAGE}),
    ("ram-block-resize", {"id": "nope", "size": PAGE}),
    ("ram-block-write", {"id": "r", "offset": 100, "data": base64.b64encode(b"parity").decode()}),
    ("ram-block-write", {"id": "r", "offset": 3 * PAGE - 2, "data": "AAAA"}),
    ("ram-block-write", {"id": "r", "offset": 0, "data": "!!"}),
    ("ram-block-read", {"id": "r", "offset": 98, "length": 10}),
    ("ram-block-read", {"id": "r", "offset": 3 * PAGE, "length": 1}),
    ("ram-block-discard", {"id": "r", "offset": 0, "length": PAGE}),
    ("ram-block-discard", {"id": "r", "offset": 1, "length": PAGE}),
    ("ram-block-read", {"id": "r", "offset": 98, "length": 10}),
    ("query-ram-blocks", {}),
    ("query-ram-blocks", {"id": "f"}),
    ("query-ram-blocks", {"id": "nope"}),
    ("query-ram-blocks", {"bogus": 1}),
    ("no-such-command", {}),
    ("query-commands", {}),
    ("ram-block-del", {"id": "f"}),
    ("ram-block-del", {"id": "f"}),
    ("ram-block-del", {"id": "r"}),
    ("query-ram-blocks", {}),
]


def _without_host(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_host(v) for k, v in value.items() if k != "host"}
    if isinstance(value, list | tuple):
        return type(value)(_without_host(v) for v in value)
    return value


def _via_jsonrpc(path: Path) -> list[Any]:
    """Each step as ("ok", result, events) or ("error", class, desc or None, events); the
    desc is None for argument errors, which each dialect words its own way."""
    outcomes: list[Any] = []
    with Raw(path) as rpc:
        for method, params in _SCRIPT:
            response = rpc.request(method, params)
            events = [(e["method"], e["params"]["data"]) for e in rpc.events]
            rpc.events.clear()
            if "result" in response:
                outcomes.append(("ok", response["result"], events))
                continue
            err = response["error"]
            if err["code"] == -32601:
                outcomes.append(("error", "CommandNotFound", None, events))
            elif err["code"] == -32602:
                outcomes.append(("error", "GenericError", None, events))
            else:
                assert err["code"] == -32000, err
                outcomes.append(("error", err["data"]["class"], err["message"], events))
    return _without_host(outcomes)  # type: ignore[no-any-return]


def _via_qmp(path: Path | None) -> list[Any]:
    """The same shape as :func:`_via_jsonrpc`, from a QMP session."""
    outcomes: list[Any] = []
    with Qmp(path) as q:
        for name, arguments in _SCRIPT:
            response = q.execute(name, arguments)
            events = [(e["event"], e["data"]) for e in q.events]
            q.events.clear()
            if "return" in response:
                outcomes.append(("ok", response["return"], events))
                continue
            err = response["error"]
            desc = err["desc"]
            if desc.startswith(("Parameter ", "Invalid parameter type", "The command ")):
                desc = None
            outcomes.append(("error", err["class"], desc, events))
    return _without_host(outcomes)  # type: ignore[no-any-return]


def test_same_session_same_results_in_both_dialects(tmp_path: Path) -> None:
    daemons: list[Daemon] = []
    try:
        for name in ("jsonrpc", "qmp"):
            (tmp_path / name).mkdir()
            daemons.append(Daemon(tmp_path / name, qmp=True))
        rpc, qmp = _via_jsonrpc(daemons[0].path), _via_qmp(daemons[1].qmp_path)
    finally:
        for d in daemons:
            d.stop()
    assert len(rpc) == len(qmp) == len(_SCRIPT)
    for step, a, b in zip(_SCRIPT, rpc, qmp, strict=True):
        assert a == b, step
    kinds = [o[0] for o in rpc]
    assert kinds.count("error") >= 10 and kinds.count("ok") >= 15
    assert sum(len(o[-1]) for o in rpc) == 6  # added x2, resized x2, removed x2


def test_lone_surrogates_are_echoed_not_fatal_in_both_dialects(qd: Daemon) -> None:
    with Qmp(qd.qmp_path) as q:
        q.send(b'{"execute":"\\ud800","id":"\\udc00"}')
        raw = q.raw_message()
        assert b'"id":"\\udc00"' in raw and b"The command \\ud800 has" in raw
        assert q.ok("query-ram-blocks") == []
    with Raw(qd.path) as rpc:
        rpc.send(b'{"jsonrpc":"2.0","method":"\\ud800","id":"\\udc00"}')
        response = rpc.reply()
        assert response["id"] == "\udc00" and response["error"]["code"] == -32601
        assert rpc.call("query-ram-blocks") == []
