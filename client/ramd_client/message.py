"""The JSON-RPC 2.0 messages of ramd's wire protocol, as plain data. No I/O here.

Requests go out as one compact JSON text followed by ``\\n``; the daemon answers with one
compact JSON text per line (docs/protocol.md §1), so incoming messages are split on newlines and
decoded by :func:`decode`, which sorts each into a :class:`Response`, an :class:`ErrorReply` or
a :class:`Notification` (an event), and refuses anything else with
:class:`~ramd_client.error.ProtocolError`.

Both the asynchronous protocol and anything else that speaks to the daemon (tests, the
blocking :mod:`ramd_client.oneshot`) share these functions, so the wire format lives in one
place. The messages are named tuples (immutable; cheaper to define at start-up than
dataclasses, which ``ramctl version`` would pay for).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import pybase64

from ramd_client.error import CLASS_OF_CODE, ProtocolError, RamdError

__all__ = [
    "BULK_FROM",
    "Binary",
    "ErrorReply",
    "Message",
    "Notification",
    "Response",
    "Spliced",
    "decode",
    "decode_binary",
    "encode_request",
    "plain",
    "refusal",
    "request",
    "request_parts",
]

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Response(NamedTuple):
    """A successful answer: ``result`` of request ``id``."""

    id: int | str | None
    result: Any


class ErrorReply(NamedTuple):
    """An error answer of request ``id`` (None: not tied to a request, e.g. a refused
    connection or a parse error)."""

    id: int | str | None
    code: int
    message: str
    data: Any


class Notification(NamedTuple):
    """A message without ``id``: an event, ``method`` its name, ``params`` its envelope."""

    method: str
    params: dict[str, Any]


Message = Response | ErrorReply | Notification


class Binary(NamedTuple):
    """The result ``{"data": BASE64}`` of a ``ram-block-read`` answer, already decoded:
    ``data`` is the bytes the base64 text stands for (see :func:`decode_binary`)."""

    data: bytes


class Spliced(NamedTuple):
    """A request's string member written as is: ``text`` is the content of a JSON string
    that needs no escaping (ASCII, no ``"``, ``\\`` or control character), such as base64.

    A megabyte-sized value then costs one copy into the request instead of ``json``'s
    escaping scan. Whoever builds one guarantees the content; nothing checks it.
    """

    text: bytes


def request(method: str, params: Mapping[str, Any], req_id: int) -> dict[str, Any]:
    """The request object of ``method`` (``params`` omitted when empty, meaning ``{}``)."""
    obj: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": req_id}
    if params:
        obj["params"] = dict(params)
    return obj


def encode_request(obj: Mapping[str, Any]) -> bytes:
    """The wire form of a request object: compact JSON and a newline."""
    return b"".join(request_parts(obj))


def request_parts(obj: Mapping[str, Any]) -> list[bytes]:
    """:func:`encode_request` in pieces to send one after the other: :class:`Spliced`
    members of its ``params`` are pieces of their own (written last in the params, without
    re-encoding or copying)."""
    params = obj.get("params")
    if not params or not any(type(v) is Spliced for v in params.values()):
        return [(_encode(obj) + "\n").encode()]
    rest = {k: v for k, v in params.items() if type(v) is not Spliced}
    # "params" is the last member, so the text ends with the two closing braces
    head = _encode({**{k: v for k, v in obj.items() if k != "params"}, "params": rest})
    parts = [head[:-2].encode()]
    comma = b"," if rest else b""
    for key, value in params.items():
        if type(value) is Spliced:
            parts += (comma, _encode(key).encode(), b':"', value.text, b'"')
            comma = b","
    parts.append(b"}}\n")
    return parts


def plain(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with each :class:`Spliced` member of its ``params`` as the str it stands for
    (what a trace hook sees)."""
    params = obj.get("params")
    if not params or not any(type(v) is Spliced for v in params.values()):
        return obj
    decoded = {k: v.text.decode("ascii") if type(v) is Spliced else v for k, v in params.items()}
    return {**obj, "params": decoded}


def decode(line: bytes) -> tuple[Message, dict[str, Any]]:
    """Parse one line from the daemon: the message and the raw decoded object.

    Raises :class:`ProtocolError` when the line is not a JSON-RPC 2.0 response or
    notification (a batch answer is never expected: this client sends no batches).
    """
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"malformed message from the daemon: {e}") from None
    if type(obj) is not dict:
        raise ProtocolError(f"unexpected message from the daemon: {_preview(line)}")
    if "QMP" in obj:
        raise ProtocolError(
            "the peer greets in QMP: this is a QMP socket, connect to the JSON-RPC one"
        )
    if obj.get("jsonrpc") != "2.0":
        raise ProtocolError(f"not a JSON-RPC 2.0 message: {_preview(line)}")
    if "id" not in obj:
        method, params = obj.get("method"), obj.get("params", {})
        if type(method) is not str or type(params) is not dict:
            raise ProtocolError(f"malformed notification: {_preview(line)}")
        return Notification(method, params), obj
    req_id = obj["id"]
    if "result" in obj:
        return Response(req_id, obj["result"]), obj
    err = obj.get("error")
    if type(err) is dict and type(err.get("code")) is int and type(err.get("message")) is str:
        return ErrorReply(req_id, err["code"], err["message"], err.get("data")), obj
    raise ProtocolError(f"malformed response: {_preview(line)}")


#: Lines shorter than this are always parsed as usual (:func:`decode`).
BULK_FROM = 64 * 1024
_PLACEHOLDER = b"ramd-client-bulk-placeholder"
_PLACEHOLDER_STR = _PLACEHOLDER.decode()
_DATA_KEY = b'"data":"'


def decode_binary(
    buf: bytes | bytearray,
    start: int,
    end: int,
    wanted: Callable[[Any], bool],
    traced: bool = False,
) -> tuple[Response, dict[str, Any]] | None:
    """The line ``buf[start:end]`` from the daemon, when it is a large answer whose
    ``result.data`` is a base64 string, parsed without making a str of that string:
    ``Response(id, Binary(decoded bytes))`` and the raw object; else None.

    ``wanted(id)`` says whether the call of that id takes a :class:`Binary` result (the
    caller of a ``ram-block-read``, which decodes ``data`` as base64 and ignores any other
    member of the result); it is asked only once the rest of the line parsed. In the raw
    object ``data`` is the str :func:`decode` gives when ``traced`` (a copy), else the
    :class:`Binary`. ``buf`` is only read, and not referenced once this returns.

    None (decode the line with :func:`decode`, which then gives the very same data, or the
    very same error) unless all of this holds: the line is at least :data:`BULK_FROM` bytes;
    its first ``"data":"`` begins a string that makes up at least half the line; the line
    with that string replaced by a placeholder parses as a JSON-RPC 2.0 response (``id`` and
    ``result``, no ``QMP``), has no backslash and holds the placeholder exactly once, as
    ``result.data``; and the string is valid base64. Then no byte of the string can end or
    escape it, so the whole line parses the same way with the string in the placeholder's
    place, and the base64 is decoded once, from the line's own bytes.
    """
    if end - start < BULK_FROM:
        return None
    key = buf.find(_DATA_KEY, start, end)
    if key < 0:
        return None
    first = key + len(_DATA_KEY)
    last = buf.find(b'"', first, end)
    if last - first < (end - start) // 2:
        return None
    with memoryview(buf) as view:
        rest = b"".join((view[start:first], _PLACEHOLDER, view[last:end]))
        if rest.count(_PLACEHOLDER) != 1 or b"\\" in rest:
            return None
        try:
            obj = json.loads(rest)
        except (ValueError, RecursionError):
            return None
        if type(obj) is not dict or "QMP" in obj or obj.get("jsonrpc") != "2.0":
            return None
        result = obj.get("result")
        if "id" not in obj or type(result) is not dict or result.get("data") != _PLACEHOLDER_STR:
            return None
        if not wanted(obj["id"]):
            return None
        try:
            binary = Binary(pybase64.b64decode(view[first:last], validate=True))
        except (binascii.Error, ValueError):
            return None
    result["data"] = buf[first:last].decode("ascii") if traced else binary
    return Response(obj["id"], binary), obj


def refusal(reply: ErrorReply) -> RamdError:
    """The :class:`RamdError` of an error answer.

    The class is ``data.class`` for a command failure (-32000) and the QMP class of the
    JSON-RPC code otherwise (see :data:`~ramd_client.error.CLASS_OF_CODE`).
    """
    data = reply.data
    error_class: str | None = None
    if isinstance(data, dict):
        cls = data.get("class")
        error_class = cls if isinstance(cls, str) else None
    if error_class is None:
        error_class = CLASS_OF_CODE.get(reply.code, "GenericError")
    return RamdError(error_class, reply.message, reply.code, data)


def _preview(line: bytes, limit: int = 200) -> str:
    text = line[:limit].decode("utf-8", "replace").rstrip()
    return text + ("..." if len(line) > limit else "")
