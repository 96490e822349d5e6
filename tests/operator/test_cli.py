"""`loraforge operator` is wired into the CLI with its namespace options."""

from __future__ import annotations

import pytest

from loraforge.cli import build_parser
from loraforge.operator_cli import run_operator

pytestmark = pytest.mark.operator


def test_loraforge_operator_parses_namespaces_and_periods() -> None:
    args = build_parser().parse_args(
        ["operator", "-n", "serving", "-n", "team-*", "--sync-seconds", "5"]
    )
    assert args.func is run_operator
    assert args.namespace == ["serving", "team-*"] and args.sync_seconds == 5
    assert build_parser().parse_args(["operator"]).namespace == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "-n", "a", "-A"])
