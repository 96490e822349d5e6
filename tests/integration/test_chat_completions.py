"""OpenAI's chat completions through the official `openai` SDK, on the real interactive executor
holding the tiny test base: a fine-tuned adapter (the job's `fine_tuned_model`) and the base
answer what their Tinker samplers sample from the same chat-template tokens, stop strings are
left out of the content, the chat is metered in the tenant's chat session, and what cannot be
answered is refused with its reason and nothing asked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import text
from tinker import types
from transformers import AutoTokenizer

from control_plane import chat_completions, trainers
from control_plane.api.routes import chat
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import register_test_base
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.tinker_harness import (
    CHAT_MESSAGES,
    openai_client,
    publish_adapter_version,
    sdk_service,
    tinker_settings,
)

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

MESSAGES = CHAT_MESSAGES


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _sampled(service: Any, model: dict[str, str], params: types.SamplingParams) -> list[int]:
    """What a Tinker sampler of the same model samples from the chat template's tokens."""
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    prompt = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    sampler = service.create_sampling_client(**model).result(timeout=120)
    answer = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result(timeout=120)
    return list(answer.sequences[0].tokens)


def _calls(services: Services) -> int:
    with services.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM interactive_calls")).scalar_one())


def test_the_openai_sdk_chats_with_a_fine_tuned_adapter_as_its_sampler_samples_it(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str, peft_adapter: Path
) -> None:
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    prompt_tokens = len(
        tokenizer.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    client = openai_client(live_url, tenant_a.member)
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0)
    with sdk_service(live_url, tenant_a.member) as service:
        answers = {}
        for name, sampled in (
            (model, {"model_path": f"tinker://adapters/{model}"}),
            (executor, {"base_model": executor}),
        ):
            reply = client.chat.completions.create(
                model=name, messages=MESSAGES, max_completion_tokens=8, temperature=0
            )
            tokens = _sampled(service, sampled, greedy)
            assert reply.object == "chat.completion" and reply.model == name
            [choice] = reply.choices
            assert choice.message.role == "assistant"
            assert choice.message.content == tokenizer.decode(tokens, skip_special_tokens=True)
            assert choice.finish_reason == ("length" if len(tokens) == 8 else "stop")
            assert reply.usage is not None
            assert reply.usage.prompt_tokens == prompt_tokens
            assert reply.usage.completion_tokens == len(tokens)
            assert reply.usage.total_tokens == prompt_tokens + len(tokens)
            answers[name] = tokens
            if name == model:
                reply_of_adapter = choice.message
        assert answers[model] != answers[executor]  # the adapter is applied

        # A stop string is left out of the content, as OpenAI leaves it.
        content = tokenizer.decode(answers[model], skip_special_tokens=True)
        stop = next(content[k : k + 2] for k in range(1, len(content) - 1) if content[k].strip())
        stopped = client.chat.completions.create(
            model=model, messages=MESSAGES, max_completion_tokens=8, temperature=0, stop=[stop]
        )
        assert stopped.choices[0].message.content == content[: content.index(stop)]
        assert stopped.choices[0].finish_reason == "stop"

        # A conversation goes on as the SDK's users write it: the reply's message appended as
        # it came (its `refusal: null` too), with OpenAI's fields at the values that ask for
        # nothing; the template renders the reply as the assistant's turn.
        turn = [*MESSAGES, reply_of_adapter, {"role": "user", "content": "Another."}]
        more = client.chat.completions.create(
            model=model,
            messages=turn,
            max_completion_tokens=4,
            temperature=0,
            logprobs=False,
            top_logprobs=0,
            frequency_penalty=0,
            presence_penalty=0,
            seed=-1,
        )
        assert more.usage is not None and more.usage.prompt_tokens > prompt_tokens

        # Several choices, seeded: each as seeded again.
        params = {"temperature": 1.0, "seed": 3, "max_completion_tokens": 6, "n": 2}
        first = client.chat.completions.create(model=model, messages=MESSAGES, **params)
        again = client.chat.completions.create(model=model, messages=MESSAGES, **params)
        assert [c.index for c in first.choices] == [0, 1]
        assert [c.message.content for c in first.choices] == [
            c.message.content for c in again.choices
        ]

    # The chats are the tenant's chat session's sample calls, metered as samples are.
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.usage, c.request, c.payload_dropped_at, m.model_path "
                "FROM interactive_calls c "
                "JOIN interactive_models m ON m.id = c.model_id WHERE m.session_id = :s "
                "ORDER BY c.created_at"
            ),
            {"s": chat_completions.session_id(tenant_a.tenant_id)},
        ).all()
    assert len(rows) == 6
    # Each chat's messages and text were let go once answered; what it used stays.
    assert all(r.request == {} and r.payload_dropped_at is not None for r in rows)
    assert {r.model_path for r in rows} == {f"tinker://adapters/{model}", None}
    assert rows[0].usage == {"prefill_tokens": prompt_tokens, "sampled_tokens": len(answers[model])}


def test_a_chat_that_cannot_be_answered_is_refused_with_its_reason_and_nothing_asked(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    executor: str,
    peft_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    client = openai_client(live_url, tenant_a.member)
    before = _calls(services)
    for missing in ("bot@9", "bot@prod", "nobody", "not a model"):
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(model=missing, messages=MESSAGES)
        assert refused.value.code == "model_not_found" and "GET /v1/models" in str(refused.value)
    with pytest.raises(openai.NotFoundError):  # another tenant's adapter
        openai_client(live_url, tenant_b.member).chat.completions.create(
            model=model, messages=MESSAGES
        )
    with pytest.raises(openai.PermissionDeniedError):  # a reader
        openai_client(live_url, tenant_a.reader).chat.completions.create(
            model=model, messages=MESSAGES
        )
    for extra in (
        {"tools": [{"type": "function"}]},
        {"top_logprobs": 2},  # without logprobs
        {"top_logprobs": 21, "logprobs": True},
    ):
        sent = httpx.post(
            f"{live_url}/v1/chat/completions",
            json={"model": model, "messages": MESSAGES, **extra},
            headers=tenant_a.headers("member"),
        )
        assert sent.status_code == 400, sent.text
        assert sent.json()["error"]["param"].startswith(next(iter(extra))), sent.text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[])
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=3)
    assert refused.value.param == "temperature"

    # A base no executor holds: 503, saying how to start one, with Retry-After.
    register_test_base(services.engine, "tiny-unserved")
    sent = httpx.post(
        f"{live_url}/v1/chat/completions",
        json={"model": "tiny-unserved", "messages": MESSAGES},
        headers=tenant_a.headers("member"),
    )
    assert sent.status_code == 503 and sent.headers["Retry-After"], sent.text
    assert sent.headers["x-should-retry"] == "false"  # retrying starts no executor
    assert sent.json()["error"]["code"] == "no_executor"
    assert "tiny-unserved" in sent.json()["error"]["message"]
    assert _calls(services) == before

    # The executor's own refusal (a role order the template takes, but a prompt too long for
    # the base's context) is a 400 with its words.
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "word " * 5000}]
        )

    # A base whose executor does not answer in time: the chat is withdrawn, 503.
    monkeypatch.setattr(chat, "TAKE_SECONDS", 1.0)
    monkeypatch.setattr(chat, "WAIT_SECONDS", 2.0)
    with services.engine.begin() as conn:
        trainers.report(
            conn,
            trainers.TrainerReport(
                "exec-silent", "h", 1, "cpu", resident_base="tiny-unserved", kind="interactive"
            ),
        )
    sent = httpx.post(
        f"{live_url}/v1/chat/completions",
        json={"model": "tiny-unserved", "messages": MESSAGES},
        headers=tenant_a.headers("member"),
    )
    assert sent.status_code == 503 and sent.json()["error"]["code"] == "executor_busy", sent.text
    with services.engine.connect() as conn:
        withdrawn = conn.execute(
            text("SELECT status, request FROM interactive_calls ORDER BY created_at DESC LIMIT 1")
        ).one()
    # Withdrawn: no executor will run it later, and its messages are let go.
    assert (withdrawn.status, withdrawn.request) == ("failed", {})
