"""Sizes as the operator writes a checkpoint cap and as pages show it: decimal units, read back
exactly."""

from __future__ import annotations

import pytest

from control_plane.sizes import exact_size, human_size, parse_size


@pytest.mark.parametrize(
    ("written", "size"),
    [
        ("20000000000", 20 * 10**9),
        ("20G", 20 * 10**9),
        ("20 GB", 20 * 10**9),
        (" 20gb ", 20 * 10**9),
        ("500M", 500 * 10**6),
        ("1.5T", 15 * 10**11),
        ("64K", 64_000),
        ("7B", 7),
        ("1", 1),
    ],
)
def test_a_size_is_read_in_plain_bytes_or_decimal_units(written: str, size: int) -> None:
    assert parse_size(written) == size


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("", "is not a size"),
        ("G", "is not a size"),
        ("20X", "is not a size"),
        ("-5", "is not a size"),
        ("20 GiB", "is not a size"),
        ("1e9", "is not a size"),
        ("0.5", "is not a whole number of bytes"),
        ("1.0000000005G", "is not a whole number of bytes"),
    ],
)
def test_what_is_not_a_whole_size_is_refused_saying_what_is_taken(written: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_size(written)


@pytest.mark.parametrize("size", [1, 999, 1000, 20 * 10**9, 15 * 10**11, 1_234_567, 10**18])
def test_a_size_written_for_a_form_reads_back_the_same(size: int) -> None:
    assert parse_size(exact_size(size)) == size


def test_a_size_written_for_a_form_takes_the_largest_unit_that_divides_it() -> None:
    assert [exact_size(s) for s in (20 * 10**9, 15 * 10**11, 64_000, 1_234_567)] == [
        "20G",
        "1500G",
        "64K",
        "1234567",
    ]


def test_a_size_to_read_has_three_figures_or_fewer_in_the_largest_unit_it_reaches() -> None:
    shown = [human_size(s) for s in (0, 512, 1000, 1_234_567, 20 * 10**9, 123_456_789, 10**15)]
    assert shown == ["0 B", "512 B", "1 KB", "1.23 MB", "20 GB", "123 MB", "1,000 TB"]
