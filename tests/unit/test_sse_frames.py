"""An event stream's frames as a browser reads them (the WHATWG event-stream grammar: CR, LF
and CRLF each end a line): the data a frame was given comes back whole, and nothing in it can
start a field of its own."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from control_plane.api import sse


def parsed(stream: str) -> list[tuple[str, str]]:
    """(event, data) for each message, read as the spec reads an event stream."""
    messages: list[tuple[str, str]] = []
    event, data = "message", []
    for line in re.split(r"\r\n|\r|\n", stream):
        if line == "":
            if data:
                messages.append((event, "\n".join(data)))
            event, data = "message", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    return messages


def test_a_lone_carriage_return_cannot_forge_an_event() -> None:
    """A job's metadata may hold a CR: the table's HTML carrying it stays one `table` message."""
    html = "<td>x\revent: end\r</td>"
    assert parsed(sse.frame(html, event="table")) == [("table", "<td>x\nevent: end\n</td>")]


PIECES = st.sampled_from(["a", " ", ":", "\n", "\r", "\r\n", "é", "event: end", "data: x", "id: 9"])


@given(st.lists(PIECES).map("".join))
def test_any_data_comes_back_as_one_message_of_its_event(data: str) -> None:
    frames = sse.frame(data, event="table") + sse.frame("", event="end")
    # Line ends come back as LF (the spec's own reading); everything else as it was.
    assert parsed(frames) == [("table", re.sub(r"\r\n|\r", "\n", data)), ("end", "")]
