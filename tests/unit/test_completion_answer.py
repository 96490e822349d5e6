"""A text completion's answer (`workers.interactive.completion`), read off the tiny test base's
real tokenizer: its text, and OpenAI's legacy logprobs, one entry a token (special ones too, as
lm-evaluation-harness counts positions), the prompt's first with `echo`; a stop string's tokens
left out; `max_tokens` 0 answering the prompt alone."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive.chat import is_completion
from workers.interactive.completion import completion_answer, completion_prompt
from workers.interactive.losses import InteractiveError
from workers.interactive.sample_requests import read_sample_request

TOKENIZER = AutoTokenizer.from_pretrained(TEST_BASE_PATH)


def _asked(completion: dict[str, Any], stop: list[str] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"max_tokens": 8}
    if stop is not None:
        params["stop"] = stop
    return {"completion": completion, "num_samples": 1, "sampling_params": params}


def _answer(asked: dict[str, Any], tokens: list[int], stop_reason: str = "length") -> Any:
    request = completion_prompt(asked, TOKENIZER)
    parsed = read_sample_request(request, len(TOKENIZER), 1024, frozenset())
    top = asked["completion"].get("logprobs")
    sequence: dict[str, Any] = {
        "tokens": tokens,
        "logprobs": [-1.0 - k for k in range(len(tokens))],
        "stop_reason": stop_reason,
    }
    if top:
        sequence["topk_logprobs"] = [[(3, -0.5), (t, -1.0 - k)] for k, t in enumerate(tokens)]
    answer: dict[str, Any] = {"sequences": [sequence], "prompt_logprobs": None}
    if request.get("prompt_logprobs"):
        prompt = parsed.prompt
        answer["prompt_logprobs"] = [None] + [-2.0] * (len(prompt) - 1)
        if top:
            answer["topk_prompt_logprobs"] = [None] + [[(3, -0.5)]] * (len(prompt) - 1)
    return completion_answer(answer, parsed, TOKENIZER, asked)


def test_text_and_each_tokens_logprob_its_alternatives_and_its_offset() -> None:
    reply = TOKENIZER.encode(" blue and calm", add_special_tokens=False)
    asked = _asked({"text": "The sky is", "echo": False, "logprobs": 1, "max_tokens": 8})
    assert is_completion(asked)
    answer = _answer(asked, reply)
    [sequence] = answer["sequences"]
    assert sequence["text"] == " blue and calm" and sequence["finish_reason"] == "length"
    logprobs = sequence["logprobs"]
    assert logprobs["tokens"] == [TOKENIZER.decode([t]) for t in reply]
    assert logprobs["token_logprobs"] == [-1.0 - k for k in range(len(reply))]
    assert logprobs["text_offset"][0] == 0
    assert "".join(logprobs["tokens"]) == sequence["text"]
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        assert top == {TOKENIZER.decode([3]): -0.5, token: logprob}
    assert answer["prompt_tokens"] == len(TOKENIZER.encode("The sky is"))
    assert answer["completion_tokens"] == len(reply)


def test_echo_puts_every_prompt_token_first_and_max_tokens_0_answers_the_prompt_alone() -> None:
    """Token ids as lm-evaluation-harness sends them, an end of turn among them: every position
    has its entry (the first no logprob), so `token_logprobs[ctxlen:-1]` is the continuation."""
    end = TOKENIZER.convert_tokens_to_ids("<|im_end|>")
    prompt = [*TOKENIZER.encode("Hello", add_special_tokens=False), end, 42, 43]
    sampled = TOKENIZER.encode(" there", add_special_tokens=False)
    asked = _asked({"tokens": prompt, "echo": True, "logprobs": 1, "max_tokens": 1})
    [sequence] = _answer(asked, sampled[:1])["sequences"]
    logprobs = sequence["logprobs"]
    assert len(logprobs["tokens"]) == len(prompt) + 1
    assert logprobs["tokens"][len(prompt) - 3] == "<|im_end|>"
    assert logprobs["token_logprobs"] == [None] + [-2.0] * (len(prompt) - 1) + [-1.0]
    assert logprobs["top_logprobs"][0] is None
    assert sequence["text"] == TOKENIZER.decode(prompt) + TOKENIZER.decode(sampled[:1])

    scoring = _asked({"tokens": prompt, "echo": True, "logprobs": 0, "max_tokens": 0})
    answer = _answer(scoring, sampled[:1])
    [only] = answer["sequences"]
    assert only["text"] == TOKENIZER.decode(prompt) and only["finish_reason"] == "length"
    assert len(only["logprobs"]["tokens"]) == len(prompt)
    assert only["logprobs"]["top_logprobs"][1] == {TOKENIZER.decode([prompt[1]]): -2.0}
    assert answer["completion_tokens"] == 0

    text = _asked({"text": "Hi there", "echo": True, "logprobs": None, "max_tokens": 8})
    [plain] = _answer(text, sampled)["sequences"]
    assert plain["text"] == "Hi there" + TOKENIZER.decode(sampled) and "logprobs" not in plain


def test_a_stop_string_is_left_out_with_the_tokens_after_the_one_the_text_ends_in() -> None:
    reply = TOKENIZER.encode(" blue. And then", add_special_tokens=False)
    asked = _asked({"text": "The sky is", "logprobs": 0, "max_tokens": 8}, stop=[". A"])
    [sequence] = _answer(asked, reply, "stop")["sequences"]
    assert sequence["text"] == " blue" and sequence["finish_reason"] == "stop"
    tokens = sequence["logprobs"]["tokens"]
    joined = "".join(tokens)
    assert joined.startswith(" blue") and len(joined) - len(tokens[-1]) < len(" blue")


@pytest.mark.parametrize(
    "completion",
    [{"text": ""}, {"tokens": []}, {"tokens": "12"}, {"text": "x", "logprobs": True}],
    ids=["empty text", "no tokens", "tokens as text", "logprobs not a number"],
)
def test_a_prompt_with_nothing_to_complete_is_refused(completion: dict[str, Any]) -> None:
    with pytest.raises(InteractiveError):
        completion_prompt(_asked(completion), TOKENIZER)


def test_tokens_that_read_alike_share_a_key_at_the_likeliest_so_greedy_reads_true() -> None:
    """Bytes of a character each read U+FFFD alone: the top's key for them holds the likeliest,
    so the token's own logprob is the top's greatest exactly where it was its position's
    likeliest (lm-evaluation-harness's greedy check), never where a byte that reads the same
    was likelier; and U+0000 in an echoed prompt of token ids is no text (no JSON holds it)."""
    byte = {b: TOKENIZER.convert_tokens_to_ids(c) for b, c in ((0xE4, "ä"), (0xE5, "å"), (0, "Ā"))}
    assert TOKENIZER.decode([byte[0xE4]]) == TOKENIZER.decode([byte[0xE5]]) == "\ufffd"
    asked = _asked({"tokens": [5, byte[0], 6], "echo": True, "logprobs": 2, "max_tokens": 1})
    request = completion_prompt(asked, TOKENIZER)
    parsed = read_sample_request(request, len(TOKENIZER), 1024, frozenset())

    def top(token: int, logprob: float, alternatives: list[tuple[int, float]]) -> Any:
        sequence = {
            "tokens": [token],
            "logprobs": [logprob],
            "stop_reason": "length",
            "topk_logprobs": [alternatives],
        }
        answer = {"sequences": [sequence], "prompt_logprobs": [None, -1.0, -1.0]}
        answer["topk_prompt_logprobs"] = [None, [(7, -0.5)], [(7, -0.5)]]
        [read] = completion_answer(answer, parsed, TOKENIZER, asked)["sequences"]
        assert "\x00" not in read["text"]
        logprobs = read["logprobs"]
        return logprobs["token_logprobs"][-1], logprobs["top_logprobs"][-1]

    # The token a byte at -2.0, a byte that reads the same at -0.3 the likeliest: not greedy.
    own, tops = top(byte[0xE4], -2.0, [(byte[0xE5], -0.3), (byte[0xE4], -2.0)])
    assert tops == {"\ufffd": -0.3} and own != max(tops.values())
    # The same token the likeliest: greedy.
    own, tops = top(byte[0xE4], -0.3, [(byte[0xE4], -0.3), (byte[0xE5], -2.0)])
    assert tops == {"\ufffd": -0.3} and own == max(tops.values())
    # A plain token beside two bytes, one likelier than it: not greedy.
    own, tops = top(6, -1.0, [(byte[0xE5], -0.3), (6, -1.0), (byte[0xE4], -3.0)])
    assert own != max(tops.values()) and tops["\ufffd"] == -0.3
