"""A sample call asked as a chat (`POST /v1/chat/completions`): messages in, text out.

The API has no tokenizer (the control plane imports no training library), so a chat call
carries its `messages` and the executor, which holds the base's tokenizer, renders them with the
base's own chat template (`add_generation_prompt`), samples as any sample call does, and
answers each sequence's text beside its tokens: decoded without special tokens and cut before
the first stop string, as OpenAI's content leaves it out. A chat also stops at the base's
end-of-sequence tokens when stop strings are given (a plain sample's strings replace them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedTokenizerBase

from workers.interactive.losses import InteractiveError
from workers.interactive.sample_requests import SamplingRequest

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
    if not getattr(tokenizer, "chat_template", None):
        raise InteractiveError(
            "this base's tokenizer has no chat template, so messages cannot be rendered: "
            "sample it with a prompt of tokens instead"
        )
    try:
        tokens = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    except Exception as error:  # the template's own refusal (a role order it does not take)
        raise InteractiveError(f"the base's chat template refused the messages: {error}") from None
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [int(t) for t in tokens]}]}
    return {**request, "prompt": prompt}


def chat_request(parsed: SamplingRequest, eos_token_ids: frozenset[int]) -> SamplingRequest:
    """A chat ends at the base's end of sequence whatever stop strings it gives."""
    return dataclasses.replace(parsed, stop_tokens=parsed.stop_tokens | eos_token_ids)


def chat_answer(
    answer: dict[str, Any], parsed: SamplingRequest, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """The sample's answer with each sequence's text and the prompt's length in tokens."""
    sequences = []
    for sequence in answer["sequences"]:
        text = tokenizer.decode(sequence["tokens"], skip_special_tokens=True)
        cut = [text.index(stop) for stop in parsed.stop_strings if stop in text]
        sequences.append({**sequence, "text": text[: min(cut)] if cut else text})
    return {**answer, "sequences": sequences, "prompt_tokens": len(parsed.prompt)}
