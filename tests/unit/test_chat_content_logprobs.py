"""`content_logprobs` (a chat's OpenAI `logprobs.content`) on a reply whose character is split
across byte-level tokens: the bytes join into it where each token's text cannot. The tiny test
base's tokenizer."""

from __future__ import annotations

from transformers import AutoTokenizer

from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive.chat import content_logprobs
from workers.interactive.sample_requests import read_sample_request


def test_a_character_split_across_byte_level_tokens_is_whole_in_their_bytes() -> None:
    """An emoji the tiny base's byte-level tokenizer writes in several tokens: no token's text
    holds it (each shows U+FFFD), but their bytes joined are the content's, and the token that
    ends the reply is left out."""
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    reply = "ok 🙂 done"
    tokens = [*tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]
    parsed = read_sample_request(
        {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [5]}]}, "sampling_params": {}},
        len(tokenizer),
        64,
        frozenset([tokenizer.eos_token_id]),
    )
    logprobs = [-0.5 - k for k in range(len(tokens))]
    entries = content_logprobs({"tokens": tokens, "logprobs": logprobs}, parsed, tokenizer)
    assert len(entries) == len(tokens) - 1  # not the end of sequence
    assert [entry["logprob"] for entry in entries] == logprobs[:-1]
    assert any("\ufffd" in entry["token"] for entry in entries)
    assert bytes(b for entry in entries for b in entry["bytes"]).decode() == reply
    assert all(entry["top_logprobs"] == [] for entry in entries)
