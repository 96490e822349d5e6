"""A sampling client's one long poll for its samples' completions (`retrieve_futures`, the
client config's `sample_use_retrieve_futures`): on random sequences of asks, runs (the real
claim and finish, in the model's order), cancels (out of order) and polls of two clones, every
finished call of a clone is reported to it, none of another clone's, a poll with nothing new
reports nothing, and only a call finished out of order is ever reported twice; a poll holds
until a call finishes, or its hold ends, and then settles calls whose weights are gone; and
the official SDK samples through it: one poll where it polled each sample, the answers fetched
once each and their payloads let go."""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from fastapi import FastAPI
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from tinker import types

from control_plane import interactive, interactive_calls, interactive_polls
from control_plane.api.app import create_app
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import interactive_model, interactive_session, make_base, make_tenant
from tests.tinker_harness import SEQUENCE, counted, sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

CLONES = (0, 3)


def _ask(engine: Engine, tenant: str, sampler: str, clone: int, n: int) -> str:
    with engine.begin() as conn:
        request = {"seq_id": clone * interactive_polls.CLONE_BLOCK + n, "num_samples": 1}
        return interactive.enqueue(conn, tenant, sampler, interactive.CallKind.SAMPLE, request)


def _run_next(engine: Engine, base: str) -> str | None:
    """The executor's claim and finish of the next call, as the runner makes them."""
    with engine.begin() as conn:
        call = interactive_calls.claim_next(conn, "exec-polls", base)
        if call is None:
            return None
        assert interactive_calls.finish(conn, call, "exec-polls", {"type": "sample"})
        return call.id


def _finished(engine: Engine, sampler: str) -> dict[str, int]:
    """Each finished call of the sampler, by id: its clone."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, client_seq FROM interactive_calls "
                "WHERE model_id = :m AND status IN ('completed', 'failed')"
            ),
            {"m": sampler},
        )
        return {r.id: r.client_seq // interactive_polls.CLONE_BLOCK for r in rows}


OP = st.one_of(
    st.tuples(st.just("ask"), st.sampled_from(CLONES), st.integers(1, 3)),
    st.tuples(st.just("run"), st.integers(1, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 50)),
    st.tuples(st.just("poll"), st.sampled_from(CLONES)),
)


@examples(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OP, min_size=4, max_size=30))
def test_every_finished_call_is_reported_to_its_clone_and_only_out_of_order_ones_twice(
    engine: Engine, ops: list[tuple[Any, ...]]
) -> None:
    tag = secrets.token_hex(4)
    tenant = make_tenant(engine, f"polls-{tag}").id
    base = make_base(engine, f"polls-{tag}").id
    session = interactive_session(engine, tenant, f"isess-{tag}")
    sampler = interactive_model(engine, session, tenant, base, f"imdl-{tag}", kind="sampler")
    cursors = dict.fromkeys(CLONES, 0)
    reported: dict[int, Counter[str]] = {clone: Counter() for clone in CLONES}
    asked = dict.fromkeys(CLONES, 0)
    cancelled: set[str] = set()
    pending: list[str] = []

    def poll(clone: int) -> interactive_polls.Completions:
        before = {i for i, c in _finished(engine, sampler).items() if c == clone}
        with engine.connect() as conn:
            found = interactive_polls.read(conn, tenant, sampler, clone, cursors[clone])
        after = {i for i, c in _finished(engine, sampler).items() if c == clone}
        ids = [c.request_id for c in found.completions]
        assert set(ids) <= after, "only the clone's finished calls"
        assert found.new == bool(ids)
        if not found.new:  # nothing new: everything finished was reported before
            assert before <= set(reported[clone])
        reported[clone].update(ids)
        cursors[clone] = found.cursor
        return found

    for op in ops:
        if op[0] == "ask":
            for _ in range(op[2]):
                pending.append(_ask(engine, tenant, sampler, op[1], asked[op[1]]))
                asked[op[1]] += 1
        elif op[0] == "run":
            for _ in range(op[1]):
                done = _run_next(engine, base)
                if done is not None:
                    pending.remove(done)
        elif op[0] == "cancel" and pending:
            victim = pending.pop(op[1] % len(pending))
            with engine.begin() as conn:
                assert interactive.cancel(conn, tenant, victim)
            cancelled.add(victim)
        elif op[0] == "poll":
            poll(op[1])

    while _run_next(engine, base) is not None:
        pass
    for clone in CLONES:
        while poll(clone).new:
            pass
        assert not poll(clone).new  # settled: asking again reports nothing
        mine = {i for i, c in _finished(engine, sampler).items() if c == clone}
        assert set(reported[clone]) == mine
        twice = {i for i, n in reported[clone].items() if n > 1}
        assert twice <= cancelled, "only a call finished out of its order is reported again"


def test_a_samplers_clone_numbers_are_given_once_each_and_a_training_model_has_none(
    engine: Engine,
) -> None:
    tenant = make_tenant(engine, "clones").id
    base = make_base(engine, "clones").id
    session = interactive_session(engine, tenant, "isess-clones")
    sampler = interactive_model(engine, session, tenant, base, "imdl-clones", kind="sampler")
    training = interactive_model(engine, session, tenant, base, "imdl-clones-t")

    def join(model: str) -> int:
        with engine.begin() as conn:
            return interactive_polls.join(conn, tenant, model)

    assert [join(sampler) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(interactive.Refused, match="not a sampling session"):
        join(training)
    with pytest.raises(interactive.NotFound), engine.begin() as conn:
        interactive_polls.join(conn, make_tenant(engine, "clones-b").id, sampler)


@pytest.fixture
def polling() -> bool:
    return True


@pytest.fixture
def hold_s() -> float:
    return 5.0


@pytest.fixture
def settings(tmp_path: Path, polling: bool, hold_s: float) -> Settings:
    return tinker_settings(tmp_path).model_copy(
        update={"tinker_retrieve_wait_seconds": hold_s, "tinker_session_polling": polling}
    )


def _scene(services: Services, keys: TenantKeys, tag: str) -> tuple[str, str]:
    engine = services.engine
    base = make_base(engine, f"hold-{tag}").id
    session = interactive_session(engine, keys.tenant_id, f"isess-hold-{tag}")
    sampler = interactive_model(
        engine, session, keys.tenant_id, base, f"imdl-hold-{tag}", kind="sampler"
    )
    return base, sampler


def _poll(url: str, keys: TenantKeys, sampler: str, cursor: int, **extra: Any) -> Any:
    body = {"target": {"sampling_session_id": sampler}, "prev_cursor": cursor, **extra}
    answered = httpx.post(
        f"{url}/api/v1/retrieve_futures",
        json=body,
        headers={"X-API-Key": "tml-" + keys.member},
        timeout=30,
    )
    assert answered.status_code == 200, answered.text
    return answered.json()


# A hold long enough that "answered before its end" leaves room for a busy machine.
@pytest.mark.parametrize("hold_s", [20.0])
def test_a_poll_holds_until_a_call_finishes_then_settles_a_lost_executors_call(
    live_url: str, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    engine = services.engine
    base, sampler = _scene(services, tenant_a, "a")
    first = _ask(engine, tenant_a.tenant_id, sampler, 0, 0)
    second = _ask(engine, tenant_a.tenant_id, sampler, 0, 1)

    # A call finishing during the hold answers the poll then, not at the hold's end (20 s).
    threading.Timer(0.5, _run_next, (engine, base)).start()
    started = time.monotonic()
    answered = _poll(live_url, tenant_a, sampler, 0)
    assert time.monotonic() - started < 10
    assert answered["completions"] == [{"state": "finished", "request_id": first}]

    # Nothing new: held to the poll's own timeout (not the hold's 20 s), the same cursor back.
    started = time.monotonic()
    again = _poll(live_url, tenant_a, sampler, answered["cursor"], timeout=0.4)
    assert 0.35 < time.monotonic() - started < 10
    assert again == {"completions": [], "cursor": answered["cursor"]}

    # The sampler's executor stops while it runs the second call: the hold's end fails that
    # call, saying why, and reports it; the third, never taken, waits for the next executor.
    third = _ask(engine, tenant_a.tenant_id, sampler, 0, 2)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE interactive_models SET held_by = 'exec-gone' WHERE id = :m"),
            {"m": sampler},
        )
        conn.execute(
            text(
                "UPDATE interactive_calls SET status = 'running', claimed_by = 'exec-gone', "
                "started_at = now() WHERE id = :c"
            ),
            {"c": second},
        )
    settled = _poll(live_url, tenant_a, sampler, answered["cursor"], timeout=0.2)
    assert settled["completions"] == [{"state": "failed", "request_id": second}]
    with engine.connect() as conn:
        states = dict(
            conn.execute(
                text("SELECT id, status FROM interactive_calls WHERE id IN (:s, :t)"),
                {"s": second, "t": third},
            )
            .tuples()
            .all()
        )
        error = conn.execute(
            text("SELECT error FROM interactive_calls WHERE id = :id"), {"id": second}
        ).scalar_one()
    assert "stopped before it answered" in error["error"]
    assert states == {second: "failed", third: "pending"}

    # The SDK reports what it fetched: those payloads go now; another tenant's sampler is a 404.
    _poll(live_url, tenant_a, sampler, settled["cursor"], timeout=0, retrieved_request_ids=[first])
    with engine.connect() as conn:
        dropped = conn.execute(
            text(
                "SELECT payload_dropped_at IS NOT NULL, result IS NULL FROM interactive_calls "
                "WHERE id = :id"
            ),
            {"id": first},
        ).one()
    assert tuple(dropped) == (True, True)
    other = httpx.post(
        f"{live_url}/api/v1/retrieve_futures",
        json={"target": {"sampling_session_id": sampler}, "timeout": 0},
        headers={"X-API-Key": "tml-" + tenant_b.member},
    )
    assert other.status_code == 404


@pytest.fixture
def app(services: Services) -> Iterator[FastAPI]:
    """The API, counting the requests it answers by path."""
    built = create_app(services)
    built.state.hits = counted(built)
    yield built


@pytest.mark.parametrize("polling", [True, False])
def test_the_sdk_samples_through_one_poll_a_client_and_fetches_each_answer_once(
    live_url: str,
    app: FastAPI,
    tenant_a: TenantKeys,
    executor: str,
    services: Services,
    polling: bool,
) -> None:
    prompt = types.ModelInput.from_ints(SEQUENCE[:6])
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=7)
    with sdk_service(live_url, tenant_a.member) as service:
        sampler = service.create_sampling_client(base_model=executor).result(timeout=120)
        futures = [sampler.sample(prompt, 1, params) for _ in range(24)]
        answers = [f.result(timeout=300) for f in futures]
        alone = sampler.sample(prompt, 1, params).result(timeout=120)
    assert all(a.sequences[0].tokens == alone.sequences[0].tokens for a in answers)  # seeded
    hits = app.state.hits
    assert hits["/api/v1/asample"] == 25
    if not polling:  # LORAFORGE_TINKER_SESSION_POLLING=false: each sample polls on its own
        assert hits["/api/v1/retrieve_futures"] == 0
        assert hits["/api/v1/retrieve_future"] >= 25
        return
    # One fetch an answer, no poll a sample; the session's poller asked a few times.
    assert hits["/api/v1/retrieve_future"] == 25
    assert 1 <= hits["/api/v1/retrieve_futures"] < 25
    with services.engine.connect() as conn:
        kept = conn.execute(
            text(
                "SELECT count(*) FROM interactive_calls WHERE tenant_id = :t AND kind = 'sample' "
                "AND payload_dropped_at IS NULL"
            ),
            {"t": tenant_a.tenant_id},
        ).scalar_one()
    assert kept <= 1  # the fetched answers' payloads went with the next poll (the last's may not)


def test_clients_opened_from_a_handle_join_as_clones_of_their_own_and_read_their_own_samples(
    live_url: str,
    app: FastAPI,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    executor: str,
    services: Services,
) -> None:
    prompt = types.ModelInput.from_ints(SEQUENCE[:6])
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=3)
    with sdk_service(live_url, tenant_a.member) as service:
        sampler = service.create_sampling_client(base_model=executor).result(timeout=120)
        handle = sampler.get_sampler_handle()
        clones = [
            tinker.SamplingClient.from_sampler_handle(handle, api_key="tml-" + tenant_a.member)
            for _ in range(2)
        ]
        futures = [c.sample(prompt, 1, params) for c in (sampler, *clones) for _ in range(3)]
        answers = [f.result(timeout=300).sequences[0].tokens for f in futures]
    assert len({tuple(a) for a in answers}) == 1  # one seed: each the same sample
    assert app.state.hits["/api/v1/join_sampling_session"] == 2
    with services.engine.connect() as conn:
        blocks = conn.execute(
            text(
                "SELECT client_seq / :block, count(*) FROM interactive_calls "
                "WHERE tenant_id = :t AND kind = 'sample' GROUP BY 1 ORDER BY 1"
            ),
            {"block": interactive_polls.CLONE_BLOCK, "t": tenant_a.tenant_id},
        ).all()
    assert [tuple(b) for b in blocks] == [(0, 3), (1, 3), (2, 3)]  # numbered by the server

    # Another tenant cannot join the sampler.
    with services.engine.connect() as conn:
        sampler_id = conn.execute(
            text("SELECT id FROM interactive_models WHERE tenant_id = :t AND kind = 'sampler'"),
            {"t": tenant_a.tenant_id},
        ).scalar_one()
    other = httpx.post(
        f"{live_url}/api/v1/join_sampling_session",
        json={"sampling_session_id": sampler_id},
        headers={"X-API-Key": "tml-" + tenant_b.member},
    )
    assert other.status_code == 404
