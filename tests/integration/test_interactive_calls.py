"""The executors' side of interactive sessions on real PostgreSQL: a model's calls run one at a
time in their order, all on the executor that holds its weights; executors share a base's
calls without taking one twice; an executor that stops has its models' calls answered."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from datetime import timedelta
from typing import Any

import psycopg
from sqlalchemy import Engine, text

from control_plane import interactive_calls as calls
from control_plane import interactive_health
from control_plane.trainers import TrainerReport, report
from tests.factories import ask_call as _ask
from tests.factories import interactive_model, interactive_session, make_base, make_tenant


def _claim(engine: Engine, executor: str, base_id: str) -> calls.Call | None:
    with engine.begin() as conn:
        return calls.claim_next(conn, executor, base_id)


def _finish(engine: Engine, call: calls.Call, executor: str, **kwargs: Any) -> bool:
    with engine.begin() as conn:
        return calls.finish(conn, call, executor, {"seq": call.seq}, **kwargs)


def _status(engine: Engine, call_id: str) -> tuple[str, Any, Any]:
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, result, error FROM interactive_calls WHERE id = :id"),
            {"id": call_id},
        ).one()
    return row.status, row.result, row.error


def test_a_models_calls_run_in_order_on_the_executor_that_holds_it(engine: Engine) -> None:
    tenant = make_tenant(engine, "tenant-a")
    base = make_base(engine)
    session = interactive_session(engine, tenant.id, "sess-1")
    model = interactive_model(engine, session, tenant.id, base.id, "imdl-a")
    other = interactive_model(engine, session, tenant.id, base.id, "imdl-b")
    # Asked out of order: seq 2 arrives before seq 1.
    for seq, kind in ((0, "create_model"), (2, "optim_step"), (1, "forward_backward")):
        _ask(engine, model, tenant.id, base.id, kind, seq)

    first = _claim(engine, "exec-x", base.id)
    assert first is not None and (first.model_id, first.seq, first.kind) == (
        model,
        0,
        "create_model",
    )
    assert first.lora_config == {"rank": 4, "seed": 0} and first.session_id == session
    # While seq 0 runs, nothing later of the model is taken, by this executor or another.
    assert _claim(engine, "exec-x", base.id) is None
    assert _claim(engine, "exec-y", base.id) is None
    assert _finish(engine, first, "exec-x")
    # The model is exec-x's now: exec-y never takes its calls, even when exec-x is idle.
    assert _claim(engine, "exec-y", base.id) is None
    second = _claim(engine, "exec-x", base.id)
    assert second is not None and second.seq == 1
    with engine.begin() as conn:
        assert calls.fail(conn, second, "exec-x", "bad shapes")
    # A failed call does not hold the next one back.
    third = _claim(engine, "exec-x", base.id)
    assert third is not None and third.seq == 2
    # Another model is free for any executor; exec-y takes it while exec-x holds seq 2.
    _ask(engine, other, tenant.id, base.id, "create_model", 0)
    taken = _claim(engine, "exec-y", base.id)
    assert taken is not None and taken.model_id == other
    # An answer from an executor that does not hold the call is not recorded.
    assert not _finish(engine, third, "exec-y")
    assert _finish(engine, third, "exec-x")
    assert _status(engine, "fut-imdl-a-1") == (
        "failed",
        None,
        {"error": "bad shapes", "category": "user"},
    )
    assert _status(engine, "fut-imdl-a-2") == ("completed", {"seq": 2}, None)
    # Calls on another base are never taken by this base's executors.
    other_base = make_base(engine, "other-base")
    lone = interactive_model(engine, session, tenant.id, other_base.id, "imdl-c")
    _ask(engine, lone, tenant.id, other_base.id, "create_model", 0)
    assert _claim(engine, "exec-z", base.id) is None


def test_a_failed_creation_frees_the_model_and_an_unload_lets_it_go(engine: Engine) -> None:
    tenant = make_tenant(engine, "tenant-a")
    base = make_base(engine)
    session = interactive_session(engine, tenant.id, "sess-1")
    model = interactive_model(engine, session, tenant.id, base.id, "imdl-a")
    _ask(engine, model, tenant.id, base.id, "create_model", 0)
    created = _claim(engine, "exec-x", base.id)
    assert created is not None
    with engine.begin() as conn:
        calls.fail(conn, created, "exec-x", "rank must be positive")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT held_by FROM interactive_models")).scalar_one() is None
    _ask(engine, model, tenant.id, base.id, "unload_model", 1)
    unload = _claim(engine, "exec-y", base.id)
    assert unload is not None
    assert _finish(engine, unload, "exec-y", release_model=True)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT held_by, unloaded_at FROM interactive_models")).one()
    assert row.held_by is None and row.unloaded_at is not None


def test_a_training_calls_metrics_are_kept_apart_and_outlive_its_answer(engine: Engine) -> None:
    """`finish` keeps a forward_backward's, forward's and optim_step's `result["metrics"]` in
    `metrics` (the model's curves), never another kind's; the retention pass lets the answers
    go and keeps those."""
    tenant = make_tenant(engine, "tenant-a")
    base = make_base(engine)
    session = interactive_session(engine, tenant.id, "sess-1")
    model = interactive_model(engine, session, tenant.id, base.id, "imdl-a")
    answers = {  # every answer has metrics; only the training kinds' are kept apart
        "create_model": {"model_id": model, "metrics": {"loss:sum": 7.0}},
        "forward_backward": {"loss_fn_outputs": [], "metrics": {"loss:sum": 3.25}},
        "forward": {"loss_fn_outputs": [], "metrics": {"loss:sum": 2.5}},
        "optim_step": {"metrics": {"grad_norm:mean": 0.75}},
        "sample": {"sequences": [], "metrics": {"loss:sum": 1.0}},
    }
    for seq, kind in enumerate(answers):
        _ask(engine, model, tenant.id, base.id, kind, seq)
        call = _claim(engine, "exec-x", base.id)
        assert call is not None and call.kind == kind
        with engine.begin() as conn:
            assert calls.finish(conn, call, "exec-x", answers[kind])

    def kept() -> dict[str, Any]:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT kind, result, metrics FROM interactive_calls ORDER BY seq")
            )
            return {r.kind: (r.result, r.metrics) for r in rows}

    metrics = {
        "create_model": None,
        "forward_backward": {"loss:sum": 3.25},
        "forward": {"loss:sum": 2.5},
        "optim_step": {"grad_norm:mean": 0.75},
        "sample": None,
    }
    assert kept() == {kind: (answers[kind], metrics[kind]) for kind in answers}
    with engine.begin() as conn:
        conn.execute(text("UPDATE interactive_calls SET finished_at = now() - interval '2 hours'"))
    assert calls.forget_payloads(engine, 3600) == len(answers)
    assert kept() == {kind: (None, metrics[kind]) for kind in answers}


def test_executors_racing_over_many_models_run_each_call_once_in_its_order(
    engine: Engine,
) -> None:
    tenant = make_tenant(engine, "tenant-a")
    base = make_base(engine)
    session = interactive_session(engine, tenant.id, "sess-1")
    models = [interactive_model(engine, session, tenant.id, base.id, f"imdl-{i}") for i in range(6)]
    asked = [(m, seq) for m in models for seq in range(12)]
    random.Random(7).shuffle(asked)
    for model, seq in asked:
        _ask(engine, model, tenant.id, base.id, "forward_backward", seq)
    ran: dict[str, list[tuple[int, str]]] = defaultdict(list)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def executor(name: str) -> None:
        try:
            idle = 0
            while idle < 50:
                call = _claim(engine, name, base.id)
                if call is None:
                    idle += 1
                    continue
                idle = 0
                with lock:
                    ran[call.model_id].append((call.seq, name))
                assert _finish(engine, call, name)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=executor, args=(f"exec-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for model in models:
        seqs = [seq for seq, _ in ran[model]]
        assert seqs == list(range(12)), model
        assert len({name for _, name in ran[model]}) == 1, "one executor per model"
    with engine.connect() as conn:
        assert (
            conn.execute(
                text("SELECT count(*) FROM interactive_calls WHERE status <> 'completed'")
            ).scalar_one()
            == 0
        )


def test_an_executor_that_stops_has_its_models_calls_answered_and_freed(engine: Engine) -> None:
    tenant = make_tenant(engine, "tenant-a")
    base = make_base(engine)
    session = interactive_session(engine, tenant.id, "sess-1")
    lost_model = interactive_model(engine, session, tenant.id, base.id, "imdl-lost")
    kept_model = interactive_model(engine, session, tenant.id, base.id, "imdl-kept")
    with engine.begin() as conn:
        for executor in ("exec-gone", "exec-alive"):
            report(conn, TrainerReport(id=executor, host="h", pid=1, device="cpu"))
    _ask(engine, lost_model, tenant.id, base.id, "create_model", 0)
    _ask(engine, kept_model, tenant.id, base.id, "create_model", 0)
    running = _claim(engine, "exec-gone", base.id)
    assert running is not None and running.model_id == lost_model
    kept = _claim(engine, "exec-alive", base.id)
    assert kept is not None and _finish(engine, kept, "exec-alive")
    _ask(engine, lost_model, tenant.id, base.id, "forward_backward", 1)
    with engine.begin() as conn:
        assert interactive_health.release_lost(conn, lease_seconds=30) == 0  # both heard from
        conn.execute(
            text("UPDATE trainers SET last_heartbeat_at = now() - :ago WHERE id = 'exec-gone'"),
            {"ago": timedelta(seconds=60)},
        )
        assert interactive_health.release_lost(conn, lease_seconds=30) == 1
    for seq in (0, 1):
        status, _, error = _status(engine, f"fut-{lost_model}-{seq}")
        assert status == "failed" and error["category"] == "server"
        assert "save_state" in error["error"]
    # The lost executor's late answer is dropped; the other executor's model is untouched.
    assert not _finish(engine, running, "exec-gone")
    with engine.connect() as conn:
        held: dict[str, str | None] = dict(
            conn.execute(text("SELECT id, held_by FROM interactive_models")).tuples().all()
        )
    assert held == {lost_model: None, kept_model: "exec-alive"}


def test_a_lost_executors_sampler_fails_only_what_it_ran_and_another_executor_takes_the_rest(
    engine: Engine,
) -> None:
    """A sampler's weights are the base's or in the object store, not only the lost executor's:
    the calls it was running fail (one may be what stopped it), the next waits for the next
    executor free, woken on the base's channel, and the sampler stays loaded."""
    tenant = make_tenant(engine, "tenant-a")
    base = make_base(engine)
    session = interactive_session(engine, tenant.id, "sess-1")
    sampler = interactive_model(engine, session, tenant.id, base.id, "imdl-s", kind="sampler")
    with engine.begin() as conn:
        for executor in ("exec-gone", "exec-alive"):
            report(conn, TrainerReport(id=executor, host="h", pid=1, device="cpu"))
    _ask(engine, sampler, tenant.id, base.id, "sample", 0)
    running = _claim(engine, "exec-gone", base.id)
    assert running is not None and running.model_id == sampler
    _ask(engine, sampler, tenant.id, base.id, "sample", 1)
    assert _claim(engine, "exec-alive", base.id) is None  # the sampler is exec-gone's
    with psycopg.connect(
        engine.url.set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    ) as listener:
        listener.execute(f"LISTEN {calls.CHANNEL}")
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE trainers SET last_heartbeat_at = now() - :ago WHERE id = 'exec-gone'"),
                {"ago": timedelta(seconds=60)},
            )
            assert interactive_health.release_lost(conn, lease_seconds=30) == 1
        woken = [n.payload for n in listener.notifies(timeout=5, stop_after=1)]
    assert woken == [base.id]
    status, _, error = _status(engine, f"fut-{sampler}-0")
    assert status == "failed" and error["category"] == "server"
    assert "stopped before it answered" in error["error"]
    assert _status(engine, f"fut-{sampler}-1")[0] == "pending"
    taken = _claim(engine, "exec-alive", base.id)
    assert taken is not None and (taken.model_id, taken.seq) == (sampler, 1)
    assert _finish(engine, taken, "exec-alive")
    assert not _finish(engine, running, "exec-gone")  # the lost executor's late answer: dropped
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT held_by, unloaded_at FROM interactive_models WHERE id = :m"),
            {"m": sampler},
        ).one()
    assert tuple(row) == ("exec-alive", None)


def test_a_silent_sessions_models_are_let_go_and_its_waiting_calls_failed(engine: Engine) -> None:
    tenant = make_tenant(engine, "tenant-a")
    base = make_base(engine)
    silent = interactive_session(engine, tenant.id, "sess-silent")
    alive = interactive_session(engine, tenant.id, "sess-alive")
    gone = interactive_model(engine, silent, tenant.id, base.id, "imdl-gone")
    kept = interactive_model(engine, alive, tenant.id, base.id, "imdl-kept")
    for model in (gone, kept):
        _ask(engine, model, tenant.id, base.id, "create_model", 0)
        created = _claim(engine, "exec-x", base.id)
        assert created is not None and _finish(engine, created, "exec-x")
    running_id = _ask(engine, gone, tenant.id, base.id, "forward_backward", 1)
    running = _claim(engine, "exec-x", base.id)
    assert running is not None and running.id == running_id
    waiting = _ask(engine, gone, tenant.id, base.id, "optim_step", 2)
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE interactive_sessions SET last_heartbeat_at = now() - :ago WHERE id = :s"),
            {"ago": timedelta(minutes=20), "s": silent},
        )
        assert interactive_health.expire_sessions(conn, timeout_seconds=900) == 1
        assert interactive_health.expire_sessions(conn, timeout_seconds=900) == 0
        # Its call in flight holds its weights until it is answered.
        assert calls.let_go_unloaded(conn, "exec-x") == []
    status, _, error = _status(engine, waiting)
    assert status == "failed" and "heartbeat" in error["error"]
    assert _status(engine, running_id)[0] == "running"
    assert _finish(engine, running, "exec-x")
    with engine.begin() as conn:
        assert calls.let_go_unloaded(conn, "exec-y") == []  # not its model
        assert calls.let_go_unloaded(conn, "exec-x") == [gone]
        held = dict(conn.execute(text("SELECT id, held_by FROM interactive_models")).tuples().all())
    assert held == {gone: None, kept: "exec-x"}


def test_a_session_renewed_while_its_expiry_waits_keeps_its_models(engine: Engine) -> None:
    """A heartbeat (or a chat asked) renewing a silent session commits while the idle pass's
    expiry waits on its row: read again, the session is no longer silent and keeps its model."""
    tenant = make_tenant(engine, "tenant-a")
    base = make_base(engine)
    session = interactive_session(engine, tenant.id, "sess-renewed")
    model = interactive_model(engine, session, tenant.id, base.id, "imdl-renewed")
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE interactive_sessions SET last_heartbeat_at = now() - :ago WHERE id = :s"),
            {"ago": timedelta(minutes=20), "s": session},
        )
    expired: list[int] = []
    with engine.connect() as renewing:
        renewing.execute(
            text("UPDATE interactive_sessions SET last_heartbeat_at = now() WHERE id = :s"),
            {"s": session},
        )

        def expire() -> None:
            with engine.begin() as conn:
                expired.append(interactive_health.expire_sessions(conn, timeout_seconds=900))

        expiry = threading.Thread(target=expire)
        expiry.start()
        expiry.join(1.0)
        assert expiry.is_alive()  # it waits on the session's row
        renewing.commit()
    expiry.join(10)
    assert expired == [0]
    with engine.connect() as conn:
        unloaded = conn.execute(
            text("SELECT unloaded_at FROM interactive_models WHERE id = :m"), {"m": model}
        ).scalar_one()
    assert unloaded is None


def test_a_model_unloaded_before_any_executor_held_it_has_its_calls_failed_not_taken(
    engine: Engine,
) -> None:
    tenant = make_tenant(engine, "tenant-a")
    base = make_base(engine)
    session = interactive_session(engine, tenant.id, "sess-1")
    never = interactive_model(engine, session, tenant.id, base.id, "imdl-never")
    held = interactive_model(engine, session, tenant.id, base.id, "imdl-held")
    _ask(engine, held, tenant.id, base.id, "create_model", 0)
    created = _claim(engine, "exec-x", base.id)
    assert created is not None and _finish(engine, created, "exec-x")
    # The session ends (finish_session: each model unloaded, an unload call asked of each)
    # before the first model's creation ran anywhere.
    orphaned = [
        _ask(engine, never, tenant.id, base.id, kind, seq)
        for seq, kind in enumerate(("create_model", "unload_model"))
    ]
    unload_held = _ask(engine, held, tenant.id, base.id, "unload_model", 1)
    with engine.begin() as conn:
        conn.execute(text("UPDATE interactive_models SET unloaded_at = now()"))
    # Nobody takes the never-held model's calls; its holder still takes the held one's unload.
    assert _claim(engine, "exec-y", base.id) is None
    taken = _claim(engine, "exec-x", base.id)
    assert taken is not None and taken.id == unload_held
    with engine.begin() as conn:
        assert interactive_health.fail_orphaned(conn) == 2
        assert interactive_health.fail_orphaned(conn) == 0
    for call_id in orphaned:
        status, _, error = _status(engine, call_id)
        assert status == "failed" and "unloaded before" in error["error"]
    assert _status(engine, unload_held)[0] == "running"
