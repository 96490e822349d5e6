"""A streamed completion's legacy `logprobs` while it samples (`completion.GrowingLegacy`), read
off real tokenizers (the tiny test base's byte-level BPE, and a SentencePiece tokenizer with byte
fallback): after every token of random replies (special tokens among them, stop strings,
characters split across tokens and one never finished), what it gives is always the first of the
entries the whole completion answers (`completion_answer`), exactly, with `echo` the prompt's
first; a reply of plain words gives each token's entry within two tokens of sampling it."""

from __future__ import annotations

import random
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from control_plane import legacy_logprobs
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.unit.test_chat_content_logprobs import _sentencepiece
from workers.interactive.chat import chat_text_so_far
from workers.interactive.completion import GrowingLegacy, completion_answer, prompt_rows
from workers.interactive.sample_requests import SamplingRequest, read_sample_request

PROMPT = [5, 6, 7]


def _request(stop: list[str] | None, echo: bool, max_tokens: int = 64) -> dict[str, Any]:
    return {
        "completion": {"tokens": PROMPT, "echo": echo, "logprobs": 2, "max_tokens": max_tokens},
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
        "sampling_params": {} if stop is None else {"stop": stop},
    }


def _parsed(tokenizer: PreTrainedTokenizerBase, request: dict[str, Any]) -> SamplingRequest:
    return read_sample_request(
        {key: request[key] for key in ("prompt", "sampling_params")},
        len(tokenizer),
        256,
        frozenset([tokenizer.eos_token_id]),
    )


def _scores() -> dict[str, Any]:
    """The prompt's scores, as a sample asked `prompt_logprobs` and their top 2 gives them."""
    logprobs = [None, *(-0.25 - k for k in range(len(PROMPT) - 1))]
    tops = [None, *([(t, lp), (3, lp - 1)] for t, lp in zip(PROMPT[1:], logprobs[1:], strict=True))]
    return {"prompt_logprobs": logprobs, "topk_prompt_logprobs": tops}


def _sequence(tokens: list[int]) -> dict[str, Any]:
    logprobs = [-0.5 - k for k in range(len(tokens))]
    return {
        "tokens": tokens,
        "logprobs": logprobs,
        "stop_reason": "stop",
        "topk_logprobs": [[(t, lp), (3, lp - 1)] for t, lp in zip(tokens, logprobs, strict=True)],
    }


def _growing_reads(
    tokens: list[int], tokenizer: PreTrainedTokenizerBase, stop: list[str] | None, echo: bool
) -> list[list[dict[str, Any]]]:
    """What `GrowingLegacy` gives after each token of a reply, each checked against the whole
    completion's entries."""
    request = _request(stop, echo)
    parsed = _parsed(tokenizer, request)
    sequence = _sequence(tokens)
    answer = {"type": "sample", "sequences": [sequence], **_scores()}
    [whole] = completion_answer(answer, parsed, tokenizer, request)["sequences"]
    final = legacy_logprobs.entries(whole["logprobs"])
    assert legacy_logprobs.arrays(final) == whole["logprobs"]
    growing = GrowingLegacy(tokenizer, prompt_rows(_scores(), PROMPT) if echo else [])
    reads = []
    for length in range(1, len(tokens) + 1):
        so_far = {key: value[:length] for key, value in sequence.items() if key != "stop_reason"}
        sure = chat_text_so_far(tokens[:length], parsed, tokenizer)
        given = growing.read(so_far, len(sure))
        assert given == final[: len(given)], (tokens, length)
        if echo:
            assert len(given) >= len(PROMPT) and given[0]["logprob"] is None
        reads.append(given)
    return reads


@pytest.mark.parametrize("echo", [False, True], ids=["sampled", "echoed"])
def test_a_streamed_completions_entries_so_far_are_always_the_whole_answers_first(
    echo: bool,
) -> None:
    alphabet = ["你", "好", "😀", "é", " ", "a", "\n", "!", "Hello", " world", "🙂", " .", "END"]
    generator = random.Random(13)
    for tokenizer in (AutoTokenizer.from_pretrained(TEST_BASE_PATH), _sentencepiece()):
        pieces = ["ð", "Ł"] if tokenizer.unk_token_id is None else ["<0xF0>", "<0x9F>"]
        dangling = tokenizer.convert_tokens_to_ids(pieces)
        special = [t for t in tokenizer.all_special_ids if t is not None]
        assert special
        for _ in range(80):
            reply = "".join(generator.choice(alphabet) for _ in range(generator.randint(1, 14)))
            tokens = tokenizer.encode(reply, add_special_tokens=False)
            if generator.random() < 0.3:
                k = generator.randint(0, len(tokens))
                tokens[k:k] = dangling
            if generator.random() < 0.4:  # a special token: an entry of its own, with no text
                tokens.insert(generator.randint(0, len(tokens)), generator.choice(special))
            stop = ["END"] if generator.random() < 0.5 else None
            _growing_reads(tokens, tokenizer, stop, echo)
    level = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    words = level.encode("Hello world, how are you today", add_special_tokens=False)
    lead = len(PROMPT) if echo else 0
    for length, given in enumerate(_growing_reads(words, level, None, echo), start=1):
        assert len(given) - lead >= length - 2  # the last token, and a word's space held back


def test_a_prompt_scored_streams_its_prompts_entries_alone() -> None:
    """`max_tokens` 0 with `echo`: the prompt scored, the token sampled to score it left out."""
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    request = _request(None, True, max_tokens=0)
    parsed = _parsed(tokenizer, request)
    sequence = _sequence(tokenizer.encode(" sampled", add_special_tokens=False))
    answer = {"type": "sample", "sequences": [sequence], **_scores()}
    [whole] = completion_answer(answer, parsed, tokenizer, request)["sequences"]
    growing = GrowingLegacy(tokenizer, prompt_rows(_scores(), PROMPT), sampled=False)
    given = growing.read(sequence, 8)
    assert given == legacy_logprobs.entries(whole["logprobs"]) and len(given) == len(PROMPT)
