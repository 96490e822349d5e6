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
