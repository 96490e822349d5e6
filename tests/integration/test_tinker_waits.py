"""Why an interactive call waits, as a poll of its future says (the SDK's `queue_state` and its
reason, which the SDK shows its user): no executor holding the call's base is a pause for
capacity that ends when one starts; a model whose executor stopped with its weights, or one
unloaded while no executor held it, is never run, so the poll itself fails its calls saying
why instead of leaving the caller waiting on an executor's idle pass that may never come; and
the platform's beat does that idle pass where no executor runs. The official SDK over a real
socket, the real executor on the tiny test base, real PostgreSQL."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from sqlalchemy import Engine, text
from tinker import types

from control_plane import interactive_health, trainers
from control_plane.services import Services
from control_plane.settings import Settings
from loraforge import tasks
from tests.api_harness import TenantKeys
from tests.factories import (
    ask_call,
    interactive_model,
    interactive_session,
    make_base,
    register_test_base,
)
from tests.tinker_harness import (
    SEQUENCE,
    sdk_service,
    served_bases,
    serving_executor,
    tinker_settings,
)

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

LOST = "the executor holding this model's weights stopped"


@pytest.fixture
def polling() -> bool:
    return True


@pytest.fixture
def settings(tmp_path: Path, polling: bool) -> Settings:
    return tinker_settings(tmp_path).model_copy(update={"tinker_session_polling": polling})


def _until(what: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _rows(engine: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def _poll(live_url: str, key: str, call_id: str) -> dict[str, Any]:
    with httpx.Client(base_url=live_url + "/api/v1", timeout=30) as http:
        answered = http.post(
            "/retrieve_future", json={"request_id": call_id}, headers={"X-API-Key": "tml-" + key}
        )
    assert answered.status_code == 200, answered.text
    return dict(answered.json())


@pytest.mark.parametrize("polling", [False, True])
def test_a_sample_on_a_base_no_executor_holds_is_paused_for_capacity_until_one_starts(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    polling: bool,
) -> None:
    """A sample polled on its own is told, and its SDK logs, why it waits. A sampling client
    waiting on its session's one poll (`retrieve_futures`, the default) is not: that poll
    carries completions only, so its SDK logs nothing, but a poll of the call says the same,
    and the sample runs once an executor starts."""
    engine = services.engine
    base = register_test_base(engine, "tiny-e2e")
    prompt = types.ModelInput.from_ints(SEQUENCE[:5])
    params = types.SamplingParams(max_tokens=4, temperature=0.0)
    caplog.set_level(logging.WARNING, logger="tinker")
    with sdk_service(live_url, tenant_a.member) as service:
        with serving_executor(services, base.id, "executor-1", tmp_path / "e1"):
            # The SDK creates the sampler in the background: wait for it while the base is served.
            sampler = service.create_sampling_client(base_model=base.name).result(timeout=120)
        assert base.name not in served_bases(services)  # stopped cleanly: out of the registry

        waiting = sampler.sample(prompt, 1, params)
        reason = f"no interactive executor holds base '{base.name}' now"
        if not polling:
            # The SDK tells its user why the sample waits (a sampler's pause is logged at once).
            _until(lambda: any(reason in r.getMessage() for r in caplog.records))
        pending = "SELECT id FROM interactive_calls WHERE status = 'pending'"
        _until(lambda: len(_rows(engine, pending)) == 1)
        [(call_id,)] = _rows(engine, pending)
        polled = _poll(live_url, tenant_a.member, call_id)
        assert polled["type"] == "try_again" and polled["queue_state"] == "paused_capacity"
        assert polled["queue_state_reason"].startswith(reason)
        assert "loraforge interactive --base tiny-e2e" in polled["queue_state_reason"]

        with serving_executor(services, base.id, "executor-2", tmp_path / "e2"):
            first = waiting.result(timeout=120).sequences[0].tokens
            # The paused sample ran as any other does: greedy, the same tokens again.
            again = sampler.sample(prompt, 1, params).result(timeout=120).sequences[0].tokens
        assert 1 <= len(first) <= 4 and first == again
        assert _rows(engine, "SELECT status FROM interactive_calls WHERE id = :c", c=call_id) == [
            ("completed",)
        ]


def test_a_call_on_a_model_whose_executor_stopped_fails_at_its_poll_saying_so(
    services: Services, live_url: str, tenant_a: TenantKeys, tmp_path: Path
) -> None:
    """No executor is left on the base to run the idle pass that would free the model: the
    poll does, at once (before, the SDK waited for ever)."""
    engine = services.engine
    base = register_test_base(engine, "tiny-e2e")
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(SEQUENCE[:-1]),
        loss_fn_inputs={"target_tokens": SEQUENCE[1:], "weights": [1.0] * (len(SEQUENCE) - 1)},
    )
    with sdk_service(live_url, tenant_a.member) as service:
        with serving_executor(services, base.id, "executor-1", tmp_path / "e1"):
            training = service.create_lora_training_client(base_model=base.name, rank=4)
            training = training.result(timeout=120)
            training.forward_backward([datum], "cross_entropy").result(timeout=120)
        started = time.monotonic()
        with pytest.raises(tinker.RequestFailedError, match=LOST):
            training.forward_backward([datum], "cross_entropy").result(timeout=60)
        assert time.monotonic() - started < 20  # answered at its first polls, not a lease later
    assert _rows(
        engine,
        "SELECT held_by IS NULL, unloaded_at IS NOT NULL FROM interactive_models WHERE id = :m",
        m=training.model_id,
    ) == [(True, True)]
    assert _rows(
        engine, "SELECT count(*) FROM interactive_calls WHERE status IN ('pending', 'running')"
    ) == [(0,)]


def _call(engine: Engine, call_id: str) -> tuple[Any, ...]:
    [row] = _rows(
        engine, "SELECT status, error->>'category' FROM interactive_calls WHERE id = :c", c=call_id
    )
    return row


def test_each_reason_a_call_waits_and_the_beats_idle_pass_where_no_executor_runs(
    services: Services, tenant_a: TenantKeys
) -> None:
    engine, lease = services.engine, services.settings.lease_seconds
    base = make_base(engine, "tiny-llama")
    session = interactive_session(engine, tenant_a.tenant_id, "sess-1")
    ids = ["waits", "lost", "orphan", "beat-lost"]
    for model_id in ids:
        interactive_model(engine, session, tenant_a.tenant_id, base.id, model_id)
        ask_call(engine, model_id, tenant_a.tenant_id, base.id, "forward_backward", 0)
    # Samplers of the base alone whose executor is gone too: their weights are not, unless
    # the sampler was unloaded.
    for sampler in ("lost-sampler", "ended-sampler"):
        interactive_model(engine, session, tenant_a.tenant_id, base.id, sampler, kind="sampler")
        ask_call(engine, sampler, tenant_a.tenant_id, base.id, "sample", 0)
    with engine.begin() as conn:
        trainers.report(
            conn,
            trainers.TrainerReport(
                "exec-1", "h", 1, "cpu", resident_base=base.name, kind="interactive"
            ),
        )
        conn.execute(
            text(
                "UPDATE interactive_models SET held_by = 'exec-gone' "
                "WHERE id IN ('lost', 'beat-lost', 'lost-sampler', 'ended-sampler');"
                "UPDATE interactive_models SET unloaded_at = now() "
                "WHERE id IN ('orphan', 'ended-sampler')"
            )
        )

    def explain(model_id: str) -> interactive_health.Waiting | None:
        with engine.begin() as conn:
            return interactive_health.explain(conn, model_id, lease)

    assert explain("waits") == interactive_health.ACTIVE  # a live executor holds its base
    with engine.begin() as conn:
        trainers.remove(conn, "exec-1")
    paused = explain("waits")
    assert paused is not None and paused.queue_state == "paused_capacity"
    assert paused.reason is not None and "'tiny-llama'" in paused.reason
    assert _call(engine, "fut-waits-0") == ("pending", None)  # a pause changes nothing

    # A lost sampler is freed, not settled: its call waits, here for an executor to start.
    assert explain("lost-sampler") == paused
    assert _call(engine, "fut-lost-sampler-0") == ("pending", None)
    assert _rows(
        engine,
        "SELECT id, held_by IS NULL, unloaded_at IS NULL FROM interactive_models "
        "WHERE kind = 'sampler' ORDER BY id",
    ) == [("ended-sampler", True, False), ("lost-sampler", True, True)]
    assert explain("ended-sampler") is None  # freed by the same pass: unloaded, settled
    assert _call(engine, "fut-ended-sampler-0") == ("failed", "server")

    assert explain("orphan") is None
    assert _call(engine, "fut-orphan-0") == ("failed", "user")
    assert explain("lost") is None  # frees every lost model, as an executor's idle pass does
    assert _call(engine, "fut-lost-0") == ("failed", "server")
    assert _call(engine, "fut-beat-lost-0") == ("failed", "server")

    # With no executor and no poll: the beat's pass frees a lost model, ends a silent session.
    interactive_model(engine, session, tenant_a.tenant_id, base.id, "later-lost")
    ask_call(engine, "later-lost", tenant_a.tenant_id, base.id, "forward_backward", 0)
    other = interactive_session(engine, tenant_a.tenant_id, "sess-silent")
    interactive_model(engine, other, tenant_a.tenant_id, base.id, "silent")
    ask_call(engine, "silent", tenant_a.tenant_id, base.id, "forward_backward", 0)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE interactive_models SET held_by = 'exec-gone' WHERE id = 'later-lost';"
                "UPDATE interactive_sessions SET last_heartbeat_at = now() - interval '1 day' "
                "WHERE id = 'sess-silent'"
            )
        )
    tasks.tidy_interactive_sessions.run()
    assert _call(engine, "fut-later-lost-0") == ("failed", "server")
    assert _call(engine, "fut-silent-0") == ("failed", "user")
    assert _call(engine, "fut-waits-0") == ("pending", None)  # its session is alive
    assert explain("waits") == paused
