"""The registry's name rules as the API documents them (JSON Schema patterns) and as the
registry applies them agree: a name the pattern admits is refused only for `..` or a
reserved word, and a name it does not admit is always refused."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from control_plane import registry
from control_plane.registry.names import is_number


def admits(shape: str, name: str) -> bool:
    """Whether a JSON Schema pattern `^...$` admits `name` (ECMA-262: `$` is the end of the
    text, where Python's would also match before a final newline)."""
    return re.fullmatch(shape.removeprefix("^").removesuffix("$"), name) is not None


def accepts(check: Callable[[str], str], name: str) -> bool:
    """Whether the registry's `check` takes `name`."""
    try:
        check(name)
    except registry.InvalidNameError:
        return False
    return True


NAME_CHARACTERS = st.text(
    st.sampled_from("abcXYZ019._-/\\@é \n\x00\x1f\x85"), min_size=0, max_size=140
)


@given(NAME_CHARACTERS)
@example("a" * 128)
@example("a" * 129)
@example("index")
@example("a..b")
def test_the_documented_adapter_name_pattern_is_the_registry_rule(name: str) -> None:
    exception = ".." in name or name in registry.RESERVED_ADAPTER_NAMES
    documented = admits(registry.NAME_SHAPE, name) and not exception
    assert accepts(registry.validate_adapter_name, name) == documented


@given(NAME_CHARACTERS)
@example("a" * 64)
@example("a" * 65)
@example("latest")
@example("0042")
def test_the_documented_alias_pattern_is_the_registry_rule(alias: str) -> None:
    exception = ".." in alias or alias == registry.LATEST or is_number(alias)
    documented = admits(registry.ALIAS_SHAPE, alias) and not exception
    assert accepts(registry.validate_alias_name, alias) == documented


@pytest.mark.parametrize("shape", [registry.NAME_SHAPE, registry.ALIAS_SHAPE])
def test_the_patterns_are_anchored(shape: str) -> None:
    assert shape.startswith("^") and shape.endswith("$")
