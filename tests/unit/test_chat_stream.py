"""What a streamed chat sends of each text the executor writes (`chat_stream._deltas`): only
what is new past what was sent; a text written again from its start is waited past; a text
that contradicts what was sent, or a whole answer that does not begin with it, ends the
stream."""

from __future__ import annotations

import pytest

from control_plane.api.routes.chat_stream import _deltas, _Resampled


def _contents(deltas: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(d["index"], d["delta"]) for d in deltas]


def test_only_what_is_new_is_sent_each_choice_its_own() -> None:
    sent = ["", ""]
    assert _contents(_deltas(sent, ["Hel", ""])) == [(0, {"content": "Hel"})]
    assert _contents(_deltas(sent, ["Hello", "Yes"])) == [
        (0, {"content": "lo"}),
        (1, {"content": "Yes"}),
    ]
    assert _deltas(sent, ["Hello", "Yes"]) == []  # nothing new, nothing sent
    assert sent == ["Hello", "Yes"]


def test_a_text_written_again_from_its_start_is_waited_past() -> None:
    sent = ["Hello wor"]
    assert _deltas(sent, ["H"]) == [] and _deltas(sent, ["Hello wo"]) == []
    assert sent == ["Hello wor"]
    assert _contents(_deltas(sent, ["Hello world"], whole=True)) == [(0, {"content": "ld"})]


@pytest.mark.parametrize(
    ("sent", "text", "whole"),
    [("abc", "xyz", False), ("Hello", "Help", False), ("Hello wor", "Hel", True)],
    ids=["other text", "a changed ending", "a whole answer shorter than what was sent"],
)
def test_text_that_contradicts_what_was_sent_ends_the_stream(
    sent: str, text: str, whole: bool
) -> None:
    with pytest.raises(_Resampled):
        _deltas([sent], [text], whole=whole)
