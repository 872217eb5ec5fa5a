"""Tests of ramd.transport.protocol.splitter: JSON texts delimited in a chunked byte stream."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ramd.transport.protocol.splitter import (
    JsonSplitter,
    SplitError,
    control_error,
    depth_error,
    size_error,
    stray_error,
)

Item = bytes | bytearray | SplitError


def feed_all(splitter: JsonSplitter, chunks: Iterable[bytes]) -> list[Item]:
    out: list[Item] = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    return out


def split(data: bytes, **limits: int) -> list[Item]:
    return JsonSplitter(**limits).feed(data)


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def cut(data: bytes, points: Iterable[int]) -> list[bytes]:
    edges = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def errors(items: list[Item]) -> list[str]:
    return [i.reason for i in items if isinstance(i, SplitError)]


# --- examples ---------------------------------------------------------------------------------


def test_one_message() -> None:
    msg = b'{"execute": "query-status", "id": 1}'
    s = JsonSplitter()
    assert s.feed(msg) == [msg]
    assert s.pending() == 0


def test_surrounding_whitespace_is_stripped() -> None:
    assert split(b' \r\n\t{"a": 1} \n') == [b'{"a": 1}']


@pytest.mark.parametrize("sep", [b"", b" ", b"\n", b"\r\n", b" \t\n  "])
def test_many_in_one_feed(sep: bytes) -> None:
    msgs = [b'{"a": 1}', b"[1, 2, {}]", b"{}", b"[]", b'{"b": [[]]}', b'"s"']
    assert split(sep.join(msgs)) == msgs


def test_one_message_byte_by_byte() -> None:
    msg = b'{"a": ["x\\"}", {"b": null}], "c": "\\\\"}'
    s = JsonSplitter()
    out: list[Item] = []
    for i, chunk in enumerate(bytewise(msg), 1):
        assert out == []
        out += s.feed(chunk)
        assert s.pending() == (i if i < len(msg) else 0)  # it completes with its last byte
    assert out == [msg]
    assert s.pending() == 0
    assert json.loads(msg) == {"a": ['x"}', {"b": None}], "c": "\\"}


TRICKY = b'{"a\\"": ["x\\\\", "\\"}"], "b": "]\\\\\\"["} "s\\\\\\"" [1,"\\\\"]12 '
TRICKY_TEXTS = [
    b'{"a\\"": ["x\\\\", "\\"}"], "b": "]\\\\\\"["}',
    b'"s\\\\\\""',
    b'[1,"\\\\"]',
    b"12",
]


def test_every_two_and_three_way_cut() -> None:
    assert [json.loads(t) for t in TRICKY_TEXTS]  # valid texts
    assert split(TRICKY) == TRICKY_TEXTS
    n = len(TRICKY)
    for i in range(n + 1):
        for j in range(i, n + 1):
            chunks = [TRICKY[:i], TRICKY[i:j], TRICKY[j:]]
            assert feed_all(JsonSplitter(), chunks) == TRICKY_TEXTS, chunks


@pytest.mark.parametrize("length", [0, 1, 255, 256, 257, 300, 70_000])
@pytest.mark.parametrize("escapes", [b"", b'\\"', b"\\\\", b'\\"}]\\\\'])
def test_long_and_short_strings(length: int, escapes: bytes) -> None:
    body = escapes + b"a{" * (length // 2) + escapes + b"]" * (length % 2) + escapes
    msgs = [b'{"k": ["' + body + b'"]}', b'"' + body + b'"', b'[[["' + body + b'"], 1]]']
    data = b" ".join(msgs) + b"[0]"
    assert [json.loads(m) for m in msgs]  # valid texts
    assert split(data) == [*msgs, b"[0]"]
    for size in (1, 2, 7, 300, 4096):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert feed_all(JsonSplitter(), chunks) == [*msgs, b"[0]"]


@pytest.mark.parametrize("depth", range(1, 9))
@pytest.mark.parametrize("max_depth", [1, 3, 4, 5, 8])
def test_depths_around_the_limit(depth: int, max_depth: int) -> None:
    msg = b'{"a": ' * depth + b'"}"' + b"}" * depth
    expected = [msg] if depth <= max_depth else [depth_error(max_depth)]
    assert split(msg + b" 5 ", max_depth=max_depth) == [*expected, b"5"]
    assert feed_all(JsonSplitter(max_depth=max_depth), [*bytewise(msg), b" 5 "]) == [
        *expected,
        b"5",
    ]


def test_message_across_feeds_with_next_in_same_feed() -> None:
    s = JsonSplitter()
    assert s.feed(b'{"a": [1') == []
    assert s.pending() == 8
    assert s.feed(b', 2]}{"b"') == [b'{"a": [1, 2]}']
    assert s.pending() == 4
    assert s.feed(b": 3}\n") == [b'{"b": 3}']
    assert s.pending() == 0


@pytest.mark.parametrize(
    "msg",
    [
        b'{"a": "}"}',
        b'{"a": "]]]]"}',
        b'["{", "[", "{{{"]',
        b'{"a": "\\"}"}',
        b'{"a": "\\\\"}',
        b'{"a": "\\\\\\"}]"}',
        b'["\\\\\\\\", "}"]',
        b'{"a\\"": "b\\\\"}',
        b'["\\u007d\\n"]',
    ],
)
def test_strings_hide_brackets_and_escapes(msg: bytes) -> None:
    json.loads(msg)  # a valid text, to be sure the test means what it says
    assert split(msg + b"[0]") == [msg, b"[0]"]
    assert feed_all(JsonSplitter(), [*bytewise(msg), b"[0]"]) == [msg, b"[0]"]


def test_top_level_scalars() -> None:
    data = b'1 -2.5e+3\n"a}b" true false null "x\\"y"{"k":0}7[8]"q"3.0 '
    assert split(data) == [
        b"1",
        b"-2.5e+3",
        b'"a}b"',
        b"true",
        b"false",
        b"null",
        b'"x\\"y"',
        b'{"k":0}',
        b"7",
        b"[8]",
        b'"q"',
        b"3.0",
    ]


def test_scalar_at_end_of_data_waits() -> None:
    s = JsonSplitter()
    assert s.feed(b"12") == []
    assert s.pending() == 2
    assert s.feed(b"3") == []
    assert s.feed(b"\n") == [b"123"]
    assert s.feed(b"tr") == []
    assert s.feed(b"ue{}") == [b"true", b"{}"]
    assert s.feed(b'"ab') == []
    assert s.feed(b'c"') == [b'"abc"']  # a string ends at its quote: no need to wait
    assert s.pending() == 0


def test_scalar_ended_by_closer() -> None:
    assert split(b"12]") == [b"12", stray_error(ord("]"))]


def test_stray_closers() -> None:
    s = JsonSplitter()
    assert s.feed(b'}{"a": 1}]\n]  [1]}') == [
        stray_error(ord("}")),
        b'{"a": 1}',
        stray_error(ord("]")),
        stray_error(ord("]")),
        b"[1]",
        stray_error(ord("}")),
    ]
    assert s.pending() == 0


def test_a_control_byte_in_a_string_costs_exactly_its_message() -> None:
    """A raw byte that is no line break: the message is skipped to its real end (its
    brackets and quotes after the byte still count), so nothing after it is lost."""
    raw = b'{"a":"x\x01}{\\"[","b":["\x1f"]}'
    for chunks in ([raw + b'{"c":1}'], [raw, b'{"c":1}'], [raw[:8], raw[8:] + b'{"c":1}']):
        s = JsonSplitter()
        assert feed_all(s, chunks) == [control_error(0x01), b'{"c":1}']
        assert s.pending() == 0
    assert split(b'"a\x02b" {"c":1}') == [control_error(0x02), b'{"c":1}']


def test_a_line_break_in_a_string_ends_its_message_there() -> None:
    """Most likely a missing quote: the next line is a request of its own."""
    assert split(b'{"a":"x}\n{"c":1}') == [control_error(0x0A), b'{"c":1}']
    assert split(b'{"a":"x\x01y}\r{"c":1}') == [control_error(0x01), b'{"c":1}']


def test_mismatched_brackets_are_the_callers_problem() -> None:
    out = split(b'[1}{"a": 2]')
    assert out == [b"[1}", b'{"a": 2]']
    for text in out:
        assert isinstance(text, bytes)
        with pytest.raises(ValueError):
            json.loads(text)


def test_exact_limits_are_accepted() -> None:
    msg = b'{"a": "' + b"x" * 91 + b'"}'
    assert len(msg) == 100
    assert split(msg, max_size=100) == [msg]
    deep = b"[" * 5 + b"]" * 5
    assert split(deep, max_depth=5) == [deep]


def test_too_large_message_in_one_feed() -> None:
    big = b'{"a": "' + b"x" * 200 + b'"}'
    out = split(big + b'\n{"next": 1}', max_size=100)
    assert out == [size_error(100), b'{"next": 1}']


def test_too_large_message_streamed_in_chunks() -> None:
    limit = 1000
    s = JsonSplitter(max_size=limit)
    # A string full of brackets, escaped quotes and escaped backslashes, cut at odd places.
    data = b'{"a": ["' + b'x{[}\\"]\\\\' * 1000 + b'"], "b": {"c": [1, 2]}}\n{"next": [1]}'
    chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
    out: list[Item] = []
    for chunk in chunks:
        out += s.feed(chunk)
        assert s.pending() <= limit
    assert out == [size_error(1000), b'{"next": [1]}']
    assert s.pending() == 0


def test_too_large_top_level_scalars() -> None:
    s = JsonSplitter(max_size=10)
    out = feed_all(s, [b'"' + b"a" * 8, b"b" * 100, b'" 123456789', b"01234 [1]"])
    assert errors(out) == ["message exceeds the size limit of 10 bytes"] * 2
    assert out[2:] == [b"[1]"]
    assert s.pending() == 0


def test_too_deep_message() -> None:
    out = split(b"[" * 1025 + b"]" * 1025 + b'{"next": 1}')
    assert out == [depth_error(1024), b'{"next": 1}']


def test_too_deep_message_streamed_in_chunks() -> None:
    s = JsonSplitter(max_depth=8, max_size=1 << 20)
    out: list[Item] = []
    for chunk in [b'{"a": '] + [b'[{"b": '] * 10_000 + [b"0}]"] * 10_000 + [b'}\n[["ok"]]']:
        out += s.feed(chunk)
        assert s.pending() <= 64  # nothing stored after the error
    assert out == [depth_error(8), b'[["ok"]]']
    assert s.pending() == 0


def test_too_deep_and_too_large_gets_one_error() -> None:
    out = split(b"[" * 50 + b"0" * 500 + b"]" * 50 + b" 1 ", max_size=100, max_depth=10)
    assert out == [depth_error(10), b"1"]


def test_invalid_utf8() -> None:
    inside = b'{"a": "\xff\xfe\x80"}'
    assert split(inside) == [inside]
    # Garbage at top level is a token of its own (the caller fails to parse it), then resync.
    assert split(b'\xff\xff{"b": 1}\xc3\x28 2 ') == [b"\xff\xff", b'{"b": 1}', b"\xc3\x28", b"2"]
    assert split(b"\x00\xff}") == [b"\x00\xff", stray_error(ord("}"))]


def test_empty_feed() -> None:
    s = JsonSplitter()
    assert s.feed(b"") == []
    assert s.feed(b'{"a"') == []
    assert s.feed(b"") == []
    assert s.feed(b"}") == [b'{"a"}']


@pytest.mark.parametrize("kwargs", [{"max_size": 0}, {"max_depth": 0}])
def test_bad_limits(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        JsonSplitter(**kwargs)


# --- reference model --------------------------------------------------------------------------


def reference(data: bytes, max_size: int, max_depth: int) -> tuple[list[Item | str], int]:
    """Split ``data`` one byte at a time: the obvious, slow statement of the contract.

    Returns the items (an over-limit message as the string "limit", since which limit is
    reported first may depend on chunking) and what pending() must be after all of ``data``.
    A message's first error is its only item. A control byte inside a string (escaped or not)
    is an error (or "limit" when the bytes before it were already over a limit); a line break
    ends the message there and scanning resumes after it, any other control byte is skipped
    as if it were allowed and the message ends as usual.
    """
    items: list[Item | str] = []
    ws, closers, terminators = b" \t\r\n", b"}]", b' \t\r\n{["}]'
    i, n = 0, len(data)
    while i < n:
        c = data[i]
        if c in ws:
            i += 1
            continue
        if c in closers:
            items.append(stray_error(c))
            i += 1
            continue
        start, depth, in_string, escape, done = i, 0, False, False, False
        error: Item | str | None = None  # the message's first error
        in_string = c == ord('"')
        if in_string or c in b"{[":
            i += 1
            depth = 0 if in_string else 1
            if depth > max_depth:
                error = "limit"
            while i < n and not done:
                b = data[i]
                i += 1
                if in_string and b < 0x20:
                    if error is None:
                        error = "limit" if i - 1 - start > max_size else control_error(b)
                    escape = False
                    done = b in b"\r\n"
                elif in_string:
                    if escape:
                        escape = False
                    elif b == ord("\\"):
                        escape = True
                    elif b == ord('"'):
                        in_string = False
                        done = depth == 0
                elif b == ord('"'):
                    in_string = True
                elif b in b"{[":
                    depth += 1
                    if depth > max_depth and error is None:
                        error = "limit"
                elif b in closers:
                    depth -= 1
                    done = depth == 0
        else:
            while i < n and data[i] not in terminators:
                i += 1
            done = i < n
        if error is None and i - start > max_size:
            error = "limit"
        if not done:
            if error is not None:
                items.append(error)
            return items, 0 if error is not None else i - start
        items.append(data[start:i] if error is None else error)
    return items, 0


def normalized(items: list[Item]) -> list[Item | str]:
    return [
        "limit" if isinstance(i, SplitError) and i.kind in ("size", "depth") else i for i in items
    ]


# --- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5)
    ),
    max_leaves=20,
)
whitespace = st.text(alphabet=" \t\r\n", max_size=3)
separators = st.tuples(
    st.builds("".join, st.tuples(whitespace, st.just(","), whitespace)),
    st.builds("".join, st.tuples(whitespace, st.just(":"), whitespace)),
)


@st.composite
def json_stream(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """JSON texts, and a stream of them with random (possibly no) whitespace between them."""
    texts: list[bytes] = []
    stream = bytearray()
    for value in draw(st.lists(json_values, max_size=8)):
        text = json.dumps(
            value, separators=draw(separators), ensure_ascii=draw(st.booleans())
        ).encode()
        gap = draw(whitespace).encode()
        if not gap and texts and texts[-1][:1] not in b'{["' and text[:1] not in b'{["':
            gap = b" "  # two bare numbers or literals need a separator: 1 2 is not 12
        stream += gap + text
        texts.append(text)
    return texts, bytes(stream)


@given(json_stream(), st.lists(st.integers(min_value=0), max_size=30))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_property_stream_of_json_texts(
    stream: tuple[list[bytes], bytes], points: list[int]
) -> None:
    texts, data = stream
    s = JsonSplitter()
    out = feed_all(s, cut(data, points))
    if texts and texts[-1][:1] not in b'{["':  # a final number or literal waits for its end
        assert s.pending() == len(texts[-1])
        out += s.feed(b"\n")
    assert out == texts
    parsed = [json.loads(t) for t in out if isinstance(t, bytes | bytearray)]
    assert parsed == [json.loads(t) for t in texts]
    assert s.pending() == 0


# Random bytes, and streams of the bytes that matter with long runs (strings past the length
# that the splitter's regular expressions skip themselves).
interesting_bytes = st.binary(max_size=400) | st.lists(
    st.sampled_from([*b'{}[]"\\ \n\t', *b"0123456789tx", 0xFF, 0x00, 0x80]).map(
        lambda b: bytes([b])
    )
    | st.integers(min_value=250, max_value=600).map(lambda k: b"x" * k),
    max_size=60,
).map(b"".join)
limits = st.tuples(
    st.integers(min_value=1, max_value=64) | st.integers(min_value=64, max_value=4000),
    st.integers(min_value=1, max_value=7),
)


@given(interesting_bytes, st.lists(st.integers(min_value=0), max_size=20), limits)
def test_property_any_bytes(data: bytes, points: list[int], limit: tuple[int, int]) -> None:
    max_size, max_depth = limit
    expected, expected_pending = reference(data, max_size, max_depth)
    s = JsonSplitter(max_size=max_size, max_depth=max_depth)
    out: list[Item] = []
    for chunk in cut(data, points):
        out += s.feed(chunk)
        assert s.pending() <= max_size
    assert normalized(out) == expected
    assert s.pending() == expected_pending
    for item in out:
        if isinstance(item, bytes | bytearray):
            assert 0 < len(item) <= max_size
            assert item == item.strip(b" \t\r\n")


@given(interesting_bytes, st.lists(st.integers(min_value=0), max_size=20), limits)
def test_property_chunking_does_not_matter(
    data: bytes, points: list[int], limit: tuple[int, int]
) -> None:
    whole = JsonSplitter(*limit)
    chunked = JsonSplitter(*limit)
    assert normalized(feed_all(chunked, cut(data, points))) == normalized(whole.feed(data))
    assert chunked.pending() == whole.pending()


def test_json_loads_round_trip_of_mixed_stream() -> None:
    values: list[Any] = [{"a": [1, "}"]}, [], "x", 3, {"b": {"c": '\\"'}}, None]
    data = "".join(json.dumps(v) for v in values).encode() + b"\n"
    s = JsonSplitter()
    out = feed_all(s, bytewise(data))
    assert [json.loads(t) for t in out if isinstance(t, bytes | bytearray)] == values
