"""The jobs table's search: `key=value` pairs select jobs by their metadata (a sweep, which
the table can then cancel); anything else is a job id or an adapter name."""

from __future__ import annotations

import pytest

from control_plane.dashboard.queries import metadata_selector


@pytest.mark.parametrize(
    ("search", "selector"),
    [
        ("sweep=lr-grid", {"sweep": "lr-grid"}),
        ("  sweep=lr-grid   lr=3e-4 ", {"sweep": "lr-grid", "lr": "3e-4"}),
        ("expr=a=b", {"expr": "a=b"}),  # the first '=' splits
        ("tag=", {"tag": ""}),  # an empty value is a value
    ],
)
def test_key_value_pairs_are_a_metadata_selector(search: str, selector: dict[str, str]) -> None:
    assert metadata_selector(search) == selector


@pytest.mark.parametrize(
    "search", [None, "", "   ", "ftjob-abc", "my-adapter", "sweep=x beta", "=x", "a=b =c"]
)
def test_anything_else_is_no_selector(search: str | None) -> None:
    assert metadata_selector(search) is None
