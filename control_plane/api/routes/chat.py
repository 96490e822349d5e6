"""`POST /v1/chat/completions`: OpenAI's chat completions on a base or one of the tenant's
fine-tuned adapters, answered by the interactive executors holding its base
(`control_plane.chat_completions`). The official `openai` SDK's
`client.chat.completions.create(model=job.fine_tuned_model, messages=[...])` works unchanged.

Offered: `messages` (system, developer, user and assistant; text content, or text parts),
`max_completion_tokens` (or the older `max_tokens`; 256 unless sent), `temperature`, `top_p`, `n`,
`seed`, `stop` (up to 4 strings, left out of the content as OpenAI leaves them), and `stream` (with
`stream_options.include_usage`): the reply sent as it is sampled (`chat_stream`), and `logprobs`
with `top_logprobs` (up to 20): each token of the reply's text with its logprob (the model's own,
before temperature and top_p, as vLLM gives them by default), its bytes and its likeliest
alternatives, streamed with the text they add; vLLM's `ignore_eos` (every token up to the
limit, past the end of turn: as load generators ask). Not offered, and refused by name rather
than ignored: tools, and every other field. The request is held until the executor answers (or,
streamed, until its first text): a chat no executor took within `TAKE_SECONDS` is withdrawn (503
`executor_busy` with `Retry-After`); one an executor runs is waited for up to `WAIT_SECONDS` in
all, under the openai SDK's own timeout (a stream has no such bound: it sends a comment while
nothing is new). Once read or withdrawn, the call's messages and answer are let go.
Past 450 lines: the calls' helpers here (ask, look, withdraw, abandon, begin a stream) are the
completions' routes' too (`completions`, `completion_streams`), so they stay beside the chat's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from control_plane import (
    audit,
    chat_completions,
    interactive,
    interactive_calls,
    interactive_polls,
)
from control_plane.api.deps import ServicesDep, Writer
from control_plane.api.errors import ApiError
from control_plane.api.openapi import refusals
from control_plane.api.routes import chat_stream
from control_plane.api.routes.chat_models import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionCreate,
    ChatCompletionMessage,
    ChatUsage,
    ChoiceLogprobs,
)
from control_plane.api.routes.completion_models import CompletionCreate
from control_plane.api.routes.tinker_futures import call_wakeup, hold_until
from control_plane.interactive import CallStatus
from control_plane.services import Services
from control_plane.tenants import Principal

router = APIRouter(prefix="/v1/chat", tags=["chat"])

# How long a chat waits for an executor to take it, and for its answer in all: under the openai
# SDK's own timeout (600 s), which would ask it again while it still ran.
TAKE_SECONDS = 300.0
WAIT_SECONDS = 540.0
# A streamed chat an executor took begins within this, text or not (a refusal as the executor
# reads the request comes sooner, and is the plain error): a proxy's idle timeout is longer.
FIRST_TEXT_SECONDS = 2.0
# While a chat waits for an executor, whether its client left is seen this often (a chat whose
# client left is withdrawn rather than sampled for no one).
CLIENT_CHECK_SECONDS = 1.0


def ask_all(
    services: Services,
    caller: Principal,
    model: str,
    requests: list[dict[str, Any]],
    purpose: str = "chat",
) -> list[chat_completions.Asked]:
    """Each request (a chat's, a completion's prompt's) asked of `model` in one transaction,
    an adapter's read written to its owner's log for `purpose`."""
    with services.engine.begin() as conn:
        try:
            asked = [
                chat_completions.ask(
                    conn, caller.tenant_id, model, one, services.settings.lease_seconds
                )
                for one in requests
            ]
        except chat_completions.ModelUnknown as unknown:
            raise ApiError(404, "model_not_found", str(unknown), "model") from None
        except chat_completions.NoExecutor as unserved:
            # Retrying in seconds does not start an executor: the SDK is told not to.
            headers = {"Retry-After": "30", "x-should-retry": "false"}
            raise ApiError(503, "no_executor", str(unserved), "model", headers=headers) from None
        if asked[0].weights is not None:
            audit.checkpoint_read(conn, caller, asked[0].weights, purpose)
    return asked


# What is asked as a stream: a chat, or a completion of one prompt.
StreamedBody = ChatCompletionCreate | CompletionCreate


def _ask(services: Services, caller: Principal, body: StreamedBody) -> chat_completions.Asked:
    if isinstance(body, CompletionCreate):
        return ask_all(services, caller, body.model, body.sample_requests(), "completion")[0]
    return ask_all(services, caller, body.model, [body.sample_request()])[0]


def _look(
    services: Services, tenant_id: str, call_id: str, past: list[int] | None = None
) -> interactive.CallRecord:
    """The chat's call; `past`: its reply so far's logprobs entries past those (`retrieve_past`)."""
    with services.engine.connect() as conn:
        try:
            if past is not None:
                return interactive.retrieve_past(conn, tenant_id, call_id, past)
            return interactive.retrieve(conn, tenant_id, call_id)
        except interactive.NotFound:  # its session's rows deleted meanwhile
            raise ApiError(503, "executor_failed", f"the chat's call {call_id} is gone") from None


def _withdraw(services: Services, tenant_id: str, asked: chat_completions.Asked) -> bool:
    """Fail the chat's call if no executor took it yet, its messages let go: whether it was."""
    call_id = asked.call_id
    with services.engine.begin() as conn:
        try:
            withdrawn = interactive.cancel(conn, tenant_id, call_id)
        except interactive.NotFound:
            raise ApiError(503, "executor_failed", f"the chat's call {call_id} is gone") from None
        if withdrawn:
            interactive_polls.forget(conn, tenant_id, asked.sampler_id, [call_id])
        return withdrawn


def _leave(services: Services, tenant_id: str, call_id: str) -> None:
    """A streamed chat whose client left: its executor stops sampling it."""
    with services.engine.begin() as conn:
        interactive_calls.leave_stream(conn, tenant_id, call_id)


def _forget(services: Services, tenant_id: str, call: interactive.CallRecord) -> None:
    """The answer is read: its messages and text are let go at once, not kept for the
    retention window (the call's row and usage stay)."""
    with services.engine.begin() as conn:
        interactive_polls.forget(conn, tenant_id, call.model_id, [call.id])


@router.post(
    "/completions",
    response_model=ChatCompletion,
    responses={
        **refusals(404, 503),
        200: {
            "description": "The chat completion; with `stream`, its chunks as server-sent events",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
    summary="Chat with a base or a fine-tuned adapter",
)
async def create_chat_completion(
    body: ChatCompletionCreate, request: Request, caller: Writer, services: ServicesDep
) -> Response | ChatCompletion:
    """OpenAI's chat completion, sampled by the executors that hold the model's base; with
    `stream`, sent as it is sampled (`chat_stream`)."""
    refuse_unoffered(body)
    if body.stream:
        return await stream_response(body, request, caller, services)
    return await complete(body, request, caller, services)


def refuse_unoffered(body: ChatCompletionCreate) -> None:
    """What the body's fields allow one by one but not together, refused by name."""
    chat_stream.refuse_options_without_stream(body.stream, body.stream_options)
    if body.top_logprobs and not body.logprobs:
        raise ApiError(
            400, "invalid_request", "top_logprobs is taken only with logprobs: true", "top_logprobs"
        )


async def _answered(
    request: Request, services: Services, tenant_id: str, call_id: str, seconds: float
) -> interactive.CallRecord:
    """The chat's call once finished, held up to `seconds` (woken by its finish)."""
    return await hold_until(
        seconds,
        lambda: _look(services, tenant_id, call_id),
        lambda found: found.finished,
        call_wakeup(request, call_id),
    )


async def _held_while_connected(
    request: Request,
    seconds: float,
    look: Callable[[], interactive.CallRecord],
    done: Callable[[interactive.CallRecord], bool],
    call_id: str,
    gone: Callable[[], Awaitable[bool]] | None = None,
) -> interactive.CallRecord:
    """`hold_until` in turns of at most CLIENT_CHECK_SECONDS, for up to `seconds`: what it found
    last, as soon as it is `done`, or once the client has left (`gone`, else
    `request.is_disconnected`)."""
    deadline = time.monotonic() + seconds
    while True:
        left = max(deadline - time.monotonic(), 0.0)
        found = await hold_until(
            min(CLIENT_CHECK_SECONDS, left), look, done, call_wakeup(request, call_id)
        )
        if done(found) or left <= CLIENT_CHECK_SECONDS or await (gone or request.is_disconnected)():
            return found


def _busy(what: str = "chat") -> ApiError:
    return ApiError(
        503,
        "executor_busy",
        f"no executor took the {what} within {TAKE_SECONDS:.0f} s, so it was withdrawn: "
        "ask again later",
        headers={"Retry-After": "30"},
    )


def _left(what: str = "chat") -> ApiError:
    """A chat withdrawn because its reader left (or the dashboard's key was revoked)."""
    return ApiError(
        503, "stream_ended", f"the {what} was withdrawn before an executor took it: its reader left"
    )


def _refusal(call: interactive.CallRecord) -> ApiError:
    """A failed call's error: the executor's refusal (400), or the platform's (503)."""
    error = call.error or {}
    message = str(error.get("error") or "the call failed")
    if error.get("category") == "user":
        return ApiError(400, "invalid_request", message)
    return ApiError(503, "executor_failed", message, headers={"Retry-After": "5"})


async def answer_of(
    request: Request,
    services: Services,
    tenant_id: str,
    asked: chat_completions.Asked,
    started: float,
    what: str = "chat",
) -> interactive.CallRecord:
    """An asked call (a `what`) once answered (at `started`, `time.monotonic()`), its payload
    let go: held while its client waits (withdrawn if no executor took it within TAKE_SECONDS,
    or its client left), up to WAIT_SECONDS in all; ApiError with its refusal otherwise."""
    call = await _held_while_connected(
        request,
        TAKE_SECONDS,
        lambda: _look(services, tenant_id, asked.call_id),
        lambda found: found.finished,
        asked.call_id,
    )
    if not call.finished:  # not taken in time, or its client left: withdrawn if not taken
        if await run_in_threadpool(_withdraw, services, tenant_id, asked):
            raise _busy(what)
        # An executor runs it (or just answered): its answer, while the client still waits.
        left = WAIT_SECONDS - (time.monotonic() - started)
        call = await _answered(request, services, tenant_id, asked.call_id, max(left, 0.0))
        if not call.finished:
            raise ApiError(
                503,
                "executor_busy",
                f"the {what} still runs after {WAIT_SECONDS:.0f} s: its answer will not be sent "
                "(ask for fewer tokens, or stream it)",
                headers={"Retry-After": "30", "x-should-retry": "false"},
            )
    await run_in_threadpool(_forget, services, tenant_id, call)
    if call.payload_dropped_at is not None:
        raise ApiError(503, "executor_failed", f"the {what}'s answer was let go before it was read")
    if call.status == CallStatus.FAILED:
        raise _refusal(call)
    return call


def _let_go(services: Services, tenant_id: str, asked: list[chat_completions.Asked]) -> None:
    with services.engine.begin() as conn:
        for one in asked:
            try:
                interactive.cancel(conn, tenant_id, one.call_id)
            except interactive.NotFound:  # its session's rows deleted meanwhile
                continue
            interactive_polls.forget(conn, tenant_id, one.sampler_id, [one.call_id])


async def withdraw_all(
    services: Services, tenant_id: str, asked: list[chat_completions.Asked]
) -> None:
    """Calls no longer waited for (another of their request's was refused, or their client
    left): each withdrawn if no executor took it yet, and its payload let go if it is over (one
    an executor still runs is let go by the retention)."""
    await run_in_threadpool(_let_go, services, tenant_id, asked)


async def complete(
    body: ChatCompletionCreate, request: Request, caller: Principal, services: Services
) -> ChatCompletion:
    """The chat asked and its answer once the executor gave it (the dashboard's too); ApiError
    with the refusal otherwise."""
    started = time.monotonic()
    asked = await run_in_threadpool(_ask, services, caller, body)
    call = await answer_of(request, services, caller.tenant_id, asked, started)
    return answer(body, call)


def answer(body: ChatCompletionCreate, call: interactive.CallRecord) -> ChatCompletion:
    """OpenAI's `chat.completion` of the chat's answered call (a batch's request's too)."""
    result = call.result or {}
    sequences = result.get("sequences") or []
    completion = sum(len(s.get("tokens") or []) for s in sequences)
    prompt = int(result.get("prompt_tokens") or 0)
    return ChatCompletion(
        id=f"chatcmpl-{call.id}",
        created=int(time.time()),
        model=body.model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatCompletionMessage(content=str(s.get("text", ""))),
                finish_reason="stop" if s.get("stop_reason") == "stop" else "length",
                logprobs=(
                    ChoiceLogprobs(content=s.get("content_logprobs")) if body.logprobs else None
                ),
            )
            for i, s in enumerate(sequences)
        ],
        usage=ChatUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
    )


async def stream_response(
    body: StreamedBody, request: Request, caller: Principal, services: Services
) -> Response:
    """The chat (or completion) asked, and once an executor took it, its chunks as they are
    sampled; what is refused before its first text is the plain error (`begin_stream`)."""
    streamed, call = await begin_stream(body, request, caller, services)
    return StreamingResponse(
        chat_stream.events(streamed, call),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _began(found: interactive.CallRecord) -> bool:
    """Whether a streamed chat has text to send (or is over)."""
    return found.finished or found.partial is not None


def _following(
    asked: chat_completions.Asked,
    body: StreamedBody,
    request: Request,
    services: Services,
    tenant_id: str,
    gone: Callable[[], Awaitable[bool]],
) -> chat_stream.Streamed:
    """How to follow an asked chat's stream."""

    def look() -> interactive.CallRecord:
        return _look(services, tenant_id, asked.call_id)

    def look_past(past: list[int]) -> interactive.CallRecord:
        return _look(services, tenant_id, asked.call_id, past)

    async def forget(found: interactive.CallRecord) -> None:
        await run_in_threadpool(_forget, services, tenant_id, found)

    async def leave() -> None:
        await run_in_threadpool(_leave, services, tenant_id, asked.call_id)

    text = isinstance(body, CompletionCreate)
    # A completion's `logprobs` is a count (0 asks too), a chat's a flag.
    entries = body.logprobs is not None if text else bool(body.logprobs)
    return chat_stream.Streamed(
        chunk_id=f"{'cmpl' if text else 'chatcmpl'}-{asked.call_id}",
        model=body.model,
        choices=body.n,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        look=look,
        look_past=look_past if entries else None,
        wake=lambda: call_wakeup(request, asked.call_id),
        forget=forget,
        leave=leave,
        disconnected=gone,
        refusal=_refusal,
        text=text,
    )


def abandon_asked(
    body: StreamedBody,
    request: Request,
    caller: Principal,
    services: Services,
    asked: chat_completions.Asked,
) -> None:
    """An asked chat (or a batch's prompt) no one will follow: withdrawn if no executor took it
    yet, else stopped and let go once answered (`chat_stream.abandon`)."""
    tenant_id = caller.tenant_id
    take_back = partial(run_in_threadpool, _withdraw, services, tenant_id, asked)
    streamed = _following(asked, body, request, services, tenant_id, request.is_disconnected)
    chat_stream.abandon(streamed, take_back)


async def begin_stream(
    body: StreamedBody,
    request: Request,
    caller: Principal,
    services: Services,
    *,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
    asked: chat_completions.Asked | None = None,
) -> tuple[chat_stream.Streamed, interactive.CallRecord]:
    """The chat asked (unless `asked`: a batch's prompt) and taken by an executor: how to
    follow it (`chat_stream.pieces`), and the call as it is now. What is refused before its
    first text, or within `FIRST_TEXT_SECONDS` of being taken (by the executor too, as it reads
    the request), is raised as the plain ApiError. `disconnected` says whether the stream's
    reader left (`request.is_disconnected` unless given). Cancelled (its reader went away: the
    dashboard's "Stop"), or failing while it waits, the chat is abandoned (`abandon_asked`), the
    ask itself included (run to its end, then abandoned)."""
    tenant_id = caller.tenant_id
    gone = disconnected or request.is_disconnected
    abandon = partial(abandon_asked, body, request, caller, services)
    if asked is None:
        asking = asyncio.ensure_future(run_in_threadpool(_ask, services, caller, body))
        try:
            asked = await asyncio.shield(asking)
        except asyncio.CancelledError:
            asking.add_done_callback(
                lambda done: (
                    None if done.cancelled() or done.exception() else abandon(done.result())
                )
            )
            raise
    streamed = _following(asked, body, request, services, tenant_id, gone)
    try:
        call = await _held_while_connected(
            request,
            TAKE_SECONDS,
            streamed.look,
            lambda found: _began(found) or found.status != CallStatus.PENDING,
            asked.call_id,
            gone,
        )
        if call.status == CallStatus.PENDING and await run_in_threadpool(
            _withdraw, services, tenant_id, asked
        ):
            raise _left(streamed.what) if await gone() else _busy(streamed.what)
        if not _began(call):
            call = await hold_until(
                FIRST_TEXT_SECONDS, streamed.look, _began, call_wakeup(request, asked.call_id)
            )
        if call.status == CallStatus.FAILED:  # refused as it was taken: the plain error
            await run_in_threadpool(_forget, services, tenant_id, call)
            raise _refusal(call)
    except ApiError:  # withdrawn, or refused and let go
        raise
    except BaseException:  # cancelled (its reader went away), or the wait failed
        abandon(asked)
        raise
    return streamed, call
