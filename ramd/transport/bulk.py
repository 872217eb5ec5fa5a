"""Parse a large ``ram-block-write`` request without turning its data into a Python str.

A chunk of a bulk write is one JSON text of several MiB, nearly all of it the base64 string
``params.data``. Decoding it the usual way copies that string twice (bytes to str, then the
JSON string into its own str) and scans it once more, only for the base64 decoder to read it
again. :func:`loads` instead parses the text with that string replaced by a short
placeholder and puts a ``memoryview`` of the original bytes in its place, which the argument
model's base64 validator decodes directly (see ``ramd.api.models``).

It changes nothing a client can see: whenever the result could differ from
:func:`ramd.transport.jsontext.loads` of the whole text (not a JSON-RPC ``ram-block-write``
object, the long string not exactly ``params.data``, escapes, non-ASCII bytes, a parse error
whose wording names a position, a duplicate member), the whole text is parsed as usual. Control
characters cannot occur in the string: the splitter ends a message at the first one.

Loop thread, no state.
"""

from __future__ import annotations

from typing import Any

from ramd.transport import jsontext
from ramd.transport.splitter import long_string

#: Texts shorter than this are parsed as usual.
BULK_FROM = 64 * 1024
_PLACEHOLDER = "ramd-bulk-data-placeholder"
_PLACEHOLDER_BYTES = _PLACEHOLDER.encode()


def loads(message: bytes | bytearray) -> Any:
    """The JSON text ``message`` as Python data, as :func:`ramd.transport.jsontext.loads`
    gives it, except that a large ``params.data`` of a ``ram-block-write`` request is a
    ``memoryview`` of its ASCII bytes in ``message`` (which must then not change)."""
    if len(message) < BULK_FROM or not message.isascii():
        return jsontext.loads(message)
    span = long_string(message, len(message) // 2)
    if span is None:
        return jsontext.loads(message)
    start, end = span
    rest = b"".join((message[:start], _PLACEHOLDER_BYTES, message[end:]))
    if rest.count(_PLACEHOLDER_BYTES) != 1 or b"\\" in rest:
        return jsontext.loads(message)
    try:
        obj = jsontext.loads(rest)
    except ValueError:
        return jsontext.loads(message)  # the error, worded for the text the client sent
    params = obj.get("params") if type(obj) is dict else None
    if (
        type(params) is not dict
        or obj.get("method") != "ram-block-write"
        or params.get("data") != _PLACEHOLDER
    ):
        return jsontext.loads(message)
    params["data"] = memoryview(message)[start:end]
    return obj
