"""Bulk data through JSON: the daemon's parse of large ``ram-block-write`` requests
(:mod:`ramd.transport.protocol.bulk`), the splitter's scans of long strings, and the client's
request
encoding with spliced base64 must mean exactly what the plain paths mean."""

from __future__ import annotations

import base64
import json
import os
import random
from typing import Any

import pytest
from pydantic import ValidationError
from ramd_client.message import Spliced, encode_request, plain, request, request_parts

from ramd.api.models import DecodedBase64, RamBlockWriteArgs
from ramd.transport.protocol import bulk, jsontext
from ramd.transport.protocol.splitter import JsonSplitter, control_error, long_string

KiB = 1024
BIG = base64.b64encode(os.urandom(96 * KiB))  # 128 KiB of base64: over bulk.BULK_FROM


def _write(data: bytes, **extra: Any) -> bytes:
    params = b'{"id":"b","offset":0,"data":"' + data + b'"}'
    head = json.dumps({"jsonrpc": "2.0", "method": "ram-block-write", "id": 1, **extra})
    return head[:-1].encode() + b',"params":' + params + b"}"


def _plain(value: Any) -> Any:
    """``value`` with decoded base64 as the str the usual parse gives (the tests' base64 is
    canonical: encoding the bytes again gives the text back)."""
    if isinstance(value, DecodedBase64):
        return base64.b64encode(value.data).decode("ascii")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def test_a_large_write_has_its_data_decoded_as_it_is_parsed() -> None:
    msg = bytearray(_write(BIG))
    obj = bulk.loads(msg)
    assert isinstance(obj["params"]["data"], DecodedBase64)
    assert obj["params"]["data"].data == base64.b64decode(BIG)
    assert _plain(obj) == jsontext.loads(msg)
    args = RamBlockWriteArgs.model_validate(obj["params"])  # the model takes it as is
    assert args.data == base64.b64decode(BIG)
    with pytest.raises(ValidationError):  # and never from JSON's own types
        RamBlockWriteArgs.model_validate({**jsontext.loads(msg)["params"], "data": [1]})


@pytest.mark.parametrize(
    "message",
    [
        _write(b"QUJD"),  # small: the usual parse
        _write(BIG[:1000] + b"\\/" + BIG[1000:]),  # an escape inside the data
        _write(BIG, name="ramd-bulk-data-placeholder"),  # the placeholder spelled by the client
        _write(BIG).replace(b'"method":"ram-block-write"', b'"method":"ram-block-read"'),
        _write(BIG).replace(b'"data":', b'"other":'),  # the long string is not params.data
        _write(BIG).replace(b'"offset":0,', b'"data":"QUJD","offset":0,'),  # duplicate: last wins
        _write(BIG).replace(b'"offset":0,"data":"', b'"offset":0,"data":"QUJD","data":"'),
        _write(BIG).replace(b'"id":"b"', b'"id":"' + b"x" * 70 * KiB + b'"'),  # long id first
        b"[" + _write(BIG) + b"]",  # a batch
        _write(BIG[:5000] + "é".encode() + BIG[5000:]),  # not ASCII (not base64 either)
        _write(BIG[:5000] + b"*" + BIG[5000:]),  # not base64: the plain path's str
        _write(BIG[:-4] + b"QQ=="),  # padded
        _write(BIG[:-4] + b"QQ=A"),  # padding inside
        _write(BIG).replace(b'"id":"b"', '"id":"é"'.encode()),  # not ASCII elsewhere
        _write(BIG).replace(b'"params":{', b'"params":[').replace(b'"}}', b'"]}'),
    ],
)
def test_large_messages_parse_as_the_plain_path_does(message: bytes) -> None:
    try:
        expected: Any = jsontext.loads(message)
    except ValueError as e:
        expected = ("error", str(e))
    try:
        got: Any = _plain(bulk.loads(message))
    except ValueError as e:
        got = ("error", str(e))
    assert got == expected


@pytest.mark.parametrize(
    "message",
    [
        _write(BIG).replace(b'"}}', b'"},}'),  # a syntax error after the data
        _write(BIG).replace(b'"id": 1', b'"id": NaN'),
        _write(BIG[:5000] + b"\xff" + BIG[5000:]),  # not UTF-8
    ],
)
def test_large_malformed_messages_get_the_plain_error(message: bytes) -> None:
    with pytest.raises(ValueError) as plain_error:
        jsontext.loads(message)
    with pytest.raises(ValueError) as bulk_error:
        bulk.loads(message)
    assert str(bulk_error.value) == str(plain_error.value)


def test_long_string_finds_the_first_long_string_without_escapes() -> None:
    text = b'{"a":"short","b":[1,{"c":"' + b"x" * 5000 + b'"}],"d":"' + b"y" * 9000 + b'"}'
    start = text.index(b"x")
    assert long_string(text, 4000) == (start, start + 5000)
    start = text.index(b"y")
    assert long_string(text, 6000) == (start, start + 9000)
    assert long_string(text, 10000) is None
    escaped = text.replace(b"x" * 10, b'x\\"xxxxxxx', 1)
    assert long_string(escaped, 4000) is None


@pytest.mark.parametrize("where", [0, 1, 2047, 2048, 70000, 99999])
def test_a_control_byte_deep_inside_a_long_string_ends_the_message(where: int) -> None:
    stream = b'{"data":"' + b"A" * where + b"\n" + b"A" * 9000
    control_at = stream.index(b"\n")
    s = JsonSplitter()
    step = 48 * KiB
    for i in range(0, len(stream), step):
        out = s.feed(stream[i : i + step])
        if i <= control_at < i + step:
            assert out == [control_error(0x0A)]
            break
        assert out == []


@pytest.mark.parametrize("control", range(0x20))
def test_every_control_byte_in_base64_is_found_wherever_it_lies(control: int) -> None:
    """The long-string scan trusts pybase64's validator to find no control byte: it must
    find each one at its exact place, in runs of base64 with and without padding."""
    text = base64.b64encode(os.urandom(30000))  # no padding
    padded = base64.b64encode(os.urandom(30001))  # "=="
    rng = random.Random(control)
    for body in (text, padded, padded[:-1], text[:-1], text[:-2], text[:-3]):
        for where in (0, 1, 3, 4, 31, 32, 2049, rng.randrange(len(body)), len(body) - 1):
            stream = b'{"data":"' + body[:where] + bytes((control,)) + body[where:]
            assert JsonSplitter().feed(stream) == [control_error(control)], (where, len(body))
    clean = JsonSplitter()  # and none where there is none
    for body in (text, padded, padded[:-1], text[:-3]):
        assert clean.feed(b'{"data":"' + body) == []
        assert clean.feed(b'"}') == [b'{"data":"' + body + b'"}']


def test_spliced_requests_encode_as_the_plain_request() -> None:
    data = base64.b64encode(os.urandom(3000))
    for params in (
        {"id": "b", "offset": 5, "data": Spliced(data)},
        {"data": Spliced(data)},
        {"data": Spliced(b""), "id": "é"},
    ):
        obj = request("ram-block-write", params, 9)
        wire = encode_request(obj)
        assert wire == b"".join(request_parts(obj)) and wire.endswith(b"\n")
        assert json.loads(wire) == plain(obj)
        assert plain(obj)["params"]["data"] == params["data"].text.decode()  # type: ignore[union-attr]
