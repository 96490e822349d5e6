"""`POST /v1/completions`: OpenAI's legacy text completions on a base or one of the tenant's
fine-tuned adapters, as vLLM serves them, answered by the interactive executors that hold the
base (`workers.interactive.completion`). The official `openai` SDK's
`client.completions.create(model=job.fine_tuned_model, prompt=...)` works unchanged, and so does
lm-evaluation-harness's `local-completions` model: its loglikelihood requests (token ids,
`echo`, `max_tokens` 0 or 1, `logprobs` 1) score a prompt's tokens one by one.

Offered: `prompt` (text, which the executor tokenizes with the base's tokenizer, or token ids;
a batch of up to 32 of either, each a call of its own, asked at once, so the executors batch
them, and awaited together), `max_tokens` (16 unless sent; 0 with `echo`: the prompt scored,
nothing sampled), `temperature`, `top_p`, `top_k` (vLLM's), `n`, `seed`, `stop` (up to 16
strings: lm-evaluation-harness sends a task's and the base's end), `logprobs` (0 to 20), `echo`,
vLLM's `ignore_eos` (every token up to `max_tokens`, past the base's end of sequence: replies of
a known length, as load generators ask them) and `stream` (with `stream_options.include_usage`):
the text sent as it is sampled, `text_completion` chunks as OpenAI and vLLM stream them (the
echoed prompt first), which vLLM's benchmark client times the first token by; with `logprobs`,
each chunk carries the legacy lists of the tokens sampled since the one before
(`stream_deltas.text_entry_deltas`), and every chunk's lists joined are the answer's whole; a
batch of prompts streams its prompts' chunks interleaved (`completion_streams`). Choices come
prompt by prompt, `n` each (`index` = prompt's place * n + the sample's). Not offered, and
refused by name rather than ignored: `suffix`, `best_of` above 1, `logit_bias`, penalties
(vLLM's `repetition_penalty` taken at 1, as its benchmark client sends it). A model is found
and waited for as a chat's (`chat.answer_of`), and metered as one (the prompt's tokens and those
sampled), in the tenant's chat session; a prompt refused withdraws the batch's others.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from control_plane import interactive
from control_plane.api.deps import ServicesDep, Writer
from control_plane.api.errors import ApiError
from control_plane.api.openapi import refusals
from control_plane.api.routes import chat, chat_stream, completion_streams
from control_plane.api.routes.chat_models import ChatUsage
from control_plane.api.routes.completion_models import (
    Completion,
    CompletionChoice,
    CompletionCreate,
    CompletionLogprobs,
)

router = APIRouter(prefix="/v1", tags=["chat"])


@router.post(
    "/completions",
    response_model=Completion,
    responses={
        **refusals(404, 503),
        200: {
            "description": "The completion; with `stream`, its chunks as server-sent events",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    },
    summary="Complete text with a base or a fine-tuned adapter",
)
async def create_completion(
    body: CompletionCreate, request: Request, caller: Writer, services: ServicesDep
) -> Response | Completion:
    """OpenAI's legacy completion, sampled by the executors that hold the model's base; with
    `stream`, sent as it is sampled (`chat_stream`)."""
    refuse_unoffered(body)
    if body.stream and len(body.prompts()) > 1:
        return await completion_streams.stream_response(body, request, caller, services)
    if body.stream:
        return await chat.stream_response(body, request, caller, services)
    started = time.monotonic()
    requests = body.sample_requests()
    asked = await run_in_threadpool(
        chat.ask_all, services, caller, body.model, requests, "completion"
    )
    # Asked at once (the executors batch them) and awaited together, each within the chat's
    # bounds from the request's start; the first refusal ends the wait for the others.
    waits = [
        asyncio.ensure_future(
            chat.answer_of(request, services, caller.tenant_id, one, started, what="completion")
        )
        for one in asked
    ]
    try:
        calls = await asyncio.gather(*waits)
    except BaseException:  # a refusal, or its client left: the rest are not waited for
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await asyncio.shield(chat.withdraw_all(services, caller.tenant_id, asked))
        raise
    return answer(body, calls)


def answer(body: CompletionCreate, calls: list[interactive.CallRecord]) -> Completion:
    """OpenAI's `text_completion` of a completion's answered calls, one a prompt in the
    prompts' order (a batch's request's too)."""
    choices, prompt, completion = [], 0, 0
    for place, call in enumerate(calls):
        result = call.result or {}
        prompt += int(result.get("prompt_tokens") or 0)
        completion += int(result.get("completion_tokens") or 0)
        for k, sequence in enumerate(result.get("sequences") or []):
            logprobs = sequence.get("logprobs")
            choices.append(
                CompletionChoice(
                    index=place * body.n + k,
                    text=str(sequence.get("text", "")),
                    logprobs=None if logprobs is None else CompletionLogprobs(**logprobs),
                    finish_reason=sequence.get("finish_reason") or "length",
                )
            )
    return Completion(
        id=f"cmpl-{calls[0].id}",
        created=int(time.time()),
        model=body.model,
        choices=choices,
        usage=ChatUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
    )


def refuse_unoffered(body: CompletionCreate) -> None:
    """What the body's fields allow one by one but not together, refused by name."""
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(
            400,
            "invalid_request",
            "max_tokens 0 samples nothing: it is taken only with echo: true (the prompt scored)",
            "max_tokens",
        )
    chat_stream.refuse_options_without_stream(body.stream, body.stream_options)
