"""Turn dataset records into token ids and labels, with the loss only where the model should learn.

A record is one JSONL line of an uploaded file, already validated by the control plane:

- chat: `{"messages": [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...]}`;
  an assistant message may carry OpenAI's `"weight": 0` to be kept as context but not trained on;
- prompt/completion: `{"prompt": "...", "completion": "..."}`, rendered as a user turn and an
  assistant turn when the tokenizer has a chat template, or concatenated when it has none;
- plain text: `{"text": "..."}`, trained on every token.

Chat text is rendered with the tokenizer's own chat template, so a fine-tuned adapter sees exactly
the markup the base was instruction-tuned with. Each assistant turn is tokenized as its own
segment after the prompt rendered with `add_generation_prompt=True`: the prompt tokens are then
the very tokens an inference server produces for that conversation, and the trainable tokens are
what the model must generate, its end-of-turn marker included. Labels are not shifted (the
Hugging Face convention: `labels[i]` is the target of position `i - 1`); -100 means "no loss".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from transformers import PreTrainedTokenizerBase

# The example type lives below the kernels that pack it; formatting is where callers meet it.
from workers.kernels.example import IGNORE_INDEX as IGNORE_INDEX
from workers.kernels.example import TokenizedExample as TokenizedExample


class DatasetFormatError(ValueError):
    """A record is not one of the supported shapes (the control plane should have refused it)."""


Item = TypeVar("Item", bound=Sized)  # an example, or a preference pair of two


@dataclass(frozen=True)
class TokenizedDataset(Generic[Item]):
    """The examples (or pairs) that kept a token to learn from, and how many records were
    dropped."""

    examples: tuple[Item, ...]
    dropped: int = 0
    truncated: int = 0
    total_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_tokens", sum(len(e) for e in self.examples))


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer renders conversations itself."""
    return bool(getattr(tokenizer, "chat_template", None))


def tokenize_records(
    records: Iterable[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
) -> TokenizedDataset[TokenizedExample]:
    """Tokenize every record, truncate it to `max_seq_length` and drop those left with no loss."""
    examples: list[TokenizedExample] = []
    dropped = truncated = 0
    for record in records:
        example = tokenize_record(record, tokenizer)
        if len(example) > max_seq_length:
            truncated += 1
            example = example.truncated(max_seq_length)
        if example.trainable_tokens:
            examples.append(example)
        else:
            dropped += 1
    return TokenizedDataset(tuple(examples), dropped=dropped, truncated=truncated)


def tokenize_record(
    record: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase
) -> TokenizedExample:
    """Tokenize one record of any supported shape (not truncated)."""
    if "messages" in record:
        return _tokenize_chat(_messages(record["messages"]), tokenizer)
    if "prompt" in record and "completion" in record:
        prompt, completion = _text(record, "prompt"), _text(record, "completion")
        if has_chat_template(tokenizer):
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
            return _tokenize_chat(messages, tokenizer)
        return _segments([(prompt, False), (completion, True)], tokenizer, with_eos=True)
    if "text" in record:
        ids = _encode(_text(record, "text"), tokenizer, special=True)
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return TokenizedExample(tuple(ids), tuple(ids))
    raise DatasetFormatError(
        f"record has none of 'messages', 'prompt'+'completion', 'text': keys {sorted(record)}"
    )


def generation_prompt(
    messages: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], int | None]:
    """What this formatting puts before an assistant's reply to `messages`, and the last token
    it trains the reply with (its end of turn or EOS; None where it trains none): what a chat
    of a model trained on such conversations is sampled after, and where its reply ends."""
    example = _tokenize_chat([*messages, {"role": "assistant", "content": "x"}], tokenizer)
    labels = example.labels
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    closing = example.input_ids[end] if end > start else None  # past the reply's own token
    return list(example.input_ids[:start]), closing


def _tokenize_chat(
    messages: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> TokenizedExample:
    """Render a conversation and mark each trained assistant turn as a trainable segment."""
    if not has_chat_template(tokenizer):
        parts: list[tuple[str, bool]] = []
        for m in messages:
            if _trained(m):
                parts += [(f"{m['role']}: ", False), (m["content"], True), ("\n", False)]
            else:
                parts.append((f"{m['role']}: {m['content']}\n", False))
        return _segments(parts, tokenizer, with_eos=True)
    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = _render(tokenizer, messages[:index], generation_prompt=True)
            pieces.append((_after(prompt, rendered), False))
            rendered = prompt
        full = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        text = _after(full, rendered)
        if message["role"] == "assistant" and _trained(message):
            # Train on the reply and its end-of-turn marker, not on the newline the template
            # adds between turns (which is never generated: decoding stops at the marker).
            body = text.rstrip()
            pieces += [(body, True), (text[len(body) :], False)]
        else:
            pieces.append((text, False))
        rendered = full
    return _segments(pieces, tokenizer, with_eos=False)


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    generation_prompt: bool,
) -> str:
    if not messages and not generation_prompt:
        return ""
    text = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        tokenize=False,
        add_generation_prompt=generation_prompt,
    )
    assert isinstance(text, str)
    return text


def _after(text: str, prefix: str) -> str:
    """The part of `text` after `prefix`; chat templates must render conversations prefix-wise."""
    if not text.startswith(prefix):
        raise DatasetFormatError(
            "the chat template does not render a conversation as a prefix of its continuation "
            "(e.g. it rewrites earlier turns), so assistant turns cannot be located"
        )
    return text[len(prefix) :]


def _segments(
    pieces: Sequence[tuple[str, bool]], tokenizer: PreTrainedTokenizerBase, with_eos: bool
) -> TokenizedExample:
    """Tokenize text pieces one by one; a piece marked True is trained on."""
    input_ids: list[int] = []
    labels: list[int] = []
    for position, (text, trained) in enumerate(pieces):
        ids = _encode(text, tokenizer, special=position == 0 and not has_chat_template(tokenizer))
        if trained and with_eos and tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return TokenizedExample(tuple(input_ids), tuple(labels))


def _encode(text: str, tokenizer: PreTrainedTokenizerBase, special: bool) -> list[int]:
    """Token ids of `text`; `special` adds the tokenizer's BOS where it uses one."""
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _messages(value: Any) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DatasetFormatError("'messages' must be a non-empty list")
    for message in value:
        if not isinstance(message, Mapping):
            raise DatasetFormatError("each message must be an object")
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise DatasetFormatError("each message needs a string 'role' and 'content'")
    return value


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DatasetFormatError(f"{key!r} must be a string")
    return value


def _trained(message: Mapping[str, Any]) -> bool:
    return message["role"] == "assistant" and message.get("weight", 1) != 0
