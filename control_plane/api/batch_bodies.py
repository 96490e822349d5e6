"""A batch's request bodies (`control_plane.batches`) as their endpoints take them: checked
when the batch is created and read again when each is asked and answered, by the very models,
checks and answer builders of `POST /v1/chat/completions` and `POST /v1/completions`, so a
batch's line is refused, asked and answered exactly as the same request sent alone."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from control_plane.api.errors import ApiError
from control_plane.api.routes import chat, completions
from control_plane.api.routes.chat_models import ChatCompletionCreate
from control_plane.api.routes.completion_models import CompletionCreate
from control_plane.interactive import CallRecord

Body = ChatCompletionCreate | CompletionCreate


def parse(endpoint: str, body: dict[str, Any]) -> Body:
    """A request's body as its endpoint takes it; ApiError (400) naming what is refused."""
    try:
        if endpoint == "/v1/chat/completions":
            chat_body = ChatCompletionCreate.model_validate(body)
            chat.refuse_unoffered(chat_body)
            parsed: Body = chat_body
        else:
            completion_body = CompletionCreate.model_validate(body)
            completions.refuse_unoffered(completion_body)
            parsed = completion_body
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ApiError(400, "invalid_request", f"{where}: {first['msg']}", where) from None
    if parsed.stream:
        raise ApiError(
            400,
            "invalid_request",
            "stream is not taken in a batch: its answers are written to its output file",
            "stream",
        )
    return parsed


def sample_requests(body: Body) -> list[dict[str, Any]]:
    """The executor's calls of the request: a chat's one, a completion's one a prompt."""
    if isinstance(body, CompletionCreate):
        return body.sample_requests()
    return [body.sample_request()]


def answer(body: Body, calls: list[CallRecord]) -> dict[str, Any]:
    """The request's answer as its endpoint answers it, from its answered calls."""
    if isinstance(body, CompletionCreate):
        return completions.answer(body, calls).model_dump(mode="json")
    return chat.answer(body, calls[0]).model_dump(mode="json")
