"""The shared size parser (QEMU suffixes, exact decimals) and the human size formatter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramd.sizes import SIZE_MAX, format_size, parse_size

KiB, MiB, GiB, TiB, PiB, EiB = (1 << s for s in (10, 20, 30, 40, 50, 60))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("007", 7),
        ("1B", 1),
        ("512b", 512),
        ("1K", KiB),
        ("1k", KiB),
        ("64M", 64 * MiB),
        ("64m", 64 * MiB),
        ("2G", 2 * GiB),
        ("1T", TiB),
        ("3P", 3 * PiB),
        ("15E", 15 * EiB),
        ("1.5K", 1536),
        ("1.5G", 3 * GiB // 2),
        ("0.5K", 512),
        ("1.K", KiB),
        ("1.000K", KiB),
        ("1.0", 1),
        ("1.0B", 1),
        ("0.25M", 256 * KiB),
        ("0.0009765625K", 1),
        (" 8M\n", 8 * MiB),
        ("18446744073709551615", SIZE_MAX),
        ("15.999999999999999999132638262011596452794037759304046630859375E", SIZE_MAX),
    ],
)
def test_parses_numbers_with_qemu_suffixes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("value", [0, 1, 4096, SIZE_MAX])
def test_ints_pass_through(value: int) -> None:
    assert parse_size(value) == value


@pytest.mark.parametrize(
    "text",
    ["12Q", "", "   ", "K", ".5K", "1..5K", "1 K", "64MB", "64MiB", "1KB", "0x10", "1e3",
     "1E3", "+1", "1_000", "nan", "inf", "NaN", "Infinity", "١٢", "1.5.K", "K1", "1,5K"],
)  # fmt: skip
def test_rejects_malformed_text_with_a_clear_message(text: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_size(text)
    assert str(excinfo.value) == (
        f"invalid size {text!r}: expected a number with an optional K, M, G, T, P or E suffix"
    )


@pytest.mark.parametrize("text", ["0.5", "1.3B", "1.5", "1.0000001"])
def test_rejects_fractions_without_a_multiplying_suffix(text: str) -> None:
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.3G", 322122547), ("2.3G", 2469606195), ("1.1K", 1126), ("0.1K", 102),
     ("0." + "0" * 70 + "1K", 0), ("1.0B", 1), ("2.", 2)],
)  # fmt: skip
def test_fractions_of_a_byte_are_dropped_as_qemu_does(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("value", ["-1", "-1K", " -0.5G", -1, -(2**70)])
def test_rejects_negative_sizes(value: str | int) -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_size(value)


@pytest.mark.parametrize(
    "value", ["16E", "16384P", "18446744073709551616", "9" * 5000, "1" + "0" * 20 + "K", 2**64]
)
def test_rejects_sizes_beyond_64_bits(value: str | int) -> None:
    with pytest.raises(ValueError, match="larger than the maximum"):
        parse_size(value)


@pytest.mark.parametrize("value", [True, False, 1.5, 1024.0, None, b"1K", [1]])
def test_rejects_other_types_including_bool(value: object) -> None:
    with pytest.raises(ValueError, match="expected an integer or a string"):
        parse_size(value)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=SIZE_MAX))
def test_decimal_text_round_trips(n: int) -> None:
    assert parse_size(str(n)) == n


@given(st.integers(min_value=0, max_value=2**20), st.sampled_from("bBkKmMgGtTpPeE"))
def test_suffix_multiplies_by_a_power_of_1024(n: int, suffix: str) -> None:
    shift = 10 * "BKMGTPE".index(suffix.upper())
    expected = n << shift
    if expected > SIZE_MAX:
        with pytest.raises(ValueError):
            parse_size(f"{n}{suffix}")
    else:
        assert parse_size(f"{n}{suffix}") == expected


@given(st.integers(min_value=0, max_value=(1 << 34) - 1), st.integers(min_value=1, max_value=4))
def test_decimals_are_exact(n: int, digits: int) -> None:
    """``X.YYG`` is ``X.YY * 2**30`` exactly, a fraction of a byte dropped (never rounded)."""
    scale = 10**digits
    text = f"{n // scale}.{n % scale:0{digits}d}G"
    assert parse_size(text) == n * GiB // scale


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (KiB, "1 KiB"),
        (4 * KiB, "4 KiB"),
        (1536, "1.5 KiB"),
        (1126, "1.1 KiB"),
        (1075, "1 KiB"),  # 1.0498 KiB: rounds to 1.0, shown without ".0"
        (1076, "1.1 KiB"),  # 1.0508 KiB: half up
        (64 * MiB, "64 MiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (TiB, "1 TiB"),
        (MiB - 1, "1 MiB"),  # 1023.999 KiB would round to "1024 KiB"
        (PiB, "1 PiB"),
        (EiB, "1 EiB"),
        (SIZE_MAX, "16 EiB"),
        (2**70, "1024 EiB"),
    ],
)
def test_formats_for_humans(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize("value", [-1, True, 1.0, "1K"])
def test_format_rejects_non_sizes(value: object) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        format_size(value)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=SIZE_MAX))
def test_format_has_at_most_one_decimal_and_a_binary_unit(n: int) -> None:
    number, unit = format_size(n).split(" ")
    assert unit in {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
    assert not number.endswith(".0")
    whole, _, decimal = number.partition(".")
    assert len(decimal) <= 1
    assert 1 <= int(whole) < 1024 or (n == 0 and number == "0") or unit == "EiB"
    if unit == "B":
        assert number == str(n)
