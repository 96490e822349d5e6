"""The adapter page's "Try it" box: a writer sends a message (and an optional system message) to
one of the adapter's versions and, to compare, to the version's base, both asked at once
through `POST /v1/chat/completions`' own function (`chat.complete`: the same executors, the
same metering and audit, the same refusals); the answer goes under the form, which keeps what
was typed.

The page's script asks for the replies as they are sampled (`Accept: application/x-ndjson`):
one JSON object a line, `answers` first (the fragment, each side either refused already or
waiting for its text), then each side's new `text` as the executor writes it
(`chat_stream.pieces`, the API's own stream), each side's whole `answer` once it ends (the
fragment's article for it, finish reason and tokens), and `end`; a blank line while nothing is
new. Its "Stop" closes the request, which stops the executor's sampling as a streamed chat's
client leaving does. Without the script, the form's post answers the whole fragment at once.

Each reply shows its text as the API answers it, its finish reason and its tokens; asked with
"Token probabilities", also each token of its text with how likely the model found it and the
likeliest tokens in its place (the chat's `logprobs`, `top_logprobs` 5; streamed, they come with
the text they add: `chat_stream.pieces`). A refusal
(no executor holds the base, the executor's own reason, a model gone) is its message in the
fragment, as a form field the route cannot take is its label and why: nothing is asked then.
Both are 200, as the new-job page's dataset panel is, so htmx swaps them in. A reader's post is
the 403 page: the page shows a reader no form.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import FormData

from control_plane import registry
from control_plane.api.deps import ServicesDep, require_writer
from control_plane.api.errors import ApiError, describe_validation_errors
from control_plane.api.routes import chat, chat_stream
from control_plane.api.routes.chat_models import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionCreate,
    ChatCompletionMessage,
    ChatUsage,
    ChoiceLogprobs,
)
from control_plane.dashboard.render import PageForbidden, PageNotFound, fragment, render
from control_plane.dashboard.sessions import CheckedSession, stream_gone
from control_plane.services import Services
from control_plane.tenants import Principal

router = APIRouter()
log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 64
TOP_LOGPROBS = 5  # the likeliest tokens shown beside each of a reply's, asked for probabilities
MAX_TOKENS = 512
TEXT_MAX = 20_000  # characters of a message or a system message

LABELS = {
    "version": "Version",
    "message": "Message",
    "system": "System message",
    "max_tokens": "Max tokens",
    "temperature": "Temperature",
}
# What a field takes, said instead of the parser's words where those would be about types.
TAKES = {
    "version": "choose one of the adapter's versions",
    "max_tokens": f"a whole number from 1 to {MAX_TOKENS}",
    "temperature": "a number from 0 to 2 (0: always the likeliest token)",
}

Side = Literal["adapter", "base"]
STREAMED = "application/x-ndjson"  # what the page's script asks for: the replies as sampled


class TryForm(BaseModel):
    """The box's fields as the form sends them (text; the checkbox present when checked)."""

    model_config = ConfigDict(extra="ignore")

    version: int = Field(ge=1, le=registry.MAX_VERSION)
    message: str = Field(max_length=TEXT_MAX)
    system: str = Field(default="", max_length=TEXT_MAX)
    max_tokens: int = Field(ge=1, le=MAX_TOKENS)
    temperature: float = Field(ge=0, le=2, allow_inf_nan=False)
    compare: bool = False
    probabilities: bool = False  # each reply's tokens with how likely each was

    @field_validator("message")
    @classmethod
    def _typed(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("type the message to send")
        return value

    def messages(self) -> list[dict[str, str]]:
        said = [{"role": "user", "content": self.message}]
        if self.system.strip():
            return [{"role": "system", "content": self.system}, *said]
        return said


@dataclass(frozen=True)
class Answer:
    """One side's reply, or why there is none; streamed, what was sampled before it ended
    (`text`) or that it is still sampled (`sampling`)."""

    side: Side
    model: str
    completion: ChatCompletion | None = None
    refusal: ApiError | None = None
    sampling: bool = False
    text: str = ""


def _text(form: FormData, name: str) -> str:
    """A field's text, line breaks as `\\n` (a browser sends a textarea's as CRLF)."""
    value = form.get(name)
    return value.replace("\r\n", "\n") if isinstance(value, str) else ""


def _read(form: FormData) -> tuple[TryForm | None, list[tuple[str, str]]]:
    """The form, or each refused field's label and why."""
    fields: dict[str, Any] = {name: _text(form, name) for name in LABELS}
    for name in ("version", "max_tokens", "temperature"):
        fields[name] = fields[name].strip()
    fields["compare"] = form.get("compare") is not None
    fields["probabilities"] = form.get("probabilities") is not None
    try:
        return TryForm.model_validate(fields), []
    except ValidationError as invalid:
        errors = []
        for error in invalid.errors():
            name = str(error["loc"][0]) if error["loc"] else ""
            why = TAKES.get(name) or str(error["msg"]).removeprefix("Value error, ")
            errors.append((LABELS.get(name, name), why))
        return None, errors


def _version(
    services: Services, tenant_id: str, name: str, number: int | None
) -> registry.AdapterVersionRecord | None:
    """The adapter's version `number` (None: it has none); RegistryError where the tenant has
    no such adapter."""
    with services.engine.connect() as conn:
        registry.get_adapter(conn, tenant_id, name)
        if number is None:
            return None
        try:
            return registry.resolve_version(conn, tenant_id, name, number)
        except registry.VersionNotFoundError:
            return None


_FAILED = ApiError(503, "executor_failed", "the chat failed on the server: try again")


async def _answer(
    side: Side,
    body: ChatCompletionCreate,
    request: Request,
    caller: Principal,
    services: Services,
) -> Answer:
    try:
        completion = await chat.complete(body, request, caller, services)
    except ApiError as refused:
        return Answer(side, body.model, refusal=refused)
    except Exception:  # the other side's answer still shows; this one says it failed
        log.exception("the Try it box's %s chat of %s failed", side, body.model)
        return Answer(side, body.model, refusal=_FAILED)
    return Answer(side, body.model, completion=completion)


@router.post("/adapters/{name}/try")
async def try_adapter(
    name: str, request: Request, session: CheckedSession, services: ServicesDep
) -> Response:
    """Ask the chosen version (and, to compare, its base) the form's chat; the replies."""
    try:
        caller = require_writer(session.principal)
    except ApiError as exc:
        raise PageForbidden(
            f"Trying an adapter needs a member or admin key. {exc.message}"
        ) from None
    asked, errors = _read(await request.form())
    number = asked.version if asked is not None else None
    try:
        version = await run_in_threadpool(_version, services, caller.tenant_id, name, number)
    except registry.RegistryError:
        raise PageNotFound() from None
    if asked is None or version is None:
        if asked is not None:
            errors = [(LABELS["version"], f"{name} has no version {number}: reload the page")]
        return fragment("_try_result.html", errors=errors, answers=[])
    sides: list[tuple[Side, str]] = [("adapter", version.model_id)]
    if asked.compare:
        sides.append(("base", version.base_model_name))
    streams = STREAMED in request.headers.get("accept", "")
    try:
        bodies = [
            (
                side,
                ChatCompletionCreate.model_validate(
                    {
                        "model": model,
                        "messages": asked.messages(),
                        "max_completion_tokens": asked.max_tokens,
                        "temperature": asked.temperature,
                        **(
                            {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
                            if asked.probabilities
                            else {}
                        ),
                        **(
                            {"stream": True, "stream_options": {"include_usage": True}}
                            if streams
                            else {}
                        ),
                    }
                ),
            )
            for side, model in sides
        ]
    except ValidationError as invalid:
        message, _ = describe_validation_errors(invalid.errors())
        return fragment("_try_result.html", errors=[("Request", message)], answers=[])
    if streams:
        followed = _Followed(request, caller, services, stream_gone(services, session, request))
        return StreamingResponse(
            followed.lines(bodies, asked.compare),
            media_type=STREAMED,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
    answers = await asyncio.gather(
        *(_answer(side, body, request, caller, services) for side, body in bodies)
    )
    return fragment("_try_result.html", errors=[], answers=answers, compared=asked.compare)


_ENDED = object()  # a side's pieces are over


def _line(event: str, **data: Any) -> str:
    return json.dumps({"event": event, **data}) + "\n"


class _Reply:
    """What a side's stream said so far: its text, finish reason, usage, or its error."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.side = answer.side
        self.id = ""
        self.text = ""
        self.finish: str | None = None
        self.usage: dict[str, int] | None = None
        self.error: ApiError | None = None
        self.logprobs: ChoiceLogprobs | None = None  # the entries of every chunk, in order
        self.unreadable = False  # a chunk's entries did not validate: none are shown

    def read(self, piece: dict[str, Any]) -> str:
        """A chunk taken in: its new text."""
        self.id = str(piece.get("id") or self.id)
        if piece.get("usage"):
            self.usage = piece["usage"]
        new = ""
        for choice in piece.get("choices") or []:
            new += str(choice.get("delta", {}).get("content") or "")
            self.finish = choice.get("finish_reason") or self.finish
            if choice.get("logprobs") and not self.unreadable:
                try:
                    read = ChoiceLogprobs.model_validate(choice["logprobs"])
                except ValidationError:  # the reply still shows, without any of them
                    log.warning("a Try it reply's logprobs could not be read")
                    self.logprobs, self.unreadable = None, True
                    continue
                if self.logprobs is None:
                    self.logprobs = read
                elif self.logprobs.content is not None:
                    self.logprobs.content.extend(read.content or [])
        self.text += new
        return new

    def ended(self) -> Answer:
        if self.finish is None or self.usage is None or self.error is not None:
            error = self.error or ApiError(
                503,
                "stream_ended",
                "the reply stopped before its end (the connection, or the page's sign-in, "
                "ended): ask again",
            )
            return replace(self.answer, sampling=False, refusal=error, text=self.text)
        completion = ChatCompletion(
            id=self.id,
            created=int(time.time()),
            model=self.answer.model,
            choices=[
                ChatChoice(
                    index=0,
                    message=ChatCompletionMessage(content=self.text),
                    finish_reason="stop" if self.finish == "stop" else "length",
                    logprobs=self.logprobs,
                )
            ],
            usage=ChatUsage.model_validate(self.usage),
        )
        return replace(self.answer, sampling=False, completion=completion)


@dataclass(frozen=True)
class _Followed:
    """The box's answer as it is sampled (see the module's text): each side asked and followed
    at once, through the API's own stream, so one side's text shows while the other waits."""

    request: Request
    caller: Principal
    services: Services
    gone: Callable[[], Awaitable[bool]]

    async def _follow(
        self,
        reply: _Reply,
        body: ChatCompletionCreate,
        heard: asyncio.Queue[tuple[_Reply, chat_stream.Piece | object]],
    ) -> None:
        try:
            try:
                streamed, first = await chat.begin_stream(
                    body, self.request, self.caller, self.services, disconnected=self.gone
                )
            except ApiError as refused:
                reply.error = refused
                return
            except Exception:
                log.exception("the Try it box's %s chat of %s failed", reply.side, body.model)
                reply.error = _FAILED
                return
            async with aclosing(chat_stream.pieces(streamed, first)) as followed:
                async for piece in followed:
                    heard.put_nowait((reply, piece))
        finally:
            heard.put_nowait((reply, _ENDED))

    async def lines(
        self, bodies: list[tuple[Side, ChatCompletionCreate]], compared: bool
    ) -> AsyncIterator[str]:
        replies = [_Reply(Answer(side, body.model, sampling=True)) for side, body in bodies]
        answers = [reply.answer for reply in replies]
        html = render("_try_result.html", errors=[], answers=answers, compared=compared)
        yield _line("answers", html=html)
        heard: asyncio.Queue[tuple[_Reply, chat_stream.Piece | object]] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._follow(reply, body, heard))
            for reply, (_, body) in zip(replies, bodies, strict=True)
        ]
        try:
            following = len(tasks)
            while following:
                try:
                    reply, piece = await asyncio.wait_for(
                        heard.get(), chat_stream.KEEPALIVE_SECONDS
                    )
                except TimeoutError:  # nothing heard from any side: the connection kept open
                    yield "\n"
                    continue
                # A side's own keep-alive turn (None) and its DONE need nothing here: the wait
                # above keeps the connection open for every side at once.
                if piece is _ENDED:
                    following -= 1
                    html = render("_try_answer.html", a=reply.ended())
                    yield _line("answer", side=reply.side, html=html)
                elif isinstance(piece, ApiError):
                    reply.error = piece
                elif isinstance(piece, dict) and (new := reply.read(piece)):
                    yield _line("text", side=reply.side, text=new)
            yield _line("end")
        finally:  # the page stopped it, or left: each side's chat withdrawn or stopped
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
