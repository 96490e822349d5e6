"""The commands the chart gives the loraforge image are commands the `loraforge` CLI has."""

from __future__ import annotations

import argparse
import shlex

import pytest

from loraforge.cli import build_parser
from loraforge.serve_cli import celery_argv
from tests.chart.rendering import VALUE_SETS, containers, pod_templates, rendered

pytestmark = pytest.mark.chart


def _loraforge_commands() -> set[tuple[str, ...]]:
    """Every argument list the chart passes to the image's `loraforge` entrypoint (the KubeRay
    workers' shell line included)."""
    commands = set()
    for name in VALUE_SETS:
        for obj in rendered(name):
            for _, template in pod_templates(obj):
                for container in containers(template["spec"]):
                    if "/loraforge:" not in container["image"]:
                        continue
                    if "command" not in container:
                        commands.add(tuple(container["args"]))
                    elif "exec loraforge " in container["args"][0]:
                        tail = container["args"][0].split("exec loraforge ", 1)[1]
                        commands.add(tuple(shlex.split(tail)))
    return commands


def test_the_chart_runs_every_part_of_the_platform_through_the_cli() -> None:
    first_words = {" ".join(c[:2]) if c[0] == "celery" else c[0] for c in _loraforge_commands()}
    assert first_words == {
        "api",
        "worker",
        "celery worker",
        "celery beat",
        "migrate",
        "operator",
        "interactive",
    }


@pytest.mark.parametrize("command", sorted(_loraforge_commands()), ids=" ".join)
def test_each_chart_command_parses_with_the_loraforge_cli(command: tuple[str, ...]) -> None:
    parser = build_parser()
    (subcommands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    # A missing command fails here rather than as argparse's SystemExit.
    assert command[0] in subcommands.choices, f"`loraforge {command[0]}` is not a CLI command"
    args = parser.parse_args(list(command))
    assert callable(args.func)
    if command[0] == "celery":
        argv = celery_argv(args.celery_args)
        assert argv[1:5] == ["-m", "celery", "-A", "loraforge.tasks:celery_app"]
        assert argv[5:] == list(command[1:])
