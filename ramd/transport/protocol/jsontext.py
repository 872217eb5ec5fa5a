"""Strict parsing of one JSON text, shared by both dialects.

Python's ``json`` accepts ``NaN``, ``Infinity`` and numbers that overflow to infinity; none of
them is JSON, and an ``id`` holding one could not be echoed back as valid JSON. They are parse
errors here (``ValueError``), like malformed text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range '{text}'")
    return value


#: One decoder for every message (``json.loads`` with options builds one per call).
_decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_decode = _decoder.decode
#: Its scanner: one value starting at an index, and the index after it (an attribute of
#: every decoder, set by its constructor; not in the type stubs).
_scan: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def loads(message: bytes | bytearray) -> Any:
    """One JSON text (UTF-8, as the protocol says) as Python data, strictly. Every failure is
    a ``ValueError`` whose text describes the input, never the interpreter (an integer past
    Python's 4,300-digit conversion limit is reported as such; converting it would cost
    quadratic time; bytes that are not UTF-8 are reported as such, not guessed to be UTF-16
    or UTF-32 as ``json.loads`` would)."""
    try:
        text = message.decode("utf-8")
        try:
            value, end = _scan(text, 0)
        except StopIteration:
            end = -1
        # The splitter hands over texts without surrounding whitespace, so one scan is the
        # whole decode; anything else (an error, trailing bytes) gets decode's exact words.
        return value if end == len(text) else _decode(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError("nesting too deep") from None
    except ValueError as e:
        if "integer string conversion" in str(e):
            raise ValueError("integer with too many digits") from None
        raise
