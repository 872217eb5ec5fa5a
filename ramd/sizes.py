"""Byte sizes with QEMU suffixes: the one parser shared by config, daemon CLI and client CLI.

Grammar (the same as QEMU's ``qemu_strtosz``): ``DIGITS [ "." [DIGITS] ] [SUFFIX]`` where
``SUFFIX`` is one letter, case-insensitive: ``B`` (bytes), ``K``, ``M``, ``G``, ``T``, ``P``
or ``E`` (powers of 1024). No suffix means bytes. Surrounding whitespace is ignored; nothing
else is accepted (no sign, no exponent, no space before the suffix, no ``MB``/``MiB``).

Invariants of :func:`parse_size`:

- the result is an exact ``int`` in ``[0, SIZE_MAX]``: decimals are computed in integer
  arithmetic, never through ``float``, so ``"1.5K"`` is exactly 1536;
- a fraction without a multiplying suffix (``"0.5"``, ``"1.3B"``) is refused; with one, a
  fraction of a byte is dropped as QEMU does (``"0.3G"`` is 322122547, ``"0.1K"`` is 102);
- every refusal is a :class:`ValueError` whose message quotes the input, so a caller (config
  loader, argparse ``type=``) only ever has one exception type to catch.
"""

from __future__ import annotations

import re

__all__ = ["SIZE_MAX", "format_size", "parse_size"]

SIZE_MAX = 2**64 - 1
"""The largest size accepted: QEMU's sizes are ``uint64_t``."""

_SHIFTS = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}

_SIZE_RE = re.compile(r"([0-9]+)(?:\.([0-9]*))?([BKMGTPE]?)", re.ASCII | re.IGNORECASE)

_SYNTAX_HINT = "expected a number with an optional K, M, G, T, P or E suffix"

# Fraction digits past the 60th cannot change a truncated result; dropping them keeps the
# integer arithmetic small and far from Python's int-from-str digit limit.
_MAX_FRACTION_DIGITS = 60
_MAX_INTEGER_DIGITS = len(str(SIZE_MAX))


def parse_size(text: str | int) -> int:
    """Return the number of bytes that ``text`` denotes.

    ``text`` is either an ``int`` (returned unchanged when in ``[0, SIZE_MAX]``; ``bool`` is
    refused although it is an ``int`` subclass) or a string in the module's grammar, e.g.
    ``"4096"``, ``"64M"``, ``"1.5g"``, ``"512B"``.

    Raises :class:`ValueError` for any other type or value: negative, empty, malformed,
    ``nan``/``inf``, not a whole number of bytes, or larger than :data:`SIZE_MAX`.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"invalid size {text!r}: expected an integer or a string")
    if isinstance(text, int):
        return _check_range(text, text)

    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"invalid size {text!r}: a size cannot be negative")
    match = _SIZE_RE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"invalid size {text!r}: {_SYNTAX_HINT}")

    integer_digits = match.group(1).lstrip("0")
    fraction_digits = (match.group(2) or "").rstrip("0")
    shift = _SHIFTS[match.group(3).upper() or "B"]

    if len(integer_digits) > _MAX_INTEGER_DIGITS:
        raise ValueError(f"invalid size {text!r}: larger than the maximum of {SIZE_MAX} bytes")
    if fraction_digits and shift == 0:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    # As qemu_strtosz: with a suffix, a fraction of a byte is dropped ("0.3G" = 322122547).
    # Digits past the 60th cannot change the result (2**60 < 10**19).
    fraction_digits = fraction_digits[:_MAX_FRACTION_DIGITS]
    scale = 10 ** len(fraction_digits)
    numerator = int(integer_digits + fraction_digits or "0") << shift
    return _check_range(numerator // scale, text)


def _check_range(value: int, text: str | int) -> int:
    """Return ``value`` if it is in ``[0, SIZE_MAX]``, else raise ``ValueError`` about ``text``."""
    if value < 0:
        raise ValueError(f"invalid size {text!r}: a size cannot be negative")
    if value > SIZE_MAX:
        raise ValueError(f"invalid size {text!r}: larger than the maximum of {SIZE_MAX} bytes")
    return value


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: int) -> str:
    """Render ``n`` bytes for humans: ``"0 B"``, ``"1023 B"``, ``"4 KiB"``, ``"1.5 GiB"``.

    The unit is the largest power of 1024 not above ``n``; the number has at most one
    decimal, rounded half up, and a trailing ``.0`` is dropped. A value that rounds up to
    1024 of a unit is shown in the next unit (``"1 MiB"``, never ``"1024 KiB"``). The output is
    for display only: it is not meant to be parsed back (``parse_size`` takes ``K``, not ``KiB``).

    Raises :class:`ValueError` when ``n`` is negative or not an ``int`` (``bool`` included).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"invalid size {n!r}: expected an integer")
    if n < 0:
        raise ValueError(f"invalid size {n!r}: a size cannot be negative")

    index = 0
    while index + 1 < len(_UNITS) and n >= 1 << (10 * (index + 1)):
        index += 1
    tenths = _round_tenths(n, index)
    if tenths >= 10240 and index + 1 < len(_UNITS):
        index += 1
        tenths = _round_tenths(n, index)

    whole, decimal = divmod(tenths, 10)
    number = str(whole) if decimal == 0 else f"{whole}.{decimal}"
    return f"{number} {_UNITS[index]}"


def _round_tenths(n: int, index: int) -> int:
    """Return ``n / 1024**index`` in tenths, rounded half up, in exact integer arithmetic."""
    unit = 1 << (10 * index)
    return (n * 20 + unit) // (2 * unit)
