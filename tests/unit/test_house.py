"""The house's rules, checked: which way imports run, what the public package offers, and the
size a module may reach without saying why (docs/architecture.md)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("control_plane", "workers", "loraforge", "operators")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports_with(
    tmp_path: Path, package: str, module: str, source: str
) -> subprocess.CompletedProcess[str]:
    """Run the repository's contracts over a copy of the tree where `package` gained `module`."""
    for name in PACKAGES:
        if name == package:
            shutil.copytree(
                ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            (tmp_path / name).symlink_to(ROOT / name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / package / f"{module.replace('.', '/')}.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", "pyproject.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_contracts_hold_on_the_tree_as_it_is(tmp_path: Path) -> None:
    result = _lint_imports_with(tmp_path, "control_plane", "harmless", "import json\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("package", "source", "contract", "module"),
    [
        ("control_plane", "import workers.runner\n", "never the reverse", "layer_probe"),
        ("control_plane", "from loraforge import cli\n", "never the reverse", "layer_probe"),
        ("control_plane", "import torch\n", "never imports training libraries", "layer_probe"),
        ("workers", "import loraforge.tasks\n", "never the reverse", "layer_probe"),
        ("operators", "import control_plane.queue\n", "public client only", "layer_probe"),
        ("workers", "import workers.runner\n", "kernels | bases", "training.layer_probe"),
    ],
)
def test_an_import_against_the_layers_breaks_a_contract(
    tmp_path: Path, package: str, source: str, contract: str, module: str
) -> None:
    result = _lint_imports_with(tmp_path, package, module, source)
    assert result.returncode != 0, result.stdout
    report = " ".join(result.stdout.split())  # its table wraps long contract names
    assert f"{contract} BROKEN" in report, result.stdout
    assert f"{package}.{module}" in result.stdout


def test_the_public_package_offers_the_client_and_the_old_path_is_gone() -> None:
    from loraforge import Client
    from loraforge.client import Client as ClientFromModule

    assert Client is ClientFromModule
    with pytest.raises(ModuleNotFoundError):
        __import__("control_plane.client")


def test_the_command_line_lists_the_platforms_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loraforge.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    first = result.stdout.split("{", 1)[1].split("}", 1)[0]
    assert set(first.split(",")) == {
        "up",
        "demo",
        "worker",
        "base",
        "pull",
        "registry",
        "queue",
        "operator",
        "api",
        "celery",
        "interactive",
        "migrate",
        "admin",
    }


def _modules() -> list[Path]:
    return sorted(p for name in PACKAGES for p in (ROOT / name).rglob("*.py"))


def test_a_module_over_450_lines_says_why_at_its_top() -> None:
    unexplained = []
    for path in _modules():
        lines = path.read_text().count("\n")
        if lines <= 450:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if "450 lines" not in doc:
            unexplained.append(f"{path.relative_to(ROOT)} ({lines} lines)")
    assert not unexplained, (
        "longer than ~450 lines without a reason in the docstring: " + ", ".join(unexplained)
    )
