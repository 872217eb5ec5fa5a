"""Parse a large ``ram-block-write`` request without turning its data into a Python str.

A chunk of a bulk write is one JSON text of several MiB, nearly all of it the base64 string
``params.data``. Decoding it the usual way copies that string twice (bytes to str, then the
JSON string into its own str) and scans it once more, only for the base64 decoder to read it
again. :func:`loads` instead parses the text with that string replaced by a short
placeholder, decodes the base64 straight from the original bytes and puts the result in its
place, as a :class:`ramd.api.models.DecodedBase64` that the argument model takes as is.

It changes nothing a client can see: whenever the result could differ from
:func:`ramd.transport.protocol.jsontext.loads` of the whole text (not a JSON-RPC ``ram-block-write``
object, the long string not exactly ``params.data``, escapes, a parse error whose wording names
a position, a duplicate member, data that is not valid base64: the plain path words that
error, or the parse error of bytes that are not UTF-8), the whole text is parsed as usual. A
valid base64 string holds only ASCII letters, digits, ``+``, ``/`` and ``=``: it means the
same as a JSON string as it does as bytes.

Loop thread, no state.
"""

from __future__ import annotations

from typing import Any

import pybase64

from ramd.api.models import DecodedBase64
from ramd.transport.protocol import jsontext
from ramd.transport.protocol.splitter import long_string

#: Texts shorter than this are parsed as usual.
BULK_FROM = 64 * 1024
_PLACEHOLDER = "ramd-bulk-data-placeholder"
_PLACEHOLDER_BYTES = _PLACEHOLDER.encode()


def loads(message: bytes | bytearray) -> Any:
    """The JSON text ``message`` as Python data, as :func:`ramd.transport.protocol.jsontext.loads`
    gives it, except that a large ``params.data`` of a ``ram-block-write`` request is a
    :class:`~ramd.api.models.DecodedBase64` of the bytes its base64 text stands for.
    ``message`` is not referenced once this returns."""
    if len(message) < BULK_FROM:
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
    try:
        with memoryview(message) as view:
            params["data"] = DecodedBase64(pybase64.b64decode(view[start:end], validate=True))
    except ValueError:  # binascii.Error is one: let the plain path word the error
        return jsontext.loads(message)
    return obj
