"""One model's chats spread over the executors of its base: while a chat of the model runs a
batch on one executor (a model's calls run a batch at a time), or while the executor holding
the model's idle sampler runs another model's batch, another chat of it goes to a new sampler
that an idle executor of the base takes, not into the queue behind that batch; with no idle
executor it joins the busy sampler, and chats asked one after another reuse one sampler (real
executors on the tiny test base, the official `openai` SDK)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from control_plane import chat_completions
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import register_test_base
from tests.tinker_harness import (
    LONG_CHAT,
    SHORT_CHAT,
    openai_client,
    publish_adapter_version,
    sample_calls,
    serving_executor,
    tinker_settings,
)

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

# A long streamed chat (paced: 10 ms a token's step, seconds in all) and a short one.
LONG, SHORT = LONG_CHAT, SHORT_CHAT


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _samplers(services: Services, tenant_id: str) -> list[Any]:
    with services.engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT id, held_by FROM interactive_models "
                    "WHERE session_id = :session AND kind = 'sampler' ORDER BY created_at"
                ),
                {"session": chat_completions.session_id(tenant_id)},
            ).all()
        )


def _reported(services: Services, executor_id: str) -> None:
    """Once the executor has reported itself (it takes calls from then on)."""
    deadline = time.monotonic() + 30
    while True:
        with services.engine.connect() as conn:
            found = conn.execute(
                text("SELECT 1 FROM trainers WHERE id = :id"), {"id": executor_id}
            ).first()
        if found is not None:
            return
        assert time.monotonic() < deadline, f"{executor_id} never reported itself"
        time.sleep(0.02)


def _long_chat_running(services: Services, client: Any, model: str) -> threading.Thread:
    """The long chat streamed in a thread, once an executor runs it."""
    thread = threading.Thread(
        target=lambda: list(client.chat.completions.create(model=model, stream=True, **LONG))
    )
    thread.start()
    deadline = time.monotonic() + 60
    while not any(c.status == "running" for c in sample_calls(services)):
        assert time.monotonic() < deadline, "the long chat never ran"
        time.sleep(0.02)
    return thread


@pytest.mark.slow
@pytest.mark.usefixtures("paced")
def test_a_chat_of_a_busy_model_goes_to_an_idle_executor_of_its_base(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    peft_adapter: Path,
    tmp_path: Path,
) -> None:
    base = register_test_base(services.engine, "tiny-e2e")
    model = publish_adapter_version(services, tenant_a.tenant_id, base.name, peft_adapter, 4)
    client = openai_client(live_url, tenant_a.member)
    with (
        serving_executor(services, base.id, "executor-1", tmp_path / "e1"),
        serving_executor(services, base.id, "executor-2", tmp_path / "e2"),
    ):
        first = client.chat.completions.create(model=model, **SHORT)  # one sampler, held
        [held] = _samplers(services, tenant_a.tenant_id)
        first_executor = held.held_by
        long_chat = _long_chat_running(services, client, model)
        short = client.chat.completions.create(model=model, **SHORT)
        long_chat.join(120)
        _, long_call, short_call = sample_calls(services)
        samplers = _samplers(services, tenant_a.tenant_id)
    # Each executor's writer of streamed text stopped when it stopped serving.
    assert not [t for t in threading.enumerate() if t.name.startswith("stream-executor-")]
    # The short chat ran on the other executor, while the long one was sampled.
    assert long_call.claimed_by == first_executor
    assert short_call.claimed_by not in (None, first_executor), short_call
    assert short_call.finished_at < long_call.finished_at
    assert [s.held_by for s in samplers] == [first_executor, short_call.claimed_by]
    # Either executor answers the model alike (greedy): the same chat on each.
    assert short.choices[0].message.content == first.choices[0].message.content


@pytest.mark.usefixtures("paced")
def test_a_chat_whose_idle_sampler_s_executor_runs_another_model_goes_to_an_idle_executor(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    peft_adapter: Path,
    tmp_path: Path,
) -> None:
    """The model's sampler has nothing to run, but its executor runs another model's long
    batch: the chat goes to an executor running nothing, not behind that batch."""
    base = register_test_base(services.engine, "tiny-e2e")
    model = publish_adapter_version(services, tenant_a.tenant_id, base.name, peft_adapter, 4)
    client = openai_client(live_url, tenant_a.member)
    with serving_executor(services, base.id, "executor-1", tmp_path / "e1"):
        client.chat.completions.create(model=model, **SHORT)  # the adapter's sampler on 1
        long_chat = _long_chat_running(services, client, base.name)  # the base's, on 1 too
        with serving_executor(services, base.id, "executor-2", tmp_path / "e2"):
            _reported(services, "executor-2")
            client.chat.completions.create(model=model, **SHORT)
            long_chat.join(120)
            _, long_call, short_call = sample_calls(services)
            samplers = _samplers(services, tenant_a.tenant_id)
    assert (long_call.claimed_by, short_call.claimed_by) == ("executor-1", "executor-2")
    assert short_call.finished_at < long_call.finished_at
    assert [s.held_by for s in samplers] == ["executor-1", "executor-1", "executor-2"]


@pytest.mark.usefixtures("paced")
def test_with_one_executor_a_chat_of_a_busy_model_waits_for_its_sampler(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    client = openai_client(live_url, tenant_a.member)
    long_chat = _long_chat_running(services, client, executor)
    client.chat.completions.create(model=executor, **SHORT)
    long_chat.join(120)
    long_call, short_call = sample_calls(services)
    assert long_call.model_id == short_call.model_id  # no second sampler: no executor for it
    assert short_call.started_at >= long_call.finished_at  # after the long chat's batch
    assert len(_samplers(services, tenant_a.tenant_id)) == 1


def test_chats_asked_one_after_another_reuse_one_sampler(
    services: Services, live_url: str, tenant_a: TenantKeys, tmp_path: Path
) -> None:
    base = register_test_base(services.engine, "tiny-e2e")
    client = openai_client(live_url, tenant_a.member)
    with (
        serving_executor(services, base.id, "executor-1", tmp_path / "e1"),
        serving_executor(services, base.id, "executor-2", tmp_path / "e2"),
    ):
        for _ in range(3):
            client.chat.completions.create(model=base.name, **SHORT)
    [sampler] = _samplers(services, tenant_a.tenant_id)
    assert {c.model_id for c in sample_calls(services)} == {sampler.id}
