"""A sample call asked as a text completion (`POST /v1/completions`: OpenAI's legacy completions,
as vLLM serves them for base and fine-tuned models alike): a prompt in, text out.

The prompt is text, which the executor tokenizes with the base's tokenizer as vLLM does (its
special tokens added: a Llama base's BOS), or token ids, taken as they are (lm-evaluation-
harness sends those). It samples as any sample call does, stopping at the base's end of sequence
(and at the stop strings, left out of the text). Each sequence's answer is its `text` (decoded
without special tokens, cut before the first stop string; with `echo`, the prompt's text first)
and, where asked (`logprobs` k, 0 to 20), OpenAI's legacy `logprobs`: `tokens`, `token_logprobs`,
`top_logprobs` (each position's k likeliest tokens, and the token itself, as vLLM gives them:
what lm-evaluation-harness reads a greedy continuation off) and `text_offset`, one entry a token,
every token (special ones too: lm-evaluation-harness counts positions), with `echo` the prompt's
first (its first token has no logprob: None). A token's string is its text decoded alone (its
leading space kept), as vLLM gives it. With `max_tokens` 0 (only with `echo`: scoring a prompt)
one token is sampled and left out. Streamed (`stream`), its text so far is written as a chat's is
(`chat.stream_steps`), after its echoed prompt (`streamed_text`), and with `logprobs` its entries
so far (`GrowingLegacy`: the echoed prompt's, then each sampled token's once its text is sure).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from control_plane import legacy_logprobs
from workers.interactive.chat import NewReader, decoded_text
from workers.interactive.chat_logprobs import (
    GrowingContent,
    content_logprobs,
    special_tokens,
    token_string,
)
from workers.interactive.losses import InteractiveError
from workers.interactive.sample_requests import SamplingRequest


def completion_prompt(
    request: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """The completion call's request with its prompt as tokens, and the scores its `logprobs`
    (with `echo`, of its prompt too) need."""
    asked = request["completion"]
    text, tokens = asked.get("text"), asked.get("tokens")
    if isinstance(text, str):
        tokens = tokenizer.encode(text)
    if not isinstance(tokens, list) or not tokens:
        raise InteractiveError("the prompt must be text or token ids, and hold at least 1 token")
    top = asked.get("logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise InteractiveError("logprobs must be an integer from 0 to 20")
    out = {**request, "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]}}
    if top is not None:
        out["topk_sample_logprobs"] = top
        if asked.get("echo"):
            out["prompt_logprobs"] = True
            out["topk_prompt_logprobs"] = top
    return out


def completion_answer(
    answer: dict[str, Any],
    parsed: SamplingRequest,
    tokenizer: PreTrainedTokenizerBase,
    request: dict[str, Any],
) -> dict[str, Any]:
    """The sample's answer as a completion's: each sequence's `text`, `finish_reason` and, where
    asked, legacy `logprobs`; the prompt's and the completion's lengths in tokens."""
    asked = request["completion"]
    top, echo = asked.get("logprobs"), bool(asked.get("echo"))
    scoring = asked.get("max_tokens") == 0  # the token sampled is left out
    prompt, shown = list(parsed.prompt), echoed(request, parsed, tokenizer)
    sequences, sampled = [], 0
    for sequence in answer["sequences"]:
        tokens = [] if scoring else list(sequence["tokens"])
        text, kept = _cut(tokens, parsed, tokenizer)
        finish = "stop" if sequence.get("stop_reason") == "stop" and not scoring else "length"
        read: dict[str, Any] = {"text": shown + text, "finish_reason": finish}
        if top is not None:
            rows = prompt_rows(answer, prompt) if echo else []
            rows += sampled_rows(sequence, tokens, kept)
            read["logprobs"] = legacy_logprobs.arrays(legacy_entries(rows, tokenizer))
        sequences.append(read)
        sampled += len(tokens)
    return {"sequences": sequences, "prompt_tokens": len(prompt), "completion_tokens": sampled}


def echoed(
    request: dict[str, Any], parsed: SamplingRequest, tokenizer: PreTrainedTokenizerBase
) -> str:
    """What a completion's text begins with: with `echo`, its prompt's text (token ids' as they
    read, special tokens and all; U+0000 is no JSON text), else nothing."""
    asked = request["completion"]
    if not asked.get("echo"):
        return ""
    text = asked.get("text")
    return (
        text if isinstance(text, str) else tokenizer.decode(list(parsed.prompt)).replace("\x00", "")
    )


class GrowingLegacy:
    """A streamed completion's legacy `logprobs` entries while a row samples: with `echo`, the
    prompt's first (`prompt`), then each sampled token's once its text is sure: through the token
    the last sure content entry comes from (`GrowingContent`, as `_cut` counts the tokens the
    whole text holds), so they are always the first of the whole answer's entries. Scoring a
    prompt (`sampled` false), the prompt's alone."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt: list[Row], sampled: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.content = GrowingContent(tokenizer)
        self.prompt = legacy_entries(prompt, tokenizer)
        self.sampled = sampled
        self.entries: list[dict[str, Any]] = []  # the sampled tokens' read so far

    def read(self, sequence: dict[str, Any], sure: int) -> list[dict[str, Any]]:
        if not self.sampled:
            return self.prompt
        # Only how many content entries are sure counts: read without their alternatives.
        plain = {"tokens": sequence["tokens"], "logprobs": sequence["logprobs"]}
        content = len(self.content.read(plain, sure))
        through = self.content.places[content - 1] + 1 if content else 0
        if len(self.entries) < through:
            rows = sampled_rows(sequence, sequence["tokens"], through, len(self.entries))
            self.entries += legacy_entries(rows, self.tokenizer)
        return self.prompt + self.entries[:through]


def legacy_reader(
    request: dict[str, Any], parsed: SamplingRequest, tokenizer: PreTrainedTokenizerBase, k: int
) -> NewReader:
    """A streamed completion's asked with `logprobs`, at place `k` of its batch: each row's
    entries so far (`GrowingLegacy`), its prompt's first with `echo` (the batch's prompt
    scores)."""
    asked = request["completion"]
    prompt = list(parsed.prompt)

    def reader(rows: Any) -> GrowingLegacy:
        scored = prompt_rows(rows.scores(k), prompt) if asked.get("echo") else []
        return GrowingLegacy(tokenizer, scored, asked.get("max_tokens") != 0)

    return reader


def streamed_text(
    request: dict[str, Any], parsed: SamplingRequest, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, bool]:
    """What a streamed completion's text so far begins with (`echoed`), and whether anything
    sampled follows it (not for `max_tokens` 0: the token sampled to score a prompt is left
    out)."""
    return echoed(request, parsed, tokenizer), request["completion"].get("max_tokens") != 0


def _cut(
    tokens: list[int], parsed: SamplingRequest, tokenizer: PreTrainedTokenizerBase
) -> tuple[str, int]:
    """The tokens' text (without special tokens, U+0000, or the first stop string on), and how
    many of the tokens it holds: through the one its last character comes from (the token the
    text ends in may run on into the stop string, as a chat's last entry does)."""
    text, cut = decoded_text(tokens, parsed, tokenizer)
    if cut is None:
        return text, len(tokens)
    entries = content_logprobs({"tokens": tokens, "logprobs": [0.0] * len(tokens)}, cut, tokenizer)
    special = special_tokens(tokenizer)
    places = [i for i, token in enumerate(tokens) if token not in special]
    return text[:cut], places[len(entries) - 1] + 1 if entries else 0


# A token, its logprob (None: a prompt's first) and its position's top-k (token, logprob) pairs.
Row = tuple[int, float | None, list[Any] | None]


def prompt_rows(scores: dict[str, Any], prompt: list[int]) -> list[Row]:
    """The prompt's rows, from a sample's prompt scores (`prompt_logprobs`,
    `topk_prompt_logprobs`)."""
    logprobs = scores.get("prompt_logprobs") or [None] * len(prompt)
    alternatives = scores.get("topk_prompt_logprobs") or [None] * len(prompt)
    return list(zip(prompt, logprobs, alternatives, strict=True))


def sampled_rows(
    sequence: dict[str, Any], tokens: list[int], kept: int, start: int = 0
) -> list[Row]:
    """The rows of the sampled tokens from `start` up to `kept`."""
    own = sequence.get("topk_logprobs") or [[] for _ in tokens]
    cut = slice(start, kept)
    return list(zip(tokens[cut], sequence["logprobs"][cut], own[cut], strict=True))


def legacy_entries(rows: list[Row], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """OpenAI's legacy `logprobs` of (token, its logprob, its position's top-k) rows, an entry a
    token (`control_plane.legacy_logprobs`): a scored position's top is its alternatives and the
    token itself, as vLLM gives it, tokens whose strings read alike (bytes of a character, each
    U+FFFD alone) under one key at the likeliest of them, so that the token's own is the top's
    greatest exactly where it is its position's likeliest (lm-evaluation-harness's greedy
    check)."""
    entries: list[dict[str, Any]] = []
    for token, logprob, alternatives in rows:
        top: dict[str, float] | None = None
        if logprob is not None:
            top = {}
            for alternative, lp in [*(alternatives or []), (token, logprob)]:
                key = token_string(tokenizer, alternative)  # tokens that read alike share one
                top[key] = max(lp, top.get(key, lp))
        entries.append(
            {"token": token_string(tokenizer, token), "logprob": logprob, "top_logprobs": top}
        )
    return entries
