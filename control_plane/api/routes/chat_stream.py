"""A chat completion streamed (`stream: true`), as OpenAI streams one: server-sent events, each a
`chat.completion.chunk` (`data: {...}`), ending with `data: [DONE]`.

The stream begins once an executor has taken the chat (what is refused before that, or answered
with a refusal at once, is the plain JSON error the request would get without `stream`). Its
first chunk gives each choice the assistant's role; then, as the executor writes the text so
far (`interactive_calls.partial`, every `chat_stream_every_seconds` while it samples, each
write waking the stream), each choice's new text as a `delta`; at the end the rest of each
choice's text, its `finish_reason`, and with `stream_options.include_usage` a last chunk with
`usage` and no choices, as OpenAI sends them. A chat asked with `logprobs` sends each choice's
entries as vLLM and OpenAI do, with the text they add: a `delta` carries the entries the executor
has read so far (`chat.SoFar`) and, as its content, exactly their texts joined, and the last one
the rest of the whole answer's; so each chunk's entries are its delta's tokens, and the entries
of every chunk joined are the whole answer's. A comment line every `KEEPALIVE_SECONDS` keeps the
connection open while nothing is new, so a long reply is not bounded by a client's read timeout.
A failure after the stream began is an `error` event (the SDK raises it as `APIError`). Once
read, the chat's messages and text are let go, as a chat answered whole lets them go. A stream
that ends before its chat (its client left, or an error) tells the executor, which stops
sampling the chat at its next write, and lets the chat go once it is answered. A text
completion streams the same way (`Streamed.text`): `text_completion` chunks, each choice's new
text its `text`, no role first, and, asked with `logprobs`, beside it the legacy entries written
since (`stream_deltas`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractContextManager, aclosing
from dataclasses import dataclass
from typing import Any

from control_plane.api.errors import ApiError, error_body
from control_plane.api.routes.stream_deltas import (
    Entries,
    Resampled,
    as_text,
    choice,
    entry_deltas,
    last_entries,
    last_text_entries,
    text_deltas,
    text_entry_deltas,
    written,
)
from control_plane.api.routes.tinker_futures import hold_until
from control_plane.interactive import CallRecord, CallStatus

log = logging.getLogger(__name__)

# A comment line this often while nothing is new; a stream ends, with an error, past
# STREAM_SECONDS in all (an executor that is alive but never finishes).
KEEPALIVE_SECONDS = 15.0
STREAM_SECONDS = 1800.0


@dataclass(frozen=True)
class Streamed:
    """A chat an executor took, and how to follow it."""

    chunk_id: str
    model: str
    choices: int
    include_usage: bool
    look: Callable[[], CallRecord]  # the call as it is now (run in a worker thread)
    # Asked with logprobs: the call as it is now, its entries so far past the first of each
    # choice's that many (those sent), else None.
    look_past: Callable[[list[int]], CallRecord] | None
    wake: Callable[[], AbstractContextManager[asyncio.Event | None]]  # woken by its writes
    forget: Callable[[CallRecord], Awaitable[None]]  # let its payload go once read
    leave: Callable[[], Awaitable[None]]  # its client left: stop sampling it
    disconnected: Callable[[], Awaitable[bool]]  # whether its client left
    refusal: Callable[[CallRecord], ApiError]  # what a failed call's error is
    # A text completion's stream (`POST /v1/completions`): its chunks are `text_completion`s,
    # each choice's new text its `text`, with no role first.
    text: bool = False

    @property
    def what(self) -> str:
        """What its errors call it."""
        return "completion" if self.text else "chat"


def refuse_options_without_stream(stream: bool | None, options: object | None) -> None:
    """A request (a chat's, a completion's) with `stream_options` and no `stream`: a 400 that
    names it."""
    if options is not None and not stream:
        raise ApiError(
            400,
            "invalid_request",
            "stream_options is taken only with stream: true",
            "stream_options",
        )


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_event(error: ApiError) -> str:
    """An error after the stream began: the SDK raises it (`APIError`) while iterating."""
    return sse(error_body(error.status, error.code, error.message, error.param))


class _Chunks:
    def __init__(self, streamed: Streamed) -> None:
        self.streamed = streamed
        self.created = int(time.time())

    def __call__(
        self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.streamed.chunk_id,
            "object": "text_completion" if self.streamed.text else "chat.completion.chunk",
            "created": self.created,
            "model": self.streamed.model,
            "system_fingerprint": None,
            "choices": (
                [as_text(c, self.streamed.look_past is not None) for c in choices]
                if self.streamed.text
                else choices
            ),
        }
        if self.streamed.include_usage:
            body["usage"] = usage
        return body


def _new_since(seen: dict[str, Any] | None) -> Callable[[CallRecord], bool]:
    """Whether a look at the call finds it finished, or with a reply so far other than `seen`
    (`_written`)."""
    return lambda found: found.finished or written(found.partial) != seen


# Streams whose client left before the end: each forgets its chat once it is answered (the
# app's end cancels those still waiting: `cancel_left`).
_LEFT: set[asyncio.Task[None]] = set()


async def cancel_left() -> None:
    """The app ends: the tasks of streams that ended early stop waiting on their chats (their
    retention lets the chats go)."""
    tasks = [task for task in _LEFT if task.get_loop() is asyncio.get_running_loop()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _in_background(work: Coroutine[Any, Any, None]) -> None:
    """`work` on the app's loop, past the request (cancelled at the app's end: `cancel_left`);
    with no loop left (shutting down), dropped: the chat's retention lets it go."""
    try:
        task = asyncio.get_running_loop().create_task(work)
    except RuntimeError:
        work.close()
        return
    _LEFT.add(task)
    task.add_done_callback(_LEFT.discard)


def abandon(streamed: Streamed, withdraw: Callable[[], Awaitable[bool]]) -> None:
    """A stream's reader went away while its chat waited to begin (the task asking it was
    cancelled: the dashboard's "Stop"): the chat is withdrawn if no executor took it yet
    (`withdraw` says whether it was), else stopped and let go once it is answered."""

    async def give_up() -> None:
        try:
            if await withdraw():
                return
        except Exception:
            log.exception("a chat whose reader went away could not be withdrawn")
            return
        await _forget_when_answered(streamed)

    _in_background(give_up())


def stop(streamed: Streamed) -> None:
    """A stream that began and will not be followed to its end (its client left, an error, a
    refusal of another prompt of its request): the executor stops sampling it, and it is let go
    once answered."""
    _in_background(_forget_when_answered(streamed))


async def _forget_when_answered(streamed: Streamed) -> None:
    """A stream that ended before its chat did: the executor is told to stop sampling it, and
    its payload is let go once it is answered."""
    try:
        await streamed.leave()
        call = await hold_until(
            STREAM_SECONDS, streamed.look, lambda c: c.finished, streamed.wake()
        )
        if call.finished:
            await streamed.forget(call)
    except Exception:
        log.exception("a chat whose stream ended early was not let go (its retention will)")


def _finish(sequence: dict[str, Any]) -> str:
    """Why a sequence ended: a completion's says (`finish_reason`), a chat's is read off its
    stop."""
    finish = sequence.get("finish_reason")
    if finish is not None:
        return str(finish)
    return "stop" if sequence.get("stop_reason") == "stop" else "length"


# What a followed chat gives as it goes: a chunk (`chat.completion.chunk`, or `text_completion`),
# the error that ends it, None while nothing is new (a keep-alive's turn), or DONE once every
# chunk was given.
DONE = "[DONE]"
Piece = dict[str, Any] | ApiError | str | None


async def events(streamed: Streamed, first: CallRecord) -> AsyncIterator[str]:
    """The chat's chunks as server-sent events (see the module's text), `data: [DONE]` last
    when it ended whole (not after an error, nor once its client left)."""
    async with aclosing(pieces(streamed, first)) as followed:
        async for piece in followed:
            if piece is None:
                yield ": keep-alive\n\n"
            elif isinstance(piece, ApiError):
                yield error_event(piece)
            else:
                yield sse(piece)


async def pieces(streamed: Streamed, first: CallRecord) -> AsyncGenerator[Piece]:
    """The chat's chunks as they come, a choice a chunk, from `first`, the call as the stream
    began (the dashboard's "Try it" box reads them too), then DONE; an error ends them, as
    does its client leaving (nothing more is given). Closed before its
    end (its client left), the executor stops sampling the chat and it is let go once
    answered."""
    chunk = _Chunks(streamed)
    sent = [""] * streamed.choices
    given = Entries([0] * streamed.choices)  # each choice's logprobs entries sent
    look_past = streamed.look_past
    look = streamed.look if look_past is None else lambda: look_past(list(given.counted))
    deadline = time.monotonic() + STREAM_SECONDS
    seen: dict[str, Any] | None = None
    forgotten = False
    call: CallRecord | None = first
    try:
        for i in range(0 if streamed.text else streamed.choices):
            yield chunk([choice(i, {"role": "assistant", "content": ""})])
        while True:
            if call is None:
                left = deadline - time.monotonic()
                call = await hold_until(
                    max(min(KEEPALIVE_SECONDS, left), 0.0),
                    look,
                    _new_since(seen),
                    streamed.wake(),
                )
            if call.finished:
                break
            if await streamed.disconnected():  # what it sends goes nowhere: it stops here
                return
            found, call = call, None
            now = written(found.partial)
            if now != seen:
                seen = now
                partial = found.partial or {}
                if look_past is None:
                    deltas = text_deltas(sent, list(partial.get("texts") or []))
                elif streamed.text:
                    deltas = text_entry_deltas(sent, given, partial)
                else:
                    deltas = entry_deltas(sent, given, partial)
                for delta in deltas:
                    yield chunk([delta])
            elif time.monotonic() >= deadline:
                yield ApiError(
                    503,
                    "executor_busy",
                    f"the {streamed.what} still runs after {STREAM_SECONDS:.0f} s: the rest of its "
                    "answer will not be sent (ask for fewer tokens)",
                )
                return
            else:
                yield None
        await streamed.forget(call)
        forgotten = True
        if call.status == CallStatus.FAILED:
            yield streamed.refusal(call)
            return
        if call.payload_dropped_at is not None:
            raise ApiError(
                503,
                "executor_failed",
                f"the {streamed.what}'s answer was let go before it was read",
            )
        result = call.result or {}
        sequences = list(result.get("sequences") or [])
        texts = [str(s.get("text", "")) for s in sequences]
        if look_past is not None:
            last = last_text_entries if streamed.text else last_entries
            for delta in last(sent, given, texts, sequences):
                yield chunk([delta])
        for delta in text_deltas(sent, texts, whole=True):
            yield chunk([delta])
        for i, s in enumerate(sequences):
            yield chunk([choice(i, {}, _finish(s))])
        if streamed.include_usage:
            prompt = int(result.get("prompt_tokens") or 0)
            sampled = result.get("completion_tokens")  # a completion's (its tokens not kept)
            completion = (
                int(sampled)
                if sampled is not None
                else sum(len(s.get("tokens") or []) for s in sequences)
            )
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            yield chunk([], usage)
        yield DONE
    except Resampled:
        yield ApiError(
            503,
            "executor_failed",
            f"the {streamed.what} was sampled again while it streamed and its text differs "
            "from what was sent: ask again",
        )
    except ApiError as error:
        yield error
    except Exception:  # the database away mid-stream: said, not a connection cut short
        log.exception("a streamed chat could not be followed")
        yield ApiError(
            503, "unavailable", f"the platform could not follow the {streamed.what}: ask again"
        )
    finally:
        if not forgotten:  # ended early, or its client left: stopped, let go once answered
            stop(streamed)
