"""A text completion of several prompts streamed (`POST /v1/completions` with `stream: true` and a
batch of prompts), as vLLM streams one: each prompt is a call of its own, all asked in one
transaction so the executors batch them, and each followed as a single prompt's stream is
(`chat.begin_stream`, `chat_stream.pieces`); their chunks are sent as they come, interleaved,
under one id, each choice's `index` its prompt's place * `n` + its own (as the batch answered
whole numbers them). The stream begins once every prompt began (an executor took it and it has
text, or 2 s passed), so a prompt no executor takes within the chat's `TAKE_SECONDS` is the
request's 503, as it is when the batch is answered whole. With `stream_options.include_usage`,
one last chunk carries the usage of every prompt summed; `data: [DONE]` ends the stream once
every prompt's has ended.

What is refused before any prompt's first text (a prompt past the base's context, a model no
executor holds) is the plain JSON error, and the batch's other prompts are withdrawn, or stopped
and let go where an executor took them; an error after the stream began ends it for every prompt
(the others stopped and let go as a stream whose client left is).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from control_plane.api.errors import ApiError
from control_plane.api.routes import chat, chat_stream
from control_plane.api.routes.completion_models import CompletionCreate
from control_plane.chat_completions import Asked
from control_plane.interactive import CallRecord
from control_plane.services import Services
from control_plane.tenants import Principal

_ENDED = object()  # a prompt's pieces are over


async def stream_response(
    body: CompletionCreate, request: Request, caller: Principal, services: Services
) -> Response:
    """Every prompt asked in one transaction (`chat.ask_all`, as the batch answered whole is) and,
    once every one began, their chunks as they are sampled."""
    bodies = [
        body.model_copy(update={"prompt": one.get("text", one.get("tokens"))})
        for one in body.prompts()
    ]
    requests = body.sample_requests()
    asking = asyncio.ensure_future(
        run_in_threadpool(chat.ask_all, services, caller, body.model, requests, "completion")
    )

    def abandon(one: CompletionCreate, call: Asked) -> None:
        chat.abandon_asked(one, request, caller, services, call)

    def abandon_all(done: asyncio.Future[list[Asked]]) -> None:
        if not done.cancelled() and done.exception() is None:
            for one, call in zip(bodies, done.result(), strict=True):
                abandon(one, call)

    try:
        asked = await asyncio.shield(asking)
    except asyncio.CancelledError:  # its client left while they were asked: each abandoned
        asking.add_done_callback(abandon_all)
        raise
    begins = [
        asyncio.ensure_future(chat.begin_stream(one, request, caller, services, asked=call))
        for one, call in zip(bodies, asked, strict=True)
    ]

    async def let_go() -> None:
        """Every prompt, once one was refused (or the client left): those that began stopped,
        those whose wait was cancelled (before it began too, when it could not) abandoned; a
        refused one let itself go."""
        for begin in begins:
            begin.cancel()
        found = await asyncio.gather(*begins, return_exceptions=True)
        for one, call, outcome in zip(bodies, asked, found, strict=True):
            if isinstance(outcome, tuple):
                chat_stream.stop(outcome[0])
            elif isinstance(outcome, asyncio.CancelledError):
                abandon(one, call)  # abandoning twice withdraws or stops it once

    try:
        begun = await asyncio.gather(*begins)
    except BaseException:
        await asyncio.shield(let_go())  # done whole though this request is cancelled again
        raise
    chunk_id = begun[0][0].chunk_id
    followed = [
        (dataclasses.replace(streamed, chunk_id=chunk_id), call) for streamed, call in begun
    ]
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _merged(followed, body.n, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _merged(
    followed: list[tuple[chat_stream.Streamed, CallRecord]], n: int, include_usage: bool
) -> AsyncIterator[str]:
    """Every prompt's chunks as server-sent events as they come, renumbered (prompt's place * n +
    the choice's own), their usage summed in one last chunk, `data: [DONE]` once every prompt's
    stream ended whole; an error from any ends them all."""
    pieces: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    created = int(time.time())

    async def pump(place: int, streamed: chat_stream.Streamed, first: CallRecord) -> None:
        try:
            async with aclosing(chat_stream.pieces(streamed, first)) as given:
                async for piece in given:
                    pieces.put_nowait((place, piece))
        finally:  # however it ended, the merge stops waiting on it
            pieces.put_nowait((place, _ENDED))

    pumps = [
        asyncio.ensure_future(pump(place, streamed, first))
        for place, (streamed, first) in enumerate(followed)
    ]
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    last: dict[str, Any] | None = None  # the last usage chunk, for its shape
    running, whole = len(pumps), 0
    try:
        while running:
            place, piece = await pieces.get()
            if piece is _ENDED:
                running -= 1
            elif piece is None:
                yield ": keep-alive\n\n"
            elif isinstance(piece, ApiError):
                yield chat_stream.error_event(piece)
                return
            elif piece == chat_stream.DONE:
                whole += 1
            elif not piece["choices"] and piece.get("usage"):
                last = piece
                for key in usage:
                    usage[key] += int(piece["usage"][key])
            else:
                for choice in piece["choices"]:
                    choice["index"] += place * n
                yield chat_stream.sse({**piece, "created": created})
        if whole < len(pumps):  # a prompt's stream ended early (its client left)
            return
        if include_usage and last is not None:
            yield chat_stream.sse({**last, "created": created, "usage": usage})
        yield chat_stream.sse(chat_stream.DONE)
    finally:  # ended, failed or left: the prompts still streaming are stopped and let go
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
