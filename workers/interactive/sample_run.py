"""One `sample_many` call of the engine: its requests read, decoded in batches within
SAMPLE_TOKENS, each answered as soon as its rows are done, and requests offered while a batch
runs joining it where it has room.

A request is read against the base (`reader`: its adapter, the request, whether it was asked as
text: a chat or a completion), or refused, and a refusal is answered at once. The requests read
are decoded in batches (`sample_batches`), each adapter's rows a slice; a chat's answer is its
text (`chat_answer`), a completion's its text and legacy logprobs (`completion_answer`), and a
streamed chat hands its reply so far (with its logprobs' entries, where it asked for them) to
the stream's sink as it samples (a streamed completion its text so far, after its echoed
prompt). Between the passes of the last batch (the requests asked
first wait for no request asked later), `more` may offer requests (the executor's sample calls
asked since): each one joins the batch if it fits (`Room.taking`: it samples no more tokens
than a row of the batch still may, and the batch stays within SAMPLE_TOKENS), is refused and
answered, or is left for a batch of its own (the offer stops there). Taking one is in two
steps: whether it fits, and then, once its call is the batch's (its claim committed), adding
it, so that nothing is answered for a call the database does not yet give this executor.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from workers.interactive.chat import (
    NewReader,
    StreamSink,
    chat_answer,
    content_reader,
    is_completion,
    stream_steps,
)
from workers.interactive.completion import completion_answer, legacy_reader, streamed_text
from workers.interactive.losses import InteractiveError
from workers.interactive.sample_batching import Room, rope_couples_past, sample_batches
from workers.interactive.sample_requests import SamplingRequest
from workers.interactive.sampling import evaluating, generate

# A request asked: (its model, None for the base alone; the SampleRequest or chat, as JSON).
Asked = tuple[str | None, dict[str, Any]]
# A request read: (its adapter, the request, whether asked as text: a chat or a completion), or
# its refusal.
Read = tuple[str, SamplingRequest, bool] | InteractiveError
# Offers requests, each to `take`, which answers None where the batch has no room for it, else
# the function that adds it (a refusal: answers it), to be called once it is the batch's (its
# call's claim committed) and before the next request is offered.
Take = Callable[[Asked], Callable[[], None] | None]
More = Callable[[Take], None]
# A request's answer (by its index among those asked) or its refusal, as soon as it is known.
OnAnswer = Callable[[int, dict[str, Any] | InteractiveError], None]


class SampleRun:
    """The books of one `sample_many`: what was asked (those that joined after the others),
    each one's answer so far, and each request read (its adapter, the request; chats apart)."""

    def __init__(
        self,
        reader: Callable[[str | None, dict[str, Any]], Read],
        model: nn.Module,
        routed: bool,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager[Any]],
        stream: tuple[StreamSink | None, float],
        on_answer: OnAnswer | None,
    ) -> None:
        self.reader, self.model, self.routed = reader, model, routed
        self.tokenizer, self.device, self.autocast = tokenizer, device, autocast
        self.sink, self.every_seconds = stream
        self.on_answer = on_answer
        self.asked: list[Asked] = []
        self.answers: list[dict[str, Any] | InteractiveError] = []
        self.parsed: dict[int, tuple[str, SamplingRequest]] = {}
        self.chats: set[int] = set()  # asked as text (`chat`, `completion`): text out

    def run(self, asked: list[Asked], more: More | None) -> list[dict[str, Any] | InteractiveError]:
        for one in asked:
            self._add(one, self.reader(*one))
        sizes = {
            i: (request.num_samples, len(request.prompt) + request.max_tokens)
            for i, (_, request) in self.parsed.items()
        }
        batches = list(
            sample_batches(sizes, rope_couples_past(getattr(self.model, "config", None)))
        )
        for n, batch in enumerate(batches):
            batch = sorted(batch, key=lambda i: self.parsed[i][0])  # each adapter's rows a slice
            # Only the last takes requests offered: those the executor has taken wait for none.
            self._decode(batch, more if n == len(batches) - 1 else None)
        return self.answers

    def _add(self, one: Asked, read: Read) -> None:
        """The next request asked, in the books; a refusal is answered now."""
        i = len(self.answers)
        self.asked.append(one)
        if isinstance(read, InteractiveError):
            self.answers.append(read)
            if self.on_answer is not None:
                self.on_answer(i, read)
            return
        self.answers.append({})
        self.parsed[i] = read[:2]
        if read[2]:
            self.chats.add(i)

    def _decode(self, batch: list[int], more: More | None) -> None:
        """One batch decoded (`batch`: the indices of its requests, by place; joiners after)."""
        requests = [self.parsed[i][1] for i in batch]
        streamed: dict[int, str] = {}  # the streamed chats' (and completions') places: call ids
        logprobs: dict[int, NewReader] = {}  # those asked with logprobs: their entries' readers
        leading: dict[int, tuple[str, bool]] = {}  # the streamed completions' (`stream_steps`)

        def stream(k: int) -> None:
            request = self.asked[batch[k]][1]
            if batch[k] in self.chats and isinstance(request.get("stream"), str):
                streamed[k] = str(request["stream"])
                if is_completion(request):
                    leading[k] = streamed_text(request, requests[k], self.tokenizer)
                    if request["completion"].get("logprobs") is not None:
                        logprobs[k] = legacy_reader(request, requests[k], self.tokenizer, k)
                elif request.get("logprobs") is True:
                    logprobs[k] = content_reader(self.tokenizer)

        def done(k: int, answer: dict[str, Any]) -> None:
            i = batch[k]
            asked = self.asked[i][1]
            if i in self.chats and is_completion(asked):
                answer = completion_answer(answer, self.parsed[i][1], self.tokenizer, asked)
            elif i in self.chats:
                logprobs = asked.get("logprobs") is True
                answer = chat_answer(answer, self.parsed[i][1], self.tokenizer, logprobs)
            self.answers[i] = answer
            if self.on_answer is not None:
                self.on_answer(i, answer)

        def join(room: Room) -> list[tuple[SamplingRequest, str | None]]:
            joining: list[tuple[SamplingRequest, str | None]] = []

            def take(one: Asked) -> Callable[[], None] | None:
                read = self.reader(*one)
                if isinstance(read, InteractiveError):
                    return lambda: self._add(one, read)  # refused, and answered so
                after = room.taking(read[1])
                if after is None:
                    return None  # no room: it waits for a batch of its own

                def add() -> None:
                    nonlocal room
                    self._add(one, read)
                    room = after
                    batch.append(len(self.asked) - 1)
                    requests.append(read[1])
                    stream(len(batch) - 1)
                    joining.append((read[1], read[0] if self.routed else None))

                return add

            assert more is not None
            more(take)
            return joining

        for k in range(len(batch)):
            stream(k)
        with self.autocast(), evaluating(self.model):
            generate(
                self.model,
                requests,
                self.tokenizer,
                self.device,
                adapters=[self.parsed[i][0] for i in batch] if self.routed else None,
                on_step=stream_steps(
                    self.sink,
                    self.every_seconds,
                    streamed,
                    requests,
                    self.tokenizer,
                    logprobs=logprobs,
                    leading=leading,
                    growing=more is not None,
                ),
                on_done=done,
                join=join if more is not None else None,
            )
