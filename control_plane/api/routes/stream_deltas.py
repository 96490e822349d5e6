"""What a stream sends of a chat's (or a completion's) reply at each look: each choice's text
past what was sent of it, and, asked with logprobs, its entries past those sent (`chat_stream`
follows the call and sends them as chunks).

A chat's entries (`logprobs.content`) carry the text they add, so a chunk's content is exactly
its entries' texts joined (`entry_deltas`, `last_entries`). A text completion's legacy entries
(`control_plane.legacy_logprobs`: a token's text decoded alone, special tokens too) need not join
into its text, so its chunks carry the text so far past what was sent and, beside it, the entries
written since (`text_entry_deltas`, `last_text_entries`), their `text_offset` carrying on from the
entries sent before: the lists of every chunk joined are the completion's answered whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from control_plane import legacy_logprobs


def choice(
    index: int,
    delta: dict[str, Any],
    finish: str | None = None,
    entries: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    logprobs = None if entries is None else {"content": entries, "refusal": None}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def as_text(one: dict[str, Any], lists: bool = False) -> dict[str, Any]:
    """A chunk's choice as a text completion's: its delta's content as its `text`; asked with
    logprobs (`lists`), the legacy lists of the entries it carries (`text_entry_deltas`), empty
    where it carries none, as vLLM sends them."""
    logprobs = one["logprobs"]
    if logprobs is None and lists:
        logprobs = legacy_logprobs.arrays([])
    return {
        "index": one["index"],
        "text": one["delta"].get("content", ""),
        "logprobs": logprobs,
        "finish_reason": one["finish_reason"],
    }


class Resampled(Exception):
    """A choice's text no longer begins with what was sent (the chat was sampled again, and
    differently): what was sent cannot be taken back."""


def text_deltas(sent: list[str], texts: list[str], *, whole: bool = False) -> list[dict[str, Any]]:
    """Each choice's text past what was sent of it (`sent` updated). Text so far that is
    shorter than what was sent and begins it (a batch run again a call at a time writes its
    text from the start) is waited past; `whole` texts must begin with what was sent."""
    out = []
    for index, text in enumerate(texts[: len(sent)]):
        if not text.startswith(sent[index]):
            if whole or not sent[index].startswith(text):
                raise Resampled
            continue
        if len(text) > len(sent[index]):
            out.append(choice(index, {"content": text[len(sent[index]) :]}))
            sent[index] = text
    return out


@dataclass
class Entries:
    """What a stream sent of each choice's logprobs entries: how many, from which decoding of
    the chat (`run`; None before any), and, a completion's, their tokens' texts."""

    counted: list[int]
    run: str | None = None
    tokens: list[list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = [[] for _ in self.counted]


def joined(entries: list[dict[str, Any]]) -> str:
    """The text logprobs entries add, joined."""
    return "".join(str(e.get("token", "")) for e in entries)


def entry_deltas(sent: list[str], given: Entries, partial: dict[str, Any]) -> list[dict[str, Any]]:
    """Each choice's new logprobs entries (the reply so far read past the entries sent) with
    their texts joined as its content, where that carries on what was sent within the text so
    far (`sent`, `given` updated); a text so far that neither begins with what was sent nor
    begins it was sampled again, differently. Another decoding's entries than those sent (the
    chat decoded again) wait for the whole answer (`last_entries`)."""
    deltas: list[dict[str, Any]] = []
    run = partial.get("run")
    if given.run is not None and run != given.run:
        return deltas
    texts, entries = partial.get("texts") or [], partial.get("logprobs") or []
    for index, (text, new) in enumerate(zip(texts[: len(sent)], entries, strict=False)):
        if not text.startswith(sent[index]) and not sent[index].startswith(text):
            raise Resampled
        added = joined(new)
        if new and text.startswith(sent[index] + added):
            deltas.append(choice(index, {"content": added}, entries=new))
            sent[index] += added
            given.counted[index] += len(new)
            given.run = run
    return deltas


def last_entries(
    sent: list[str], given: Entries, texts: list[str], sequences: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each choice's rest of its whole answer: its text past what was sent, with its entries
    past those sent (`sent` updated), where the entries sent are the answer's first (their texts
    joined, what was sent: a decoding the chat had again may write the same text in other
    tokens)."""
    deltas = []
    for index, (text, sequence) in enumerate(zip(texts[: len(sent)], sequences, strict=False)):
        entries = list(sequence.get("content_logprobs") or [])
        first = joined(entries[: given.counted[index]])
        if not text.startswith(sent[index]) or first != sent[index]:
            raise Resampled
        rest = entries[given.counted[index] :]
        if rest or len(text) > len(sent[index]):
            deltas.append(choice(index, {"content": text[len(sent[index]) :]}, entries=rest))
            sent[index] = text
    return deltas


def text_entry_deltas(
    sent: list[str], given: Entries, partial: dict[str, Any]
) -> list[dict[str, Any]]:
    """A text completion's: each choice's text so far past what was sent (`text_deltas`) and,
    beside it, its legacy entries written past those sent (`sent`, `given` updated), a choice a
    chunk; another decoding's entries than those sent wait for the whole answer
    (`last_text_entries`)."""
    out = {one["index"]: one for one in text_deltas(sent, list(partial.get("texts") or []))}
    run = partial.get("run")
    if given.run is None or run == given.run:
        for index, new in enumerate((partial.get("logprobs") or [])[: len(sent)]):
            if new:
                _give(out, index, given, new)
                given.run = run
    return [out[index] for index in sorted(out)]


def last_text_entries(
    sent: list[str], given: Entries, texts: list[str], sequences: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """A text completion's rest of each choice's whole answer: its text past what was sent, and
    its legacy entries past those sent, where those sent are the answer's first (by their
    tokens' texts: a decoding the call had again may have sampled others)."""
    out: dict[int, dict[str, Any]] = {}
    for index, sequence in enumerate(sequences[: len(sent)]):
        lists = sequence.get("logprobs")
        whole = legacy_logprobs.entries(lists) if lists else []
        counted = given.counted[index]
        if [entry["token"] for entry in whole[:counted]] != given.tokens[index]:
            raise Resampled
        if whole[counted:]:
            _give(out, index, given, whole[counted:])
    for one in text_deltas(sent, texts, whole=True):
        out.setdefault(one["index"], one)["delta"] = one["delta"]
    return [out[index] for index in sorted(out)]


def _give(
    out: dict[int, dict[str, Any]], index: int, given: Entries, new: list[dict[str, Any]]
) -> None:
    """Choice `index`'s chunk in `out` (one with no text where it has none) carries `new`, the
    entries after those sent (`given` updated), as OpenAI's legacy lists."""
    offset = sum(len(token) for token in given.tokens[index])
    out.setdefault(index, choice(index, {"content": ""}))["logprobs"] = legacy_logprobs.arrays(
        new, offset
    )
    given.tokens[index] += [entry["token"] for entry in new]
    given.counted[index] += len(new)


def written(partial: dict[str, Any] | None) -> dict[str, Any] | None:
    """What tells one write of a reply so far from another: all of it but the entries, which a
    look past those sent reads in part (`stored` counts them)."""
    return None if partial is None else {k: v for k, v in partial.items() if k != "logprobs"}
