"""A sample call asked as a chat (`POST /v1/chat/completions`): messages in, text out.

The API has no tokenizer (the control plane imports no training library), so a chat call
carries its `messages` and the executor, which holds the base's tokenizer, renders them as a
job trains on them (`workers.training.formatting`): with the base's own chat template
(`add_generation_prompt`), or, for a base without one, as `role: content` lines followed by
`assistant: `. It samples as any sample call does, and answers each sequence's text beside its
tokens: decoded without special tokens and cut before the first stop string, as OpenAI's
content leaves it out. A chat stops at the base's end-of-sequence tokens and at its template's
end-of-turn marker (`end_of_turn_tokens`: a fine-tuned adapter ends its reply with the marker,
which is not the base's end of sequence on many bases), stop strings or not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedTokenizerBase

from workers.interactive.losses import InteractiveError
from workers.interactive.sample_requests import SamplingRequest
from workers.training.formatting import has_chat_template

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
    if not has_chat_template(tokenizer):  # as a job trains such a base on messages
        lines = [f"{m['role']}: {m['content']}\n" for m in messages] + ["assistant: "]
        tokens = [
            *tokenizer(lines[0], add_special_tokens=True)["input_ids"],
            *(
                t
                for line in lines[1:]
                for t in tokenizer(line, add_special_tokens=False)["input_ids"]
            ),
        ]
        return {**request, "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}}
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


def end_of_turn_tokens(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The special token the chat template closes an assistant's turn with, where it has one
    (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`): what follows a reply in the rendered chat."""
    if not has_chat_template(tokenizer):
        return frozenset()
    marker = "\u00a7\u00a7"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:  # a template that takes no such conversation: the EOS alone stops it
        return frozenset()
    after = str(rendered).rpartition(marker)[2]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return frozenset(t for t in ids[:1] if t in special)


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
        text = tokenizer.decode(sequence["tokens"], skip_special_tokens=True)
        cut = [text.index(stop) for stop in parsed.stop_strings if stop in text]
        sequences.append({**sequence, "text": text[: min(cut)] if cut else text})
    return {**answer, "sequences": sequences, "prompt_tokens": len(parsed.prompt)}
