"""A text completion streamed (`POST /v1/completions` with `stream: true`) through the official
`openai` SDK on the real interactive executor: `text_completion` chunks that join into exactly the
text the same completion answers whole (the echoed prompt first), with its usage last where asked,
as load generators that time the first token read them; vLLM's `ignore_eos`, which they send for
replies of a known length, samples past the base's end of sequence; what a stream does not offer
is refused by name and nothing asked."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text
from transformers import AutoTokenizer

from control_plane.base_catalog import NewBaseModel, register_base_model
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.tinker_harness import (
    openai_client,
    publish_adapter_version,
    serving_executor,
    tinker_settings,
)

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

PROMPT = "The sky over the harbour was"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # The executor writes a streamed completion's text after every token.
    return tinker_settings(tmp_path).model_copy(update={"chat_stream_every_seconds": 0.0})


def _streamed(client: openai.OpenAI, **asked: Any) -> tuple[list[Any], dict[int, list[str]]]:
    """Every chunk of a streamed completion, and each choice's texts in order."""
    chunks = list(client.completions.create(stream=True, **asked))
    texts: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.text:
                texts.setdefault(choice.index, []).append(choice.text)
    return chunks, texts


@pytest.mark.usefixtures("paced")
def test_a_streamed_completion_is_the_whole_text_sent_as_it_is_sampled(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str, peft_adapter: Path
) -> None:
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    client = openai_client(live_url, tenant_a.member)
    asked: dict[str, Any] = {"model": model, "prompt": PROMPT, "temperature": 0, "max_tokens": 24}
    whole = client.completions.create(**asked)
    chunks, texts = _streamed(client, stream_options={"include_usage": True}, **asked)
    [choice] = whole.choices
    assert choice.text
    # Sent as it was sampled, piece by piece, and the pieces are the whole text.
    assert len(texts[0]) >= 2, texts
    assert "".join(texts[0]) == choice.text
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    assert all(c.object == "text_completion" and c.model == model for c in chunks)
    assert all(len(c.choices) <= 1 for c in chunks)
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == [choice.finish_reason]
    # With include_usage: a last chunk with no choices and the usage; none before it.
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    # With echo, the prompt comes first, sent before the text sampled after it.
    echoed = client.completions.create(echo=True, **asked)
    _, echo_texts = _streamed(client, echo=True, **asked)
    assert echoed.choices[0].text == PROMPT + choice.text
    assert echo_texts[0][0].startswith(PROMPT) and len(echo_texts[0]) >= 2
    assert "".join(echo_texts[0]) == echoed.choices[0].text

    # A stop string: never sent, not even its first characters before it was whole.
    middle = len(choice.text) // 2
    stop = next(
        choice.text[k : k + 2]
        for k in range(middle, len(choice.text) - 1)
        if choice.text[k].strip()
    )
    stopped = client.completions.create(stop=[stop], **asked)
    _, stop_texts = _streamed(client, stop=[stop], **asked)
    sent = ""
    for piece in stop_texts.get(0, []):
        sent += piece
        assert stop not in sent and stopped.choices[0].text.startswith(sent)
    assert sent == stopped.choices[0].text

    # Several choices, seeded: each choice's pieces are that choice's whole text.
    seeded: dict[str, Any] = {"temperature": 1.0, "seed": 5, "max_tokens": 12, "n": 2}
    both = client.completions.create(model=model, prompt=PROMPT, **seeded)
    _, by_choice = _streamed(client, model=model, prompt=PROMPT, **seeded)
    assert all(c.text for c in both.choices)
    for one in both.choices:
        assert "".join(by_choice.get(one.index, [])) == one.text

    # Token ids, echoed and scored (max_tokens 0): the prompt's text alone, nothing sampled.
    ids = AutoTokenizer.from_pretrained(TEST_BASE_PATH).encode(PROMPT)
    scoring: dict[str, Any] = {"model": model, "prompt": ids, "echo": True, "max_tokens": 0}
    scored = client.completions.create(**scoring)
    score_chunks, score_texts = _streamed(client, stream_options={"include_usage": True}, **scoring)
    assert "".join(score_texts[0]) == scored.choices[0].text and PROMPT in scored.choices[0].text
    assert score_chunks[-1].usage is not None and score_chunks[-1].usage.completion_tokens == 0
    assert score_chunks[-1].usage == scored.usage

    # On the wire, without include_usage: no usage at all, and the stream's end said.
    events = _wire(live_url, tenant_a, {**asked, "max_tokens": 4, "stream": True})
    assert events[-1] == "data: [DONE]"
    assert all('"usage"' not in event for event in events)
    assert all('"delta"' not in event and '"role"' not in event for event in events)

    # Each streamed completion's prompt and text were let go once read; its usage stays, and
    # its adapter's reads were audited as completions.
    with services.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT request, partial, usage FROM interactive_calls WHERE request = '{}'")
        ).all()
        purposes = set(
            conn.execute(
                text(
                    "SELECT DISTINCT details->>'purpose' FROM audit_events "
                    "WHERE event = 'checkpoint_read'"
                )
            ).scalars()
        )
    assert "completion" in purposes and "chat" not in purposes, purposes
    assert len(rows) == 11
    assert all(r.partial is None and r.usage for r in rows)


def _wire(live_url: str, tenant: TenantKeys, body: dict[str, Any]) -> list[str]:
    """A streamed completion's `data:` lines as sent, over plain HTTP."""
    with httpx.stream(
        "POST",
        f"{live_url}/v1/completions",
        json=body,
        headers=tenant.headers("member"),
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line.startswith("data: ")]


def _all_let_go(services: Services, within_s: float = 30.0) -> bool:
    """Whether every call's prompt and text are let go, within `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        with services.engine.connect() as conn:
            kept = conn.execute(
                text(
                    "SELECT count(*) FROM interactive_calls "
                    "WHERE request <> '{}' OR partial IS NOT NULL"
                )
            ).scalar_one()
        if kept == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def _lists(chunks: list[Any], index: int = 0) -> tuple[dict[str, list[Any]], int]:
    """A streamed choice's legacy logprobs, every chunk's lists joined, and how many chunks
    carried some."""
    joined: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    carrying = 0
    for chunk in chunks:
        for choice in chunk.choices:
            if choice.index == index and choice.logprobs is not None:
                carrying += bool(choice.logprobs.tokens)
                for key, values in joined.items():
                    values += getattr(choice.logprobs, key)
    return joined, carrying


def _same_logprobs(streamed: dict[str, list[Any]], whole: Any) -> None:
    """The lists joined are the whole answer's: the same tokens, offsets and alternatives, and
    logprobs within float noise (each is its own call, batched otherwise)."""
    assert streamed["tokens"] == whole.tokens and streamed["text_offset"] == whole.text_offset
    assert [None if lp is None else pytest.approx(lp, abs=1e-4) for lp in whole.token_logprobs] == (
        streamed["token_logprobs"]
    )
    assert [None if t is None else set(t) for t in streamed["top_logprobs"]] == [
        None if t is None else set(t) for t in whole.top_logprobs
    ]


@pytest.mark.usefixtures("paced")
def test_a_streamed_completions_logprobs_come_with_its_text_and_join_into_the_whole_answers(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str, peft_adapter: Path
) -> None:
    """`logprobs` on a streamed completion (vLLM's `bench serve --logprobs` asks them): each
    chunk carries the legacy lists of the tokens sampled since the last, and every chunk's
    lists joined are the same completion's answered whole, echoed prompt, stop string and
    several choices included."""
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    client = openai_client(live_url, tenant_a.member)
    asked: dict[str, Any] = {
        "model": model,
        "prompt": PROMPT,
        "temperature": 0,
        "max_tokens": 24,
        "logprobs": 2,
    }
    whole = client.completions.create(**asked)
    chunks, texts = _streamed(client, **asked)
    [choice] = whole.choices
    assert choice.logprobs is not None and len(choice.logprobs.tokens) == 24
    streamed, carrying = _lists(chunks)
    assert carrying >= 3, carrying  # sent as they were sampled, not all at the end
    # Asked with logprobs, every choice of every chunk has its lists, empty where it has none
    # (its finish), as vLLM sends them.
    assert all(ch.logprobs is not None for c in chunks for ch in c.choices)
    assert "".join(texts[0]) == choice.text
    _same_logprobs(streamed, choice.logprobs)

    # With echo: the prompt's tokens first (the first with no logprob), in the first chunk.
    echoed = client.completions.create(echo=True, **asked).choices[0].logprobs
    echo_chunks, _ = _streamed(client, echo=True, **asked)
    first = next(c.choices[0] for c in echo_chunks if c.choices and c.choices[0].logprobs)
    assert first.text.startswith(PROMPT) and first.logprobs.token_logprobs[0] is None
    _same_logprobs(_lists(echo_chunks)[0], echoed)

    # A stop string: no token past the one the text ends in.
    stop = choice.text[len(choice.text) // 2 :].strip()[:3]
    stopped = client.completions.create(stop=[stop], **asked).choices[0].logprobs
    stop_chunks, _ = _streamed(client, stop=[stop], **asked)
    assert stopped is not None and len(stopped.tokens) < 24
    _same_logprobs(_lists(stop_chunks)[0], stopped)

    # Seeded choices, and a prompt scored (logprobs 0: each token's own alone).
    seeded = {**asked, "temperature": 1.0, "seed": 9, "n": 2, "max_tokens": 10}
    both = client.completions.create(**seeded)
    both_chunks, _ = _streamed(client, **seeded)
    for one in both.choices:
        _same_logprobs(_lists(both_chunks, one.index)[0], one.logprobs)
    scoring = {**asked, "echo": True, "max_tokens": 0, "logprobs": 0}
    scored = client.completions.create(**scoring).choices[0].logprobs
    score_chunks, _ = _streamed(client, **scoring)
    assert scored is not None and all(len(t) == 1 for t in scored.top_logprobs[1:])
    _same_logprobs(_lists(score_chunks)[0], scored)


@pytest.mark.usefixtures("paced")
def test_a_batch_of_prompts_streams_every_prompts_choices_numbered_as_answered_whole(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str, peft_adapter: Path
) -> None:
    """Several prompts streamed in one request, as vLLM streams them: one id, each choice's
    chunks under its index in the batch answered whole (prompt's place * n + its own), joining
    into that choice's text (and legacy lists), one usage for all of them last, then [DONE]; a
    prompt refused before any text is the plain 400, and the batch's other prompts are let go."""
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    client = openai_client(live_url, tenant_a.member)
    prompts = [PROMPT, "Once upon a time", "The river ran"]
    asked: dict[str, Any] = {"model": model, "prompt": prompts, "temperature": 0, "max_tokens": 16}
    whole = client.completions.create(**asked)
    chunks, texts = _streamed(client, stream_options={"include_usage": True}, **asked)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    for choice in whole.choices:
        assert "".join(texts[choice.index]) == choice.text and choice.text
    finishes = [
        (ch.index, ch.finish_reason) for c in chunks for ch in c.choices if ch.finish_reason
    ]
    assert sorted(finishes) == [(c.index, c.finish_reason) for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    # Two prompts, two seeded choices each, with logprobs: indexes 0 to 3, each its own.
    seeded = {**asked, "prompt": prompts[:2], "temperature": 1.0, "seed": 3, "n": 2}
    both = client.completions.create(logprobs=1, **seeded)
    both_chunks, both_texts = _streamed(client, logprobs=1, **seeded)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for choice in both.choices:
        assert "".join(both_texts.get(choice.index, [])) == choice.text
        _same_logprobs(_lists(both_chunks, choice.index)[0], choice.logprobs)

    # On the wire, without include_usage: no usage, [DONE] once, last.
    events = _wire(live_url, tenant_a, {**asked, "max_tokens": 4, "stream": True})
    assert events.count("data: [DONE]") == 1 and events[-1] == "data: [DONE]"
    assert all('"usage"' not in event for event in events)

    # One prompt past the base's context: the plain 400 before any chunk, and the other prompt,
    # asked beside it, withdrawn or stopped and let go.
    with pytest.raises(openai.BadRequestError, match="context"):
        list(
            client.completions.create(
                model=model, prompt=[PROMPT, "word " * 5000], max_tokens=200, stream=True
            )
        )
    assert _all_let_go(services)


def test_what_a_streamed_completion_does_not_offer_is_refused_by_name_and_nothing_asked(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    def calls() -> int:
        with services.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM interactive_calls")).scalar_one())

    before = calls()
    for extra, param in (
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "max_tokens": 0}, "max_tokens"),
    ):
        sent = httpx.post(
            f"{live_url}/v1/completions",
            json={"model": executor, "prompt": PROMPT, **extra},
            headers=tenant_a.headers("member"),
        )
        assert sent.status_code == 400, (extra, sent.text)
        assert sent.headers["content-type"].startswith("application/json")
        assert sent.json()["error"]["param"].startswith(param), sent.text
    with pytest.raises(openai.NotFoundError):
        openai_client(live_url, tenant_a.member).completions.create(
            model="nobody", prompt=PROMPT, stream=True
        )
    assert calls() == before
    # The executor's own refusal (a prompt longer than the base's context) is the plain 400,
    # before any chunk.
    with pytest.raises(openai.BadRequestError, match="context"):
        openai_client(live_url, tenant_a.member).completions.create(
            model=executor, prompt="word " * 5000, stream=True
        )


def test_ignore_eos_samples_past_the_bases_end_of_sequence_in_a_completion_and_a_chat(
    services: Services, live_url: str, tenant_a: TenantKeys, tmp_path: Path
) -> None:
    # A base whose every token ends a sequence: anything sampled ends after one token.
    ending = tmp_path / "ending-base"
    shutil.copytree(TEST_BASE_PATH, ending)
    generation = json.loads((ending / "generation_config.json").read_text())
    vocabulary = json.loads((ending / "config.json").read_text())["vocab_size"]
    generation["eos_token_id"] = list(range(vocabulary))
    (ending / "generation_config.json").write_text(json.dumps(generation))
    with services.engine.begin() as conn:
        base = register_base_model(
            conn, NewBaseModel(name="ending", source=str(ending), source_kind="dir")
        )
    client = openai_client(live_url, tenant_a.member)
    asked: dict[str, Any] = {"model": base.name, "max_tokens": 6, "temperature": 0}
    with serving_executor(services, base.id, "executor-ending", tmp_path / "executor"):
        ended = client.completions.create(prompt=PROMPT, **asked)
        past = client.completions.create(prompt=PROMPT, extra_body={"ignore_eos": True}, **asked)
        chunks = list(
            client.completions.create(
                prompt=PROMPT,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True, "repetition_penalty": 1.0},  # vLLM's client
                **asked,
            )
        )
        chat: dict[str, Any] = {
            "model": base.name,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_completion_tokens": 6,
        }
        chat_ended = client.chat.completions.create(**chat)
        chat_past = client.chat.completions.create(extra_body={"ignore_eos": True}, **chat)
        refused = httpx.post(
            f"{live_url}/v1/completions",
            json={**asked, "prompt": PROMPT, "repetition_penalty": 1.2},
            headers=tenant_a.headers("member"),
        )
    assert ended.usage is not None and ended.usage.completion_tokens == 1
    assert ended.choices[0].finish_reason == "stop"
    assert past.usage is not None and past.usage.completion_tokens == 6
    assert past.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == past.choices[0].text
    assert chunks[-1].usage == past.usage
    assert chat_ended.usage is not None and chat_ended.usage.completion_tokens == 1
    assert chat_past.usage is not None and chat_past.usage.completion_tokens == 6
    assert chat_past.choices[0].finish_reason == "length"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "repetition_penalty"
