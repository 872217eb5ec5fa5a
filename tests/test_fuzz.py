"""Property-based fuzzing of one live daemon (both dialects) with hypothesis (issue 6).

One daemon serves the whole module. Every property ends by checking that the daemon is
still alive and answering; the module ends by checking that the daemon logged no
traceback. Runs are reproducible: ``derandomize=True`` and no example database.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from daemon import Daemon
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from wire import INTERNAL, Conn, Qmp, Rpc, b64, delete_all_blocks, qmp_outcome, rpc_outcome
from wire import strict_loads as loads

PAGE = 4096
KiB = 1024
MiB = 1024 * KiB

COMMANDS = [
    "ram-block-add",
    "ram-block-del",
    "ram-block-resize",
    "query-ram-blocks",
    "ram-block-read",
    "ram-block-write",
    "ram-block-discard",
    "subscribe",
    "unsubscribe",
    "query-stats",
    "query-version",
    "query-commands",
    "query-schema",
]


def fuzz_settings(n: int, **kw: Any) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kw,
    )


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("fuzz"), "", qmp=True)
    yield daemon
    log = daemon.log_text()
    assert daemon.stop() == 0, log[-3000:]
    assert "Traceback" not in log, log[log.find("Traceback") - 500 :][:3000]
    assert "internal error" not in log


def _serving(d: Daemon) -> None:
    """The daemon is alive and answers a fresh connection of each dialect."""
    assert d.alive(), d.log_text()[-3000:]
    with Rpc(d.path) as rpc:
        assert rpc.call("query-version")["package"].startswith("ramd ")
    assert d.qmp_path is not None
    with Qmp(d.qmp_path) as qmp:
        assert qmp.call("query-version")["package"].startswith("ramd ")


_sentinels = itertools.count()


def _sentinel_id() -> str:
    return f"sentinel-{next(_sentinels)}-fuzz"


# -- 1. random bytes ------------------------------------------------------------------------

_TOKENS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b"\\",
    b'\\"',
    b"\\u",
    b"\\ud800",
    b":",
    b",",
    b" ",
    b"\n",
    b"\r\n",
    b"\x00",
    b"\xff",
    b"\xfe\xff",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
    b"1e999999",
    b"-0.0e-99999",
    b"9" * 5000,
    b"18446744073709551616",
    b"NaN",
    b"-Infinity",
    b"true",
    b"nul",
    b"[" * 1100,
    b"{" * 300,
    b"]" * 40,
    b'{"a":' * 50,
    b'"' + b"x" * 70000 + b'"',
    b'{"jsonrpc":"2.0","method":"query-version","id":',
    b'{"jsonrpc":"2.0","method":"query-version","id":1}',
    b'{"execute":"query-version"}',
    b'{"execute":"qmp_capabilities"}',
    b'{"jsonrpc":"2.0","method":"ram-block-del","params":{"id":"a',
]

garbage = st.lists(st.one_of(st.binary(max_size=48), st.sampled_from(_TOKENS)), max_size=16).map(
    b"".join
)

_IDLE, _CONTAINER, _STRING, _BARE = range(4)


def resync_suffix(data: bytes) -> bytes:
    """What completes the JSON text ``data`` leaves open, by the contract's splitting rule
    (count brackets outside strings; a backslash escapes the next byte in a string; a
    top-level bare token ends at whitespace or a bracket or quote; a line break inside a
    string, escaped or not, ends the message as an error, any other control byte is skipped
    as if it were allowed)."""
    mode, depth, escape = _IDLE, 0, False
    for c in data:
        if mode == _STRING:
            if c in b"\r\n":
                mode, depth, escape = _IDLE, 0, False
            elif c < 0x20 or escape:
                escape = False
            elif c == 0x5C:
                escape = True
            elif c == 0x22:
                mode = _CONTAINER if depth else _IDLE
            continue
        if mode == _BARE:
            if c not in b' \t\n\r[]{}"':
                continue
            mode = _IDLE
        if mode == _IDLE:
            if c in b" \t\n\r" or c in b"}]":
                continue
            if c in b"{[":
                mode, depth = _CONTAINER, 1
            elif c == 0x22:
                mode = _STRING
            else:
                mode = _BARE
            continue
        if c in b"{[":
            depth += 1
        elif c in b"}]":
            depth -= 1
            if depth == 0:
                mode = _IDLE
        elif c == 0x22:
            mode = _STRING
    suffix = b""
    if mode == _STRING:
        suffix += b'x"' if escape else b'"'
    return suffix + b"]" * depth + b"\n"


def _check_rpc_answer(msg: Any) -> None:
    items = msg if isinstance(msg, list) else [msg]
    for item in items:
        assert rpc_outcome(item)[0] != INTERNAL, msg


def _check_qmp_answer(msg: Any) -> None:
    assert qmp_outcome(msg)[0] != INTERNAL, msg


@pytest.mark.parametrize("dialect", ["jsonrpc", "qmp"])
@fuzz_settings(300)
@given(data=garbage)
@example(data=b'\xff\xfe{["\\')
@example(data=b"[" * 1100 + b'"\\')
@example(data=b'{"a":"' + b"\xed\xa0\x80" * 10)
def test_random_bytes_never_kill_the_daemon_and_it_resyncs(
    d: Daemon, dialect: str, data: bytes
) -> None:
    """Garbage gets only parse/request errors (valid strict JSON); after the garbage is
    closed by the splitting rule, the next request on the same connection is answered;
    garbage then EOF gets the daemon to answer and close; the daemon keeps serving."""
    assert d.qmp_path is not None
    sid = _sentinel_id()
    conn: Rpc | Qmp
    if dialect == "jsonrpc":
        conn, check = Rpc(d.path), _check_rpc_answer
        sentinel = json.dumps({"jsonrpc": "2.0", "method": "query-version", "id": sid})
    else:
        conn, check = Qmp(d.qmp_path), _check_qmp_answer
        sentinel = json.dumps({"execute": "query-version", "id": sid})
    with conn:
        conn.send(data + resync_suffix(data) + sentinel.encode())
        while True:
            msg = conn.answer()
            if isinstance(msg, dict) and msg.get("id") == sid:
                result = msg["result"] if dialect == "jsonrpc" else msg["return"]
                assert result["package"].startswith("ramd "), msg
                break
            check(msg)
    path = d.path if dialect == "jsonrpc" else d.qmp_path
    with Conn(path) as eof:
        eof.send(data)
        eof.sock.shutdown(socket.SHUT_WR)  # the daemon answers what it got, then closes
        for line in eof.lines_until_eof():
            msg = loads(line)
            greeting_or_event = isinstance(msg, dict) and ("QMP" in msg or "event" in msg)
            if dialect == "jsonrpc" or not greeting_or_event:
                check(msg)
    _serving(d)


# -- 2. random JSON values: exactly one answer each -------------------------------------------

_ARG_KEYS = [
    "id",
    "size",
    "max-size",
    "offset",
    "length",
    "data",
    "events",
    "replay",
    "prealloc",
    "align",
    "lock",
]
# Integers that are extreme but harmless: no value between 1 MiB and 128 TiB, so no random
# request can make the daemon fault in or lock gigabytes on a shared machine.
_ints = st.one_of(
    st.integers(-(2**70), MiB),
    st.integers(2**47, 2**70),
    st.sampled_from([0, -1, 2**63, 2**64, 2**64 - 1, 10**300]),
)
_texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["2.0", "a", "b", "\ud800", "a\udfffb", "é", "😀", "", "A" * 64, "A" * 65]),
)
_scalars = st.one_of(
    st.none(), st.booleans(), _ints, st.floats(allow_nan=False, allow_infinity=False), _texts
)
json_values = st.recursive(
    _scalars,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.sampled_from(_ARG_KEYS) | st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=10,
)


class Deep:
    """``depth`` levels of alternating objects and arrays around ``inner``, written as text
    by :func:`dumps`: this process's own ``json`` would hit its recursion limit."""

    def __init__(self, depth: int, inner: Any = None) -> None:
        self.depth = depth
        self.inner = inner

    def __repr__(self) -> str:
        return f"Deep({self.depth}, {self.inner!r})"

    def text(self, ascii_only: bool) -> str:
        opens = "".join("[" if i % 2 else '{"k":' for i in reversed(range(self.depth)))
        closes = "".join("]" if i % 2 else "}" for i in range(self.depth))
        return opens + dumps(self.inner, ascii_only) + closes


def dumps(value: Any, ascii_only: bool = True) -> str:
    """``json.dumps`` that also writes :class:`Deep` values."""
    deep: list[Deep] = []

    def placeholder(obj: Any) -> str:
        if not isinstance(obj, Deep):
            raise TypeError(type(obj))
        deep.append(obj)
        return f"\x00deep{len(deep) - 1}\x00"

    text = json.dumps(value, ensure_ascii=ascii_only, default=placeholder)
    for i, obj in enumerate(deep):
        text = text.replace(json.dumps(f"\x00deep{i}\x00"), obj.text(ascii_only), 1)
    return text


# Depths away from CPython's recursion limit (~1000), where the daemon's and this
# process's json.loads could disagree; > 1024 is refused by the splitter in both dialects.
_deep_values = st.builds(Deep, st.sampled_from([1, 20, 300, 700, 1025, 1600]), json_values)
_params = st.one_of(
    st.dictionaries(st.sampled_from(_ARG_KEYS), json_values, max_size=5),
    st.fixed_dictionaries({"x": _deep_values}),
    json_values,
)
_ids = st.one_of(st.none(), _ints, _texts, st.floats(allow_nan=False), st.booleans(), json_values)
rpc_requests = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.just("2.0") | json_values,
        "method": st.sampled_from(COMMANDS) | json_values,
        "params": _params,
        "id": _ids,
        "extra": json_values,
    },
)
qmp_requests = st.fixed_dictionaries(
    {},
    optional={
        "execute": st.sampled_from([*COMMANDS, "qmp_capabilities"]) | json_values,
        "arguments": _params,
        "id": _ids,
        "extra": json_values,
    },
)


def _encode(value: Any, ascii_only: bool) -> bytes:
    # Lone surrogates: \\udXXX escapes when ascii_only, else invalid UTF-8 (CESU) bytes.
    return dumps(value, ascii_only).encode("utf-8", "surrogatepass")


def _valid_rpc_request(obj: Any) -> bool:
    """A JSON-RPC 2.0 Request object. Members beyond the four of the specification make it
    invalid (the contract is silent; the daemon follows jsonrpcserver's schema here)."""
    return (
        type(obj) is dict
        and obj.get("jsonrpc") == "2.0"
        and type(obj.get("method")) is str
        and type(obj.get("params", {})) in (dict, list)
        and (obj.get("id") is None or type(obj.get("id")) in (str, int, float))
        and obj.keys() <= {"jsonrpc", "method", "params", "id"}
    )


def nesting_depth(text: bytes) -> int:
    """The deepest bracket nesting of ``text``, counted outside strings (the contract's
    splitting rule; deeper than 1024 is a parse error whatever the parser could do)."""
    depth = deepest = 0
    in_string = escape = False
    for c in text:
        if in_string:
            if escape:
                escape = False
            elif c == 0x5C:
                escape = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


def parsed(text: bytes) -> Any:
    """``text`` as the daemon must parse it; ``ValueError`` for what it must refuse."""
    if nesting_depth(text) > 1024:
        raise ValueError("nested deeper than the limit")
    try:
        return loads(text)
    except RecursionError:
        raise ValueError("nested too deep for CPython's parser") from None


def rpc_answers_expected(text: bytes) -> int:
    """Response lines one JSON-RPC text must get: 1, or 0 for a notification or a batch
    of notifications."""
    try:
        obj = parsed(text)
    except ValueError:
        return 1
    members = obj if type(obj) is list else [obj]
    if not members:
        return 1
    return int(any(not _valid_rpc_request(m) or "id" in m for m in members))


@fuzz_settings(700)
@given(
    value=st.one_of(
        rpc_requests,
        st.lists(rpc_requests | json_values, max_size=5),
        json_values,
        _deep_values,
    ),
    ascii_only=st.booleans(),
)
@example(value={"jsonrpc": "2.0", "method": "query-version", "params": []}, ascii_only=True)
@example(value=[{"jsonrpc": "2.0", "method": "nope"}] * 3, ascii_only=True)
@example(value={"jsonrpc": "2.0", "method": "query-ve\ud800rsion", "id": 1}, ascii_only=False)
def test_jsonrpc_every_text_gets_exactly_the_answers_it_must(
    d: Daemon, value: Any, ascii_only: bool
) -> None:
    text = _encode(value, ascii_only)
    expected = rpc_answers_expected(text)
    sid = _sentinel_id()
    with Rpc(d.path) as rpc:
        rpc.send(text + b"\n")
        rpc.send_request("query-version", req_id=sid)
        answers = []
        while True:
            msg = rpc.answer()
            if isinstance(msg, dict) and msg.get("id") == sid:
                break
            answers.append(msg)
    assert len(answers) == expected, (text[:300], answers)
    for msg in answers:
        _check_rpc_answer(msg)
        if isinstance(msg, list):
            batch = parsed(text)
            assert type(batch) is list and 0 < len(msg) <= len(batch), msg
    assert d.alive()


def _qmp_command_with_id(text: bytes) -> bool:
    """A well-formed QMP command with an ``id``, whose answer must echo it."""
    try:
        obj = parsed(text)
    except ValueError:
        return False
    return (
        type(obj) is dict
        and "id" in obj
        and type(obj.get("execute")) is str
        and type(obj.get("arguments", {})) is dict
        and obj.keys() <= {"execute", "arguments", "id"}
    )


@fuzz_settings(500)
@given(
    value=st.one_of(qmp_requests, st.lists(qmp_requests, max_size=3), json_values, _deep_values),
    ascii_only=st.booleans(),
)
@example(value={"execute": "qmp_capabilities"}, ascii_only=True)
@example(value={"execute": "query-version", "id": {"x": [1, 2.5]}}, ascii_only=True)
def test_qmp_every_text_gets_exactly_one_answer(d: Daemon, value: Any, ascii_only: bool) -> None:
    assert d.qmp_path is not None
    text = _encode(value, ascii_only)
    sid = _sentinel_id()
    with Qmp(d.qmp_path) as qmp:
        qmp.send(text + b"\n")
        qmp.send_request("query-version", req_id=sid)
        answers = []
        while True:
            msg = qmp.answer()
            if isinstance(msg, dict) and msg.get("id") == sid:
                break
            answers.append(msg)
    assert len(answers) == 1, (text[:300], answers)
    _check_qmp_answer(answers[0])
    if _qmp_command_with_id(text):
        assert answers[0]["id"] == loads(text)["id"], answers
    assert d.alive()


def test_random_json_left_the_daemon_serving(d: Daemon) -> None:
    _serving(d)
    delete_all_blocks(d.path)


def test_non_finite_numbers_are_parse_errors_never_echoed_as_invalid_json(d: Daemon) -> None:
    """``NaN``/``Infinity``/``1e999`` are not JSON: a parse error, not an answer whose
    ``id`` is the invalid JSON token ``NaN`` or ``Infinity``."""
    assert d.qmp_path is not None
    for token in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"):
        with Rpc(d.path) as rpc:
            rpc.send(b'{"jsonrpc":"2.0","method":"query-version","id":' + token + b"}\n")
            line = rpc.raw_line()
            msg = loads(line)  # the answer itself must be strict JSON
            assert msg["error"]["code"] == -32700 and msg["id"] is None, line
            assert rpc.call("query-version")
        with Qmp(d.qmp_path) as qmp:
            qmp.send(b'{"execute":"query-version","id":' + token + b"}")
            msg = qmp.answer()
            assert msg["error"]["class"] == "GenericError" and "id" not in msg, msg


@pytest.mark.parametrize("key", ["bogus", "dialect", "positional", "self"])
def test_an_unknown_param_is_named_whatever_its_name(d: Daemon, key: str) -> None:
    """Found by the fuzzer: a member named like the adapter's context argument (``dialect``)
    got "Invalid params" with a Python TypeError text instead of naming the field."""
    with Rpc(d.path) as rpc:
        assert rpc.request("query-version", {key: 1})["error"] == {
            "code": -32602,
            "message": f"{key}: Extra inputs are not permitted",
        }


@pytest.mark.parametrize("params", [[], [1], [{"id": "a"}]])
def test_positional_params_are_invalid_params_even_when_empty(d: Daemon, params: Any) -> None:
    """Contract: positional params get -32602 (an empty array is positional too);
    as notifications they get no answer at all."""
    with Rpc(d.path) as rpc:
        resp = rpc.request("query-version", params)
        assert resp["error"]["code"] == -32602 and resp["id"] == rpc.next_id - 1, resp
        note = {"jsonrpc": "2.0", "method": "query-version", "params": params}
        rpc.send(json.dumps(note).encode())
        # Rpc.request checks that the very next answer is this request's, not the note's.
        assert rpc.call("query-version")["package"].startswith("ramd ")


# -- 3. well-typed commands with extreme values --------------------------------------------

EXTREME = [
    0,
    -1,
    1,
    PAGE - 1,
    PAGE,
    PAGE + 1,
    64 * KiB,
    MiB,
    2**31 - 1,
    2**31,
    2**32,
    2**40,
    2**46,
    2**47,
    2**53 + 1,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 8192,
    2**64 - 4096,
    2**64 - 1,
    2**64,
    2**100,
    -(2**63),
    10**30,
]
# For prealloc and lock: nothing the kernel would really fault in beyond 1 MiB.
SAFE = [v for v in EXTREME if v <= MiB or v >= 2**47]
ALIGNS = [0, -1, 3, PAGE, 2 * MiB, 2**30, 2**40, 2**62, 2**63, 2**64]
IDS = [
    "a",
    "b",
    "Z9",
    "a" * 64,
    "b" + "-" * 63,
    "c" + "._" * 31 + "x",
    "a" * 65,
    "",
    "1a",
    "a b",
    "a\x00",
    "a\n",
    "é",
    "日本",
    "a\u0301",
    "😀",
    "a😀",
    "\u202ea",
]
_id = st.sampled_from(IDS[:3]) | st.sampled_from(IDS)
_n = st.sampled_from(EXTREME)
_small = st.sampled_from([1, PAGE, PAGE + 1, 64 * KiB])
_high = st.sampled_from([2**46, 2**47, 2**63, 2**64 - 8192, 2**64 - 4096, 2**64 - 1])
_wrong_type: st.SearchStrategy[Any] = st.sampled_from(["4096", 4096.0, True, None, [], {}, [4096]])


def assert_really_reserved(pid: int, info: dict[str, Any]) -> None:
    """``[host, host+size)`` is mapped read-write and ``[host+size, host+max-size+guard)``
    is mapped inaccessible in the daemon: the block's reported layout is real."""
    host, size, end = info["host"], info["size"], info["host"] + info["max-size"] + PAGE
    covered = host
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        perms = line.split()[1]
        if hi <= covered or lo >= end:
            continue
        assert lo <= covered, (f"hole at {covered:#x}", info)
        if lo < host + size:
            assert perms.startswith("rw") and hi <= host + size, (line, info)
        else:
            assert perms.startswith("---"), (line, info)
        covered = hi
        if covered >= end:
            return
    raise AssertionError(f"not reserved up to {end:#x} (covered to {covered:#x}): {info}")


_ID = re.compile(r"\A[A-Za-z][A-Za-z0-9._-]{0,63}\Z")


@st.composite
def extreme_command(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    name = draw(
        st.sampled_from(
            [
                "ram-block-add",
                "ram-block-add",
                "ram-block-resize",
                "ram-block-resize",
                "ram-block-del",
                "ram-block-read",
                "ram-block-write",
                "ram-block-discard",
                "query-ram-blocks",
                "subscribe",
                "query-stats",
            ]
        )
    )
    args: dict[str, Any] = {}
    if name == "ram-block-add":
        locked = draw(st.booleans())
        prealloc = draw(st.booleans())
        sizes = st.sampled_from(SAFE) if locked or prealloc else _n
        args = {"id": draw(_id), "size": draw(_small | sizes)}
        if draw(st.booleans()):
            small = [v for v in SAFE if v <= MiB]
            args["max-size"] = draw(st.sampled_from(small) if locked else _n | _high)
        for flag in ("merge", "dump", "hugepages"):
            if draw(st.booleans()):
                args[flag] = draw(st.booleans())
        if locked:
            args["lock"] = True
        if prealloc:
            args["prealloc"] = True
        if draw(st.booleans()):
            args["align"] = draw(st.sampled_from(ALIGNS))
    elif name == "ram-block-resize":
        args = {"id": draw(_id), "size": draw(_n)}
    elif name == "ram-block-del":
        args = {"id": draw(_id)}
    elif name in ("ram-block-read", "ram-block-discard"):
        args = {"id": draw(_id), "offset": draw(_n), "length": draw(_n)}
    elif name == "ram-block-write":
        data = draw(
            st.sampled_from(["", "=", "A", "AA==", "!!!!", "AAA", b64(b"x" * 5000)])
            | st.binary(max_size=300).map(b64)
        )
        args = {"id": draw(_id), "offset": draw(_n), "data": data}
    elif name == "query-ram-blocks":
        if draw(st.booleans()):
            args = {"id": draw(_id)}
    elif name == "subscribe":
        events = st.sampled_from(["RAM_BLOCK_ADDED", "RAM_BLOCK_REMOVED", "NOPE", ""])
        args = {"events": draw(st.lists(events, max_size=3)), "replay": draw(st.booleans())}
    mutation = draw(st.sampled_from(["none"] * 6 + ["drop", "extra", "type", "deep"]))
    if mutation == "drop" and args:
        args.pop(draw(st.sampled_from(sorted(args))))
    elif mutation == "extra":
        args[draw(st.sampled_from(["bogus", "dialect", "self", "positional", "ID"]))] = draw(_n)
    elif mutation == "type" and args:
        args[draw(st.sampled_from(sorted(args)))] = draw(_wrong_type)
    elif mutation == "deep":
        key = draw(st.sampled_from([*sorted(args), "x"]))
        args[key] = Deep(draw(st.sampled_from([2, 64, 500, 800])), draw(_n))
    return name, args


# The daemon with the wrap-around bug took any max-size above 2**64 - 8192 (ctypes truncated
# the reservation to a page or two), then a grow mapped over its own libraries: SIGSEGV.
@fuzz_settings(600)
@given(
    dialect=st.sampled_from(["jsonrpc", "qmp"]),
    program=st.lists(extreme_command(), min_size=1, max_size=6),
)
@example(
    dialect="jsonrpc",
    program=[
        ("ram-block-add", {"id": "a", "size": PAGE, "max-size": 2**64 - 1}),
        ("ram-block-resize", {"id": "a", "size": 2**30}),
    ],
)
@example(
    dialect="qmp",
    program=[("ram-block-add", {"id": "a", "size": PAGE, "max-size": 2**63, "align": 2**63})],
)
def test_extreme_values_always_get_one_answer_and_never_an_internal_error(
    d: Daemon, dialect: str, program: list[tuple[str, dict[str, Any]]]
) -> None:
    assert d.qmp_path is not None
    delete_all_blocks(d.path)
    conn: Rpc | Qmp = Rpc(d.path) if dialect == "jsonrpc" else Qmp(d.qmp_path)
    try:
        for n, (name, args) in enumerate(program):
            if dialect == "jsonrpc":
                req = {"jsonrpc": "2.0", "method": name, "params": args, "id": n}
            else:
                req = {"execute": name, "arguments": args, "id": n}
            conn.send(dumps(req).encode())
            try:
                resp = conn.answer()
            except ConnectionError:
                raise AssertionError(f"daemon died on {name} {args}") from None
            assert resp["id"] == n, resp
            kind, value = rpc_outcome(resp) if dialect == "jsonrpc" else qmp_outcome(resp)
            assert kind != INTERNAL, (name, args, value)
            assert kind in {"ok", "GenericError", "DeviceNotFound", conn.arg_error}, (kind, value)
            if kind == "ok" and name in ("ram-block-add", "ram-block-resize"):
                assert 0 < value["size"] <= value["max-size"] < 2**64, value
                assert value["offset"] + value["max-size"] < 2**64, value
                assert _ID.match(value["id"]), value
                assert_really_reserved(d.pid, value)
    finally:
        conn.close()
        assert d.alive(), d.log_text()[-3000:]
        delete_all_blocks(d.path)


@pytest.mark.parametrize(
    "args",
    [
        {"size": PAGE, "max-size": 2**64 - 1},
        {"size": PAGE, "max-size": 2**64 - 4096},
        {"size": PAGE, "max-size": 2**64 - 8192},
        {"size": 2**64 - 1},
        {"size": PAGE, "max-size": 2**63, "align": 2**63},
        {"size": PAGE, "max-size": 2**63 + 2**62, "align": 2**62},
    ],
)
def test_reservations_past_the_address_space_are_refused_cleanly(
    d: Daemon, args: dict[str, Any]
) -> None:
    """A reservation that cannot fit in the address space is refused by the host default of
    ``max-reserved`` (half the user address space) before the kernel is asked: never a block
    whose reported ``max-size`` is not really reserved (growing it would map over the daemon
    itself)."""
    delete_all_blocks(d.path)
    with Rpc(d.path) as rpc:
        maps_before = Path(f"/proc/{d.pid}/maps").read_text().count("\n")
        kind, desc = rpc.outcome("ram-block-add", {"id": "wrap", **args})
        assert kind == "GenericError"
        assert desc.startswith("Limit exceeded: max-reserved is "), desc
        kind, _ = rpc.outcome("ram-block-resize", {"id": "wrap", "size": 2**30})
        assert kind == "DeviceNotFound"
        assert rpc.call("query-stats")["reserved"] == 0
        assert Path(f"/proc/{d.pid}/maps").read_text().count("\n") <= maps_before + 8
    assert d.alive()


# -- 4. a model of the blocks, driven by a state machine ----------------------------------


@dataclass
class ModelBlock:
    size: int
    max_size: int
    resizable: bool
    data: bytearray = field(default_factory=bytearray)


def _up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


_machines = itertools.count()
_keys = st.sampled_from(["a", "a", "b", "c", "0bad"])


class BlocksMachine(RuleBasedStateMachine):
    """Blocks as the contract says they behave: ids in creation order, aligned sizes,
    contents (written bytes stay; discarded ranges, grown tails and new blocks are zeros).

    Every command's outcome class is predicted (``ok``, ``GenericError``, ``DeviceNotFound``
    or the dialect's argument error) and must match exactly.
    """

    path: Path
    dialect = "jsonrpc"

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"m{next(_machines)}-"
        self.conn: Rpc | Qmp = Rpc(self.path) if self.dialect == "jsonrpc" else Qmp(self.path)
        self.blocks: dict[str, ModelBlock] = {}

    def block_id(self, key: str) -> str:
        return key if key == "0bad" else self.prefix + key

    def expect(self, name: str, args: dict[str, Any], want: str) -> Any:
        kind, value = self.conn.outcome(name, args)
        if want == "args":
            want = self.conn.arg_error
        assert kind != INTERNAL, (name, args, value)
        assert kind == want, (name, args, kind, value, self.blocks.get(args.get("id", "")))
        return value

    @rule(
        key=_keys,
        pages=st.integers(0, 8),
        short=st.sampled_from([0, 0, 1, 100, PAGE - 1]),
        max_pages=st.none() | st.integers(1, 12),
    )
    def add(self, key: str, pages: int, short: int, max_pages: int | None) -> None:
        block_id = self.block_id(key)
        size = max(pages * PAGE - short, 0)
        args: dict[str, Any] = {"id": block_id, "size": size}
        if max_pages is not None:
            args["max-size"] = max_pages * PAGE - short
        if key == "0bad" or size == 0:
            self.expect("ram-block-add", args, "args")
            return
        max_size = _up(args.get("max-size", size))
        if block_id in self.blocks or _up(size) > max_size:
            self.expect("ram-block-add", args, "GenericError")
            return
        info = self.expect("ram-block-add", args, "ok")
        assert (info["id"], info["size"], info["max-size"]) == (block_id, _up(size), max_size)
        assert info["resizable"] is (max_pages is not None)
        self.blocks[block_id] = ModelBlock(
            _up(size), max_size, max_pages is not None, bytearray(_up(size))
        )

    @rule(key=_keys, pages=st.integers(-1, 13), short=st.sampled_from([0, 0, 1, PAGE - 1]))
    def resize(self, key: str, pages: int, short: int) -> None:
        self._resize(self.block_id(key), pages * PAGE - short)

    def _resize(self, block_id: str, size: int) -> None:
        args = {"id": block_id, "size": size}
        block = self.blocks.get(block_id)
        if block_id == "0bad" or size < 0:
            self.expect("ram-block-resize", args, "args")
        elif block is None:
            self.expect("ram-block-resize", args, "DeviceNotFound")
        elif size == 0:  # a size only for blocks sized by a VMM (virtio-mem)
            self.expect("ram-block-resize", args, "GenericError")
        elif _up(size) == block.size:
            assert self.expect("ram-block-resize", args, "ok")["size"] == block.size
        elif not block.resizable or _up(size) > block.max_size:
            self.expect("ram-block-resize", args, "GenericError")
        else:
            assert self.expect("ram-block-resize", args, "ok")["size"] == _up(size)
            new = _up(size)
            if new > block.size:
                block.data += bytes(new - block.size)  # grown tails read as zeros
            else:
                del block.data[new:]
            block.size = new

    @rule(key=_keys)
    def delete(self, key: str) -> None:
        block_id = self.block_id(key)
        if key == "0bad":
            self.expect("ram-block-del", {"id": block_id}, "args")
        elif self.blocks.pop(block_id, None) is None:
            self.expect("ram-block-del", {"id": block_id}, "DeviceNotFound")
        else:
            self.expect("ram-block-del", {"id": block_id}, "ok")

    def _range_outcome(self, block_id: str, offset: int, length: int) -> str:
        if block_id == "0bad" or offset < 0 or length < 0:
            return "args"
        block = self.blocks.get(block_id)
        if block is None:
            return "DeviceNotFound"
        return "ok" if offset + length <= block.size else "GenericError"

    @rule(key=_keys, offset=st.integers(-1, 13 * PAGE), data=st.binary(max_size=3 * PAGE))
    def write(self, key: str, offset: int, data: bytes) -> None:
        self._write(self.block_id(key), offset, data)

    def _write(self, block_id: str, offset: int, data: bytes) -> None:
        want = self._range_outcome(block_id, offset, len(data))
        args = {"id": block_id, "offset": offset, "data": b64(data)}
        result = self.expect("ram-block-write", args, want)
        if want == "ok":
            assert result == {"written": len(data)}
            self.blocks[block_id].data[offset : offset + len(data)] = data

    @rule(key=_keys, offset=st.integers(-1, 13 * PAGE), length=st.integers(-1, 3 * PAGE))
    def read(self, key: str, offset: int, length: int) -> None:
        self._read(self.block_id(key), offset, length)

    def _read(self, block_id: str, offset: int, length: int) -> None:
        want = self._range_outcome(block_id, offset, length)
        args = {"id": block_id, "offset": offset, "length": length}
        result = self.expect("ram-block-read", args, want)
        if want == "ok":
            got = base64.b64decode(result["data"])
            assert got == self.blocks[block_id].data[offset : offset + length]

    @rule(
        key=_keys,
        page=st.integers(0, 13),
        pages=st.integers(0, 4),
        skew=st.sampled_from([0, 0, 0, 1, -1]),
    )
    def discard(self, key: str, page: int, pages: int, skew: int) -> None:
        offset, length = page * PAGE + max(skew, 0), pages * PAGE - min(skew, 0)
        self._discard(self.block_id(key), offset, length)

    def _discard(self, block_id: str, offset: int, length: int) -> None:
        args = {"id": block_id, "offset": offset, "length": length}
        want = self._range_outcome(block_id, offset, length)
        if want == "ok" and (offset % PAGE or length % PAGE):
            want = "GenericError"  # unaligned
        self.expect("ram-block-discard", args, want)
        if want == "ok":
            self.blocks[block_id].data[offset : offset + length] = bytes(length)

    @precondition(lambda self: len(self.blocks) < 3)
    @rule(data=st.data())
    def add_a_valid_block(self, data: st.DataObject) -> None:
        free = [k for k in ("a", "b", "c") if self.block_id(k) not in self.blocks]
        key = data.draw(st.sampled_from(free), label="key")
        pages = data.draw(st.integers(1, 8), label="pages")
        max_pages = data.draw(st.none() | st.integers(pages, 12), label="max_pages")
        self.add(key, pages, data.draw(st.sampled_from([0, 1, 100])), max_pages)

    @precondition(lambda self: bool(self.blocks))
    @rule(data=st.data())
    def use_an_existing_block(self, data: st.DataObject) -> None:
        """Mostly valid operations on a block that exists, the bulk of real use."""
        block_id = data.draw(st.sampled_from(sorted(self.blocks)), label="block")
        block = self.blocks[block_id]
        op = data.draw(st.sampled_from(["write", "write", "read", "discard", "resize"]))
        if op == "write":
            offset = data.draw(st.integers(0, block.size), label="offset")
            size = data.draw(st.integers(0, min(2 * PAGE, block.size - offset)), label="length")
            self._write(block_id, offset, data.draw(st.binary(min_size=size, max_size=size)))
        elif op == "read":
            offset = data.draw(st.integers(0, block.size), label="offset")
            self._read(block_id, offset, data.draw(st.integers(0, block.size - offset)))
        elif op == "discard":
            first = data.draw(st.integers(0, block.size // PAGE), label="page")
            pages = data.draw(st.integers(0, block.size // PAGE - first + 1), label="pages")
            self._discard(block_id, first * PAGE, pages * PAGE)
        else:
            pages = data.draw(st.integers(1, block.max_size // PAGE + 1), label="pages")
            self._resize(block_id, pages * PAGE - data.draw(st.sampled_from([0, 1])))

    @invariant()
    def table_and_contents_match(self) -> None:
        listed = [b for b in self.conn.call("query-ram-blocks") if b["id"].startswith(self.prefix)]
        assert [(b["id"], b["size"], b["max-size"], b["resizable"]) for b in listed] == [
            (k, v.size, v.max_size, v.resizable) for k, v in self.blocks.items()
        ]
        for block_id, block in self.blocks.items():
            got = self.conn.call(
                "ram-block-read", {"id": block_id, "offset": 0, "length": block.size}
            )
            assert base64.b64decode(got["data"]) == block.data, block_id

    def teardown(self) -> None:
        try:
            for block_id in self.blocks:
                self.conn.call("ram-block-del", {"id": block_id})
        finally:
            self.conn.close()


def test_state_machine_over_jsonrpc(d: Daemon) -> None:
    class Machine(BlocksMachine):
        path = d.path
        dialect = "jsonrpc"

    run_state_machine_as_test(Machine, settings=fuzz_settings(100, stateful_step_count=50))
    _serving(d)


def test_state_machine_over_qmp(d: Daemon) -> None:
    assert d.qmp_path is not None
    qmp_path = d.qmp_path

    class Machine(BlocksMachine):
        path = qmp_path
        dialect = "qmp"

    run_state_machine_as_test(Machine, settings=fuzz_settings(40, stateful_step_count=40))
    _serving(d)
