"""A chat completion streamed (`stream: true`), as OpenAI streams one: server-sent events, each a
`chat.completion.chunk` (`data: {...}`), ending with `data: [DONE]`.

The stream begins once an executor has taken the chat (what is refused before that, or answered
with a refusal at once, is the plain JSON error the request would get without `stream`). Its
first chunk gives each choice the assistant's role; then, as the executor writes the text so
far (`interactive_calls.partial`, every `chat_stream_every_seconds` while it samples, each
write waking the stream), each choice's new text as a `delta`; at the end the rest of each
choice's text, its `finish_reason`, and with `stream_options.include_usage` a last chunk with
`usage` and no choices, as OpenAI sends them. A comment line every `KEEPALIVE_SECONDS` keeps the
connection open while nothing is new, so a long reply is not bounded by a client's read timeout.
A failure after the stream began is an `error` event (the SDK raises it as `APIError`). Once
read, the chat's messages and text are let go, as a chat answered whole lets them go.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from control_plane.api.errors import ApiError, error_body
from control_plane.api.routes.tinker_futures import hold_until
from control_plane.interactive import CallRecord, CallStatus

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
    wake: Callable[[], AbstractContextManager[asyncio.Event | None]]  # woken by its writes
    forget: Callable[[CallRecord], Awaitable[None]]  # let its payload go once read
    refusal: Callable[[CallRecord], ApiError]  # what a failed call's error is


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_event(error: ApiError) -> str:
    """An error after the stream began: the SDK raises it (`APIError`) while iterating."""
    return sse(error_body(error.status, error.code, error.message, error.param))


class _Chunks:
    def __init__(self, streamed: Streamed) -> None:
        self.streamed = streamed
        self.created = int(time.time())

    def __call__(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.streamed.chunk_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.streamed.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.streamed.include_usage:
            body["usage"] = usage
        return sse(body)


def _choice(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


class _Resampled(Exception):
    """A choice's text no longer begins with what was sent (its executor was lost and the chat
    sampled again): what was sent cannot be taken back."""


def _deltas(sent: list[str], texts: list[str]) -> list[dict[str, Any]]:
    """Each choice's text past what was sent of it (`sent` updated)."""
    deltas = []
    for index, text in enumerate(texts[: len(sent)]):
        if not text.startswith(sent[index]):
            raise _Resampled
        if len(text) > len(sent[index]):
            deltas.append(_choice(index, {"content": text[len(sent[index]) :]}))
            sent[index] = text
    return deltas


def _new_since(seen: dict[str, Any] | None) -> Callable[[CallRecord], bool]:
    """Whether a look at the call finds it finished, or with text so far other than `seen`."""
    return lambda found: found.finished or found.partial != seen


async def events(streamed: Streamed) -> AsyncIterator[str]:
    """The chat's chunks as they come (see the module's text)."""
    chunk = _Chunks(streamed)
    yield chunk([_choice(i, {"role": "assistant", "content": ""}) for i in range(streamed.choices)])
    sent = [""] * streamed.choices
    deadline = time.monotonic() + STREAM_SECONDS
    seen: dict[str, Any] | None = None
    try:
        while True:
            left = deadline - time.monotonic()
            call = await hold_until(
                max(min(KEEPALIVE_SECONDS, left), 0.0),
                streamed.look,
                _new_since(seen),
                streamed.wake(),
            )
            if call.finished:
                break
            if call.partial != seen:
                seen = call.partial
                deltas = _deltas(sent, list((seen or {}).get("texts") or []))
                if deltas:
                    yield chunk(deltas)
            elif time.monotonic() >= deadline:
                yield error_event(
                    ApiError(
                        503,
                        "executor_busy",
                        f"the chat still runs after {STREAM_SECONDS:.0f} s: the rest of its "
                        "answer will not be sent (ask for fewer tokens)",
                    )
                )
                return
            else:
                yield ": keep-alive\n\n"
        await streamed.forget(call)
        if call.status == CallStatus.FAILED:
            yield error_event(streamed.refusal(call))
            return
        if call.payload_dropped_at is not None:
            raise ApiError(
                503, "executor_failed", "the chat's answer was let go before it was read"
            )
        result = call.result or {}
        sequences = list(result.get("sequences") or [])
        rest = _deltas(sent, [str(s.get("text", "")) for s in sequences])
        if rest:
            yield chunk(rest)
        yield chunk(
            [
                _choice(i, {}, "stop" if s.get("stop_reason") == "stop" else "length")
                for i, s in enumerate(sequences)
            ]
        )
        if streamed.include_usage:
            prompt = int(result.get("prompt_tokens") or 0)
            completion = sum(len(s.get("tokens") or []) for s in sequences)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            yield chunk([], usage)
        yield sse("[DONE]")
    except _Resampled:
        yield error_event(
            ApiError(
                503,
                "executor_failed",
                "the chat's executor was lost while it streamed and the chat was sampled again: "
                "ask again",
            )
        )
    except ApiError as error:
        yield error_event(error)
