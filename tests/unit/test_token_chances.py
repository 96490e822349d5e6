"""The Try it box's token shading (`render`'s `chance`, `likeliness`, `visible` filters): a
token's logprob as the chance the model gave it, its band at each edge, and its whitespace
shown; rendered through the box's own template, escaped."""

from __future__ import annotations

import math

import pytest

from control_plane.api.routes.chat_models import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionMessage,
    ChatUsage,
    ChoiceLogprobs,
)
from control_plane.dashboard.render import environment, render
from control_plane.dashboard.routes.adapter_try import Answer


@pytest.mark.parametrize(
    ("chance", "band", "shown"),
    [
        (1.0, "likely", "100.0%"),
        (0.9, "likely", "90.0%"),
        (0.8999, "plausible", "89.9%"),  # down, as its band
        (0.5, "plausible", "50.0%"),
        (0.49, "doubtful", "49.0%"),
        (0.2, "doubtful", "20.0%"),
        (0.19, "unlikely", "19.0%"),
        (0.0005, "unlikely", "<0.1%"),
    ],
)
def test_a_tokens_chance_and_band(chance: float, band: str, shown: str) -> None:
    filters = environment().filters
    assert filters["likeliness"](math.log(chance)) == band
    assert filters["chance"](math.log(chance)) == shown


def test_the_box_shows_each_token_with_its_chance_and_the_likeliest_in_its_place() -> None:
    logprobs = ChoiceLogprobs.model_validate(
        {
            "content": [
                {
                    "token": " <b>",
                    "logprob": math.log(0.95),
                    "bytes": list(b" <b>"),
                    "top_logprobs": [
                        {"token": " <b>", "logprob": math.log(0.95), "bytes": None},
                        {"token": "\n", "logprob": math.log(0.03), "bytes": None},
                    ],
                },
                {"token": "\n", "logprob": math.log(0.3), "bytes": [10], "top_logprobs": []},
            ],
            "refusal": None,
        }
    )
    choice = ChatChoice(
        index=0,
        message=ChatCompletionMessage(content=" <b>\n"),
        finish_reason="length",
        logprobs=logprobs,
    )
    completion = ChatCompletion(
        id="chatcmpl-1",
        created=0,
        model="bot@1",
        choices=[choice],
        usage=ChatUsage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
    )
    html = render("_try_answer.html", a=Answer("adapter", "bot@1", completion=completion))
    assert (
        '<span class="token likely" tabindex="0" data-logprob="-0.05129329438755058" '
        'aria-label="·&lt;b&gt;: 95.0%, likely" '
        'title="·&lt;b&gt;: 95.0% · likeliest: ·&lt;b&gt; 95.0%, ↵ 3.0%">·&lt;b&gt;</span>'
    ) in html
    assert 'aria-label="↵: 30.0%, doubtful" title="↵: 30.0%">↵</span>' in html
    assert "<b>" not in html


def test_a_token_that_adds_no_text_and_unseen_whitespace_are_shown() -> None:
    visible = environment().filters["visible"]
    assert visible("") == "◌"  # part of a character the next tokens finish
    assert visible("a b\u00a0c\r\n\t") == "a·b·c␍↵→"


def test_a_streamed_sides_entries_are_every_chunks_in_order_or_none() -> None:
    """A side followed through the API's stream (`_Reply`): its reply's entries are those of
    every chunk that carried some, in order; where one chunk's do not validate, none are shown
    (a reply with some of its tokens' entries would shade the wrong tokens), the text still is."""
    from control_plane.dashboard.routes.adapter_try import _Reply

    def chunk(content: str, tokens: list[str] | None, finish: str | None = None) -> dict:
        entries = [
            {"token": t, "logprob": -0.1, "bytes": None, "top_logprobs": []} for t in tokens or []
        ]
        logprobs = None if tokens is None else {"content": entries, "refusal": None}
        choice = {
            "index": 0,
            "delta": {"content": content},
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        return {"id": "chatcmpl-1", "choices": [choice]}

    usage = {
        "id": "chatcmpl-1",
        "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
    }
    reply = _Reply(Answer("adapter", "bot@1", sampling=True))
    for piece in (
        chunk("", None),
        chunk("Hel", ["He", "l"]),
        chunk("lo", ["lo"]),
        chunk("", None, "stop"),
        usage,
    ):
        reply.read(piece)
    completion = reply.ended().completion
    assert completion is not None and completion.choices[0].message.content == "Hello"
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and [e.token for e in logprobs.content or []] == ["He", "l", "lo"]

    broken = _Reply(Answer("adapter", "bot@1", sampling=True))
    unreadable = chunk("lo", ["lo"])
    unreadable["choices"][0]["logprobs"]["content"][0]["logprob"] = "very likely"
    for piece in (
        chunk("Hel", ["He", "l"]),
        unreadable,
        chunk("!", ["!"]),
        chunk("", None, "stop"),
        usage,
    ):
        broken.read(piece)
    completion = broken.ended().completion
    assert completion is not None and completion.choices[0].message.content == "Hello!"
    assert completion.choices[0].logprobs is None
