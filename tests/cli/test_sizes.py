"""Sizes on the command line: binary units or bytes, and nothing that has to be guessed."""

import pytest

from volkin.cli.sizes import format_size, parse_rate, parse_size
from volkin.errors import InvalidArgument


@pytest.mark.parametrize(("text", "expected"), [
    ("65536", 65536),
    ("0", 0),
    ("512B", 512),
    ("64KiB", 64 << 10),
    ("64MiB", 64 << 20),
    ("1GiB", 1 << 30),
    ("2TiB", 2 << 40),
    ("1PiB", 1 << 50),
    ("64mib", 64 << 20),
    (" 16 MiB ", 16 << 20),
])
def test_binary_units_and_plain_bytes_are_accepted(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["64MB", "1G", "10k", "5TB", "1PB"])
def test_decimal_units_are_refused_as_ambiguous(text: str) -> None:
    with pytest.raises(InvalidArgument, match="ambiguous"):
        parse_size(text)


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.5GiB", "64 Mi B", "0x10", "ten"])
def test_junk_is_not_a_size(text: str) -> None:
    with pytest.raises(InvalidArgument, match="is not a size"):
        parse_size(text)


def test_an_unknown_unit_is_named() -> None:
    with pytest.raises(InvalidArgument, match="unknown unit 'EiB'"):
        parse_size("1EiB")


def test_the_message_names_the_setting() -> None:
    with pytest.raises(InvalidArgument, match=r"^block size"):
        parse_size("x", "block size")


def test_a_rate_may_end_in_per_second() -> None:
    assert parse_rate("16MiB/s") == parse_rate("16MiB") == 16 << 20
    with pytest.raises(InvalidArgument, match=r"^rate"):
        parse_rate("fast")


@pytest.mark.parametrize(("n", "text"), [
    (0, "0B"), (512, "512B"), (65536, "64KiB"), (64 << 20, "64MiB"), (3 << 29, "1.5GiB"),
    (1 << 40, "1TiB"),
])
def test_format_size_uses_the_largest_exact_unit(n: int, text: str) -> None:
    assert format_size(n) == text


def test_formatted_whole_sizes_parse_back() -> None:
    for n in (1, 4096, 65536, 7 << 20, 1 << 30, 3 << 40):
        assert parse_size(format_size(n)) == n
