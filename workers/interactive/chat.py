"""A sample call asked as a chat (`POST /v1/chat/completions`): messages in, text out.

The API has no tokenizer (the control plane imports no training library), so a chat call
carries its `messages` and the executor, which holds the base's tokenizer, renders them into
exactly the tokens a job's formatting puts before an assistant's reply to them
(`workers.training.formatting.generation_prompt`): with the base's own chat template, or, for a
base without one, as `role: content` lines followed by `assistant: `. (A job trained on
`prompt`/`completion` records of a base without a template saw no such lines: a chat of it is
not what it was trained on.) It samples as any sample call does, and answers each sequence's
text beside its tokens: decoded without special tokens and cut before the first stop string, as
OpenAI's content leaves it out. A chat stops at the base's end-of-sequence tokens and at the token a job
trains a reply to end with (`end_of_turn_tokens`: the template's end-of-turn marker, which is not
the base's end of sequence on many bases), stop strings or not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedTokenizerBase

from workers.interactive.losses import InteractiveError
from workers.interactive.sample_requests import SamplingRequest
from workers.training.formatting import generation_prompt

ROLES = ("system", "user", "assistant")


def is_chat(request: Any) -> bool:
    return isinstance(request, dict) and "messages" in request


def chat_prompt(request: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The chat call's request with its messages rendered as the prompt's tokens."""
    messages = request["messages"]
    if not isinstance(messages, list) or not messages:
        raise InteractiveError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise InteractiveError(
                f"messages[{i}] must be {{role: one of {list(ROLES)}, content: text}}"
            )
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        tokens, _ = generation_prompt(plain, tokenizer)
    except Exception as error:  # the template's own refusal (a role order it does not take)
        raise InteractiveError(f"the base's chat template refused the messages: {error}") from None
    return {**request, "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}}


def end_of_turn_tokens(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The special token a job trains an assistant's reply to end with (`<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`; the EOS for a base without a chat template), where it is a
    special token other than BOS, padding or unknown: what a chat stops at beside the EOS."""
    user = {"role": "user", "content": "x"}
    try:
        _, closing = generation_prompt([user], tokenizer)
    except Exception:  # a template that takes no such conversation: the EOS alone stops it
        return frozenset()
    decoder = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {i for i, t in decoder.items() if t.special}
    ordinary = {tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    if closing is None or closing not in special or closing in ordinary:
        return frozenset()
    return frozenset([closing])


def chat_request(parsed: SamplingRequest, stops: frozenset[int]) -> SamplingRequest:
    """A chat ends at the base's end of sequence and end of turn (`stops`), whatever stop
    strings it gives."""
    return dataclasses.replace(parsed, stop_tokens=parsed.stop_tokens | stops)


def chat_answer(
    answer: dict[str, Any], parsed: SamplingRequest, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """The sample's answer with each sequence's text and the prompt's length in tokens."""
    sequences = []
    for sequence in answer["sequences"]:
        # U+0000, which no JSON column stores, is no text a chat could want.
        text = tokenizer.decode(sequence["tokens"], skip_special_tokens=True).replace("\x00", "")
        cut = [text.index(stop) for stop in parsed.stop_strings if stop in text]
        sequences.append({**sequence, "text": text[: min(cut)] if cut else text})
    return {**answer, "sequences": sequences, "prompt_tokens": len(parsed.prompt)}
