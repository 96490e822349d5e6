"""A sample call asked as a chat (`POST /v1/chat/completions`): messages in, text out.

The API has no tokenizer (the control plane imports no training library), so a chat call carries
its `messages` and the executor, which holds the base's tokenizer, renders them into exactly the
tokens a job's formatting puts before an assistant's reply to them
(`workers.training.formatting.generation_prompt`): with the base's own chat template, or, for a
base without one, as `role: content` lines followed by `assistant: `. (A job trained on
`prompt`/`completion` records of a base without a template saw no such lines: a chat of it is not
what it was trained on.) It samples as any sample call does, and answers each sequence's text
beside its tokens: decoded without special tokens and cut before the first stop string, as OpenAI's
content leaves it out, and, where the chat asked for `logprobs`, each token of that text with its
logprob, bytes and likeliest alternatives (`chat_logprobs`). A chat stops at the base's
end-of-sequence tokens and at the token a job trains a reply to end with (`end_of_turn_tokens`: the
template's end-of-turn marker, which is not the base's end of sequence on many bases), stop strings
or not.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from workers.interactive.chat_logprobs import GrowingContent, content_logprobs
from workers.interactive.losses import InteractiveError
from workers.interactive.sample_requests import SamplingRequest
from workers.interactive.sampling import OnStep, Rows
from workers.training.formatting import generation_prompt

ROLES = ("system", "user", "assistant")


def is_chat(request: Any) -> bool:
    return isinstance(request, dict) and "messages" in request


def is_completion(request: Any) -> bool:
    """A text completion's request (`completion.completion_prompt` reads it)."""
    return isinstance(request, dict) and isinstance(request.get("completion"), dict)


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


def is_streamed(request: Any) -> bool:
    """A chat or a completion asked with `stream: true`: its text so far is written while it
    samples."""
    return (is_chat(request) or is_completion(request)) and bool(request.get("stream"))


def chat_text(
    tokens: list[int], parsed: SamplingRequest, tokenizer: PreTrainedTokenizerBase
) -> str:
    """A sequence's text: decoded without special tokens, cut before the first stop string."""
    text, cut = decoded_text(tokens, parsed, tokenizer)
    return text if cut is None else text[:cut]


def chat_text_so_far(
    tokens: list[int], parsed: SamplingRequest, tokenizer: PreTrainedTokenizerBase
) -> str:
    """The text of a sequence still being sampled, as far as its whole text is sure to begin
    with it: without a trailing character still being decoded (U+FFFD), trailing whitespace
    (a later token may join it: " ." decodes as "."), or an ending that could begin a stop
    string (which the whole text leaves out)."""
    text, cut = decoded_text(tokens, parsed, tokenizer)
    if cut is not None:
        return text[:cut]  # its stop is sampled: this is the whole text
    while True:
        kept = text.rstrip("\ufffd").rstrip()
        held = max(
            (k for s in parsed.stop_strings for k in range(1, len(s)) if kept.endswith(s[:k])),
            default=0,
        )
        kept = kept[: len(kept) - held]
        if kept == text:
            return text
        text = kept


def decoded_text(
    tokens: list[int], parsed: SamplingRequest, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, int | None]:
    """The tokens' text without special tokens, and where its first stop string begins."""
    # U+0000, which no JSON column stores, is no text a chat could want.
    text = tokenizer.decode(tokens, skip_special_tokens=True).replace("\x00", "")
    cut = [text.index(stop) for stop in parsed.stop_strings if stop in text]
    return text, min(cut) if cut else None


def chat_answer(
    answer: dict[str, Any],
    parsed: SamplingRequest,
    tokenizer: PreTrainedTokenizerBase,
    logprobs: bool = False,
) -> dict[str, Any]:
    """The sample's answer with each sequence's text and the prompt's length in tokens; with
    `logprobs` (the chat asked for them), each sequence's `content_logprobs` instead of its
    top-k rows (which they hold)."""
    sequences = []
    for sequence in answer["sequences"]:
        text, cut = decoded_text(sequence["tokens"], parsed, tokenizer)
        read = {**sequence, "text": text[:cut]}
        if logprobs:
            read["content_logprobs"] = content_logprobs(sequence, cut, tokenizer)
            read.pop("topk_logprobs", None)
        sequences.append(read)
    return {**answer, "sequences": sequences, "prompt_tokens": len(parsed.prompt)}


@dataclass(frozen=True)
class SoFar:
    """A streamed chat's reply so far, as its stream is handed it: each choice's text that the
    whole text is sure to begin with (`chat_text_so_far`), and, asked with `logprobs`, each
    choice's entries so far (`GrowingContent`: their texts join into at most that text). `run`
    names the decoding they come from: a call decoded again (its batch run again a call at a
    time) reads its entries from the start."""

    texts: list[str]
    logprobs: list[list[dict[str, Any]]] | None = None
    run: str = ""


class EntryReader(Protocol):
    """One streamed row's logprobs entries so far (`GrowingContent`; a completion's legacy ones,
    `completion.GrowingLegacy`)."""

    def read(self, sequence: dict[str, Any], sure: int) -> list[dict[str, Any]]:
        """The row's entries so far, within the first `sure` characters of its sampled text."""
        ...


# A new reader of one row of the request at a place, given the batch's rows (`Rows`: their
# prompt scores, which a completion echoing its prompt with logprobs begins with).
NewReader = Callable[[Any], EntryReader]


def content_reader(tokenizer: PreTrainedTokenizerBase) -> NewReader:
    """A streamed chat's: each row's `logprobs.content` so far (`GrowingContent`)."""
    return lambda rows: GrowingContent(tokenizer)


class StreamSink(Protocol):
    """Where a batch's streamed chats' replies so far go (`streaming.StreamWriter`)."""

    def __call__(self, replies: dict[str, SoFar]) -> None: ...

    def left(self) -> frozenset[str]:
        """The streams (by key) whose client left: their chats stop sampling."""
        ...


def stream_steps(
    sink: StreamSink | None,
    every_seconds: float,
    streamed: dict[int, str],
    requests: list[SamplingRequest],
    tokenizer: PreTrainedTokenizerBase,
    *,
    logprobs: dict[int, NewReader] | None = None,
    leading: dict[int, tuple[str, bool]] | None = None,
    growing: bool = False,
) -> OnStep | None:
    """What a batch's streamed chats (their place in the batch: their key, the call's id) hand
    `sink` as they sample: every `every_seconds`, each one's reply so far (`SoFar`; with its
    entries where its place is in `logprobs`, each row's read by a reader that place's function
    makes); and the chats whose client left, stopped. A
    streamed completion's place is in `leading`: the text its own begins with (an echoed prompt)
    and whether the text sampled follows (`completion.streamed_text`). `growing`: requests may
    join the batch (added to `streamed`, `logprobs`, `leading` and `requests` as they do), so a
    batch with no streamed chat yet may have some."""
    if sink is None or not (streamed or growing):
        return None
    due = [0.0]
    run = uuid.uuid4().hex  # no other executor's decoding of the call is named so
    asking = logprobs if logprobs is not None else {}
    leads = leading if leading is not None else {}
    readers: dict[tuple[int, int], EntryReader] = {}  # each streamed row's entries

    def sampled_so_far(k: int, row: dict[str, Any]) -> str:
        if not leads.get(k, ("", True))[1]:
            return ""
        return chat_text_so_far(row["tokens"], requests[k], tokenizer)

    def so_far(k: int, batch: Rows) -> SoFar:
        lead = leads.get(k, ("", True))[0]
        rows = batch[k]
        sampled = [sampled_so_far(k, row) for row in rows]
        texts = [lead + text for text in sampled]
        if k not in asking:
            return SoFar(texts)
        entries = []
        for j, (row, text) in enumerate(zip(rows, sampled, strict=True)):
            if (k, j) not in readers:
                readers[k, j] = asking[k](batch)
            entries.append(readers[k, j].read(row, len(text)))
        return SoFar(texts, entries, run)

    def on_step(rows: Rows) -> set[int]:
        left = sink.left()
        if time.monotonic() >= due[0]:
            replies = {key: so_far(k, rows) for k, key in streamed.items() if key not in left}
            if replies:
                sink(replies)
            due[0] = time.monotonic() + every_seconds
        return {k for k, key in streamed.items() if key in left}

    return on_step
