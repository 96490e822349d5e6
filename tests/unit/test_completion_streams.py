"""A batch of prompts streamed (`completion_streams`), each prompt's stream played from looks as
`test_chat_stream` plays one: chunks interleaved under their batch index, one usage summed
last, `[DONE]` once every prompt's stream ended whole; an error from one prompt ends them all,
the others stopped and let go; a prompt refused before any text stops the prompts that began."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from control_plane.api.errors import ApiError
from control_plane.api.routes import completion_streams
from control_plane.api.routes.chat_stream import Streamed
from control_plane.api.routes.completion_models import CompletionCreate
from control_plane.interactive import CallRecord
from tests.unit.test_chat_stream import _call, _played


def _completed(text: str, tokens: int) -> CallRecord:
    whole = _call("completed", whole=text)
    assert whole.result is not None
    whole.result["sequences"] = [{"text": text, "finish_reason": "stop"}]
    whole.result["completion_tokens"] = tokens
    return whole


def _prompt(text: str, tokens: int, gone: bool = False) -> tuple[Streamed, list[str]]:
    streamed, did = _played([_completed(text, tokens)], gone=gone)
    return dataclasses.replace(streamed, text=True), did


async def _merged(followed: list[tuple[Streamed, CallRecord]], n: int = 1) -> list[Any]:
    sent = [e async for e in completion_streams._merged(followed, n, include_usage=True)]
    await asyncio.sleep(0.2)  # what a stream that ended early leaves to a task of the loop
    return [json.loads(s.removeprefix("data: ")) if s.startswith("data: {") else s for s in sent]


def test_every_prompts_chunks_come_under_their_batch_index_with_one_usage_and_done_last() -> None:
    (first, did_first), (second, did_second) = _prompt("Hello", 2), _prompt("Bye", 3)
    sent = asyncio.run(
        _merged(
            [(first, _call("running", partial="Hel")), (second, _call("running", partial="B"))],
            n=2,
        )
    )
    texts: dict[int, str] = {}
    for chunk in sent[:-2]:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "Hello", 2: "Bye"}  # the second prompt's first choice: 1 * n + 0
    assert [c["usage"] for c in sent[:-1]].count(None) == len(sent) - 2
    assert sent[-2]["choices"] == [] and sent[-2]["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 5,
        "total_tokens": 11,
    }
    assert sent[-1] == "data: [DONE]\n\n"
    assert did_first == did_second == ["forget"]


def test_an_error_from_one_prompt_ends_the_stream_and_stops_the_others() -> None:
    failing, _ = _prompt("x", 1)

    def failed() -> CallRecord:
        return dataclasses.replace(_call("failed"), error={"message": "boom"})

    failing = dataclasses.replace(failing, look=failed)
    waiting, did = _played([_call("running", partial="So")], gone=False)
    waiting = dataclasses.replace(waiting, text=True)
    sent = asyncio.run(
        _merged([(waiting, _call("running", partial="S")), (failing, _call("running"))])
    )
    assert sent[-1]["error"]["code"] == "executor_failed"
    assert "data: [DONE]\n\n" not in sent
    assert did == ["leave"]  # stopped; let go once answered (it never is here)


def test_a_stream_whose_client_left_ends_without_done_and_stops_every_prompt() -> None:
    (first, did_first), (second, did_second) = (
        _prompt("Hello", 2, gone=True),
        _prompt("Bye", 3, gone=True),
    )
    sent = asyncio.run(
        _merged([(first, _call("running", partial="H")), (second, _call("running", partial="B"))])
    )
    assert "data: [DONE]\n\n" not in sent and not any(
        isinstance(c, dict) and c.get("usage") for c in sent
    )
    assert did_first == did_second == ["leave", "forget"]  # stopped, let go once answered


class _Batch:
    """`chat`'s side of a streamed batch, played: one ask for every prompt (`ask_all`, which
    waits for `asking` to be set), each call's begin (`begin_stream`: "refused" is refused after
    the first began, "untaken" waits for an executor until cancelled), and what each prompt no one
    will follow went through (`withdraw`, through `chat.abandon_asked`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.began, self.did = _prompt("Hello", 2)
        self.asks: list[list[str]] = []
        self.asking = threading.Event()
        self.asking.set()
        self.cancelled: list[str] = []
        self.withdrawn: list[str] = []
        for name in ("ask_all", "begin_stream", "_following", "_withdraw"):
            monkeypatch.setattr(completion_streams.chat, name, getattr(self, name.lstrip("_")))

    def ask_all(self, services: Any, caller: Any, model: str, requests: Any, purpose: str) -> Any:
        assert self.asking.wait(10)
        self.asks.append([r["completion"]["text"] for r in requests])
        return [f"call-{r['completion']['text']}" for r in requests]

    async def begin_stream(
        self, body: CompletionCreate, *args: Any, asked: str, **kwargs: Any
    ) -> tuple[Streamed, CallRecord]:
        assert asked == f"call-{body.prompt}"  # each follows its own call
        if body.prompt == "refused":
            await asyncio.sleep(0.05)  # after the first prompt began
            raise ApiError(400, "invalid_request", "the prompt is longer than the context")
        if body.prompt == "untaken":
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.append(asked)
                raise
        return self.began, _call("running", partial="He")

    def following(self, call: str, *args: Any) -> Streamed:
        return dataclasses.replace(self.began, chunk_id=call)

    def withdraw(self, services: Any, tenant_id: str, call: str) -> bool:
        self.withdrawn.append(call)
        return True


_CALLER = SimpleNamespace(tenant_id="t")
_REQUEST = SimpleNamespace(is_disconnected=lambda: False)


def test_a_prompt_refused_before_any_text_stops_the_prompts_that_began(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One ask for the batch, each prompt begun on its own call; one refused: a prompt that
    began is stopped and let go, one still waiting for an executor is cancelled and withdrawn."""
    batch = _Batch(monkeypatch)
    body = CompletionCreate(model="m", prompt=["fine", "refused", "untaken"], stream=True)

    async def asked() -> None:
        with pytest.raises(ApiError, match="context"):
            await completion_streams.stream_response(body, _REQUEST, _CALLER, None)  # type: ignore[arg-type]
        await asyncio.sleep(0.2)

    asyncio.run(asked())
    assert batch.asks == [["fine", "refused", "untaken"]]  # one ask for the batch
    assert batch.did == ["leave", "forget"]  # the prompt that began: stopped, let go once answered
    assert batch.cancelled == ["call-untaken"] and batch.withdrawn == ["call-untaken"]


def test_a_client_that_leaves_while_its_batch_is_asked_leaves_no_prompt_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request cancelled while its prompts are asked: once the ask commits, each prompt is
    withdrawn (or stopped and let go, had an executor taken it)."""
    batch = _Batch(monkeypatch)
    batch.asking.clear()
    body = CompletionCreate(model="m", prompt=["one", "two"], stream=True)

    async def left() -> None:
        task = asyncio.ensure_future(
            completion_streams.stream_response(body, _REQUEST, _CALLER, None)  # type: ignore[arg-type]
        )
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert batch.withdrawn == []
        batch.asking.set()
        await asyncio.sleep(0.3)

    asyncio.run(left())
    assert batch.asks == [["one", "two"]]
    assert sorted(batch.withdrawn) == ["call-one", "call-two"]
