"""`POST /v1/chat/completions`: OpenAI's chat completions on a base or one of the tenant's
fine-tuned adapters, answered by the interactive executors holding its base
(`control_plane.chat_completions`). The official `openai` SDK's
`client.chat.completions.create(model=job.fine_tuned_model, messages=[...])` works unchanged.

Offered: `messages` (system, developer, user and assistant; text content, or text parts),
`max_completion_tokens` (or the older `max_tokens`; 256 unless sent), `temperature`, `top_p`,
`n`, `seed`, `stop` (up to 4 strings, left out of the content as OpenAI leaves them). Not
offered, and refused by name rather than ignored: streaming, tools, logprobs and every other
field. The request is held until the executor answers, up to `WAIT_SECONDS`; past that the chat
is withdrawn if no executor took it yet, and the answer is 503 with `Retry-After`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from control_plane import audit, chat_completions, interactive
from control_plane.api.deps import ServicesDep, Writer
from control_plane.api.errors import ApiError
from control_plane.api.openapi import refusals
from control_plane.api.routes.tinker_futures import call_wakeup, hold_until
from control_plane.interactive import CallStatus
from control_plane.services import Services
from control_plane.tenants import Principal

router = APIRouter(prefix="/v1/chat", tags=["chat"])

# How long a chat is held for its executor's answer (a CPU base samples a few tokens a second).
WAIT_SECONDS = 300.0
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS = 4096


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=64)

    def plain(self) -> dict[str, str]:
        """The message as a chat template takes it: a developer's as a system message, text
        parts joined."""
        content = self.content
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionCreate(_Body):
    model: str = Field(min_length=1, max_length=200, description="a base or `adapter@version`")
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS, deprecated=True)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)] | None = (
        None
    )
    stream: Literal[False] | None = Field(
        default=None, description="streaming is not offered: leave it unset or false"
    )
    user: str | None = Field(default=None, max_length=256)

    def sample_request(self) -> dict[str, Any]:
        """The executor's chat call: the messages and SamplingParams of a sample."""
        limit = self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS
        params: dict[str, Any] = {"max_tokens": limit}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.seed is not None:
            params["seed"] = self.seed
        if self.stop is not None:
            params["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        messages = [m.plain() for m in self.messages]
        return {"messages": messages, "num_samples": self.n, "sampling_params": params}


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    system_fingerprint: None = None


def _ask(
    services: Services, caller: Principal, body: ChatCompletionCreate
) -> chat_completions.Asked:
    with services.engine.begin() as conn:
        try:
            asked = chat_completions.ask(
                conn,
                caller.tenant_id,
                body.model,
                body.sample_request(),
                services.settings.lease_seconds,
            )
        except chat_completions.ModelUnknown as unknown:
            raise ApiError(404, "model_not_found", str(unknown), "model") from None
        except chat_completions.NoExecutor as unserved:
            raise ApiError(
                503, "no_executor", str(unserved), "model", headers={"Retry-After": "30"}
            ) from None
        if asked.weights is not None:
            audit.checkpoint_read(conn, caller, asked.weights, "chat")
    return asked


def _look(services: Services, tenant_id: str, call_id: str) -> interactive.CallRecord:
    with services.engine.connect() as conn:
        return interactive.retrieve(conn, tenant_id, call_id)


def _withdraw(services: Services, tenant_id: str, call_id: str) -> None:
    with services.engine.begin() as conn:
        interactive.cancel(conn, tenant_id, call_id)


@router.post(
    "/completions",
    response_model=ChatCompletion,
    responses=refusals(404, 503),
    summary="Chat with a base or a fine-tuned adapter",
)
async def create_chat_completion(
    body: ChatCompletionCreate, request: Request, caller: Writer, services: ServicesDep
) -> ChatCompletion:
    """OpenAI's chat completion, sampled by the executors that hold the model's base."""
    return await complete(body, request, caller, services)


async def complete(
    body: ChatCompletionCreate, request: Request, caller: Principal, services: Services
) -> ChatCompletion:
    """The chat asked and its answer once the executor gave it (the dashboard's too); ApiError
    with the refusal otherwise."""
    asked = await run_in_threadpool(_ask, services, caller, body)
    call = await hold_until(
        WAIT_SECONDS,
        lambda: _look(services, caller.tenant_id, asked.call_id),
        lambda found: found.finished,
        call_wakeup(request, asked.call_id),
    )
    if not call.finished:
        await run_in_threadpool(_withdraw, services, caller.tenant_id, asked.call_id)
        raise ApiError(
            503,
            "executor_busy",
            f"no executor answered within {WAIT_SECONDS:.0f} s; ask again later",
            headers={"Retry-After": "30"},
        )
    if call.status == CallStatus.FAILED:
        error = call.error or {}
        message = str(error.get("error") or "the chat failed")
        if error.get("category") == "user":
            raise ApiError(400, "invalid_request", message)
        raise ApiError(503, "executor_failed", message, headers={"Retry-After": "5"})
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
            )
            for i, s in enumerate(sequences)
        ],
        usage=ChatUsage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
    )
