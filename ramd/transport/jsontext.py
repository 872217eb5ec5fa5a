"""Strict parsing of one JSON text, shared by both dialects.

Python's ``json`` accepts ``NaN``, ``Infinity`` and numbers that overflow to infinity; none of
them is JSON, and an ``id`` holding one could not be echoed back as valid JSON. They are parse
errors here (``ValueError``), like malformed text; ``RecursionError`` passes through for the
caller to word.
"""

from __future__ import annotations

import json
import math
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range '{text}'")
    return value


def loads(message: bytes) -> Any:
    """One JSON text as Python data, strictly."""
    return json.loads(message, parse_constant=_reject_constant, parse_float=_finite_float)
