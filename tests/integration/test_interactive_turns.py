"""The tenants take turns on a base's executors (revision 0025), on real PostgreSQL: one
tenant's burst of calls does not hold back a call another tenant asks a moment later, and the
claim's every choice equals a straightforward reference over random states (models held
elsewhere, unloaded, running, failed; tenants served at random times)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, text

from control_plane import interactive_calls as calls
from tests.factories import interactive_model, interactive_session, make_base, make_tenant

T0 = datetime(2026, 12, 5, tzinfo=UTC)


def _ask(engine: Engine, model: str, tenant: str, base: str, seq: int, at: datetime) -> str:
    call_id = f"fut-{model}-{seq}"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO interactive_calls "
                "(id, model_id, tenant_id, base_model_id, seq, kind, created_at) "
                "VALUES (:id, :model, :tenant, :base, :seq, 'forward', :at)"
            ),
            {"id": call_id, "model": model, "tenant": tenant, "base": base, "seq": seq, "at": at},
        )
    return call_id


def _claim(engine: Engine, executor: str, base: str) -> calls.Call | None:
    with engine.begin() as conn:
        return calls.claim_next(conn, executor, base)


def _finish(engine: Engine, call: calls.Call, executor: str) -> None:
    with engine.begin() as conn:
        assert calls.finish(conn, call, executor, {})


def test_a_tenants_burst_does_not_hold_back_the_calls_other_tenants_ask_after_it(
    engine: Engine,
) -> None:
    """Tenant A asks 40 calls of one model, then 5 of another; B and C ask theirs after. One
    executor serves A, B, C in turn while each has a call that can run, then A's rest, each
    model's calls in order. (The oldest call first would have run all of A's before B's.)"""
    base = make_base(engine).id
    tenants = {name: make_tenant(engine, f"tenant-{name}").id for name in "ABC"}
    owner: dict[str, str] = {}
    at = iter(T0 + timedelta(milliseconds=i) for i in range(1000))
    for name, models in (("A", {"a1": 40, "a2": 5}), ("B", {"b1": 3}), ("C", {"c1": 2})):
        session = interactive_session(engine, tenants[name], f"sess-{name}")
        for model, count in models.items():
            interactive_model(engine, session, tenants[name], base, model)
            owner[model] = name
            for seq in range(count):
                _ask(engine, model, tenants[name], base, seq, next(at))
    served: list[tuple[str, int]] = []
    while (call := _claim(engine, "exec-1", base)) is not None:
        served.append((call.model_id, call.seq))
        _finish(engine, call, "exec-1")
    assert [owner[m] for m, _ in served[:8]] == list("ABCABCAB")
    assert {owner[m] for m, _ in served[8:]} == {"A"}
    assert len(served) == 50
    for model in owner:
        seqs = [seq for m, seq in served if m == model]
        assert seqs == sorted(seqs) == list(range(len(seqs))), model
    # Within A's turns, its oldest runnable call first: a1's first, then a2's while a1's 0 ran.
    assert served[0] == ("a1", 0) and served[3] == ("a1", 1)


@dataclass
class _Model:
    id: str
    tenant: str
    held_by: str | None
    unloaded: bool


def _reference(engine: Engine, base: str, executor: str) -> str | None:
    """The call the claim must take, computed plainly from the rows: each model's first
    unfinished call when it is pending and the model is this executor's or free (and not
    unloaded); of those, the tenant served least recently (never first), then the oldest."""
    with engine.connect() as conn:
        models = {
            r.id: _Model(r.id, r.tenant_id, r.held_by, r.unloaded_at is not None)
            for r in conn.execute(
                text(
                    "SELECT id, tenant_id, held_by, unloaded_at FROM interactive_models "
                    "WHERE base_model_id = :b"
                ),
                {"b": base},
            )
        }
        rows = conn.execute(
            text(
                "SELECT id, model_id, seq, status, created_at FROM interactive_calls "
                "WHERE base_model_id = :b ORDER BY model_id, seq"
            ),
            {"b": base},
        ).all()
        turns = dict(
            conn.execute(
                text("SELECT tenant_id, served_at FROM interactive_turns WHERE base_model_id = :b"),
                {"b": base},
            ).all()
        )
    first: dict[str, Any] = {}
    for row in rows:
        if row.status in ("pending", "running") and row.model_id not in first:
            first[row.model_id] = row
    candidates = []
    for model_id, row in first.items():
        model = models[model_id]
        free = model.held_by is None and not model.unloaded
        if row.status != "pending" or not (model.held_by == executor or free):
            continue
        turn = turns.get(model.tenant)
        candidates.append(((turn is not None, turn or T0), row.created_at, row.seq, row.id))
    return min(candidates)[-1] if candidates else None


def test_every_claim_equals_the_reference_on_random_states(engine: Engine) -> None:
    rng = random.Random(2026)
    base = make_base(engine).id
    other_base = make_base(engine, "other-base").id
    tenants = [make_tenant(engine, f"tenant-{i}").id for i in range(5)]
    at = iter(T0 + timedelta(milliseconds=rng.randrange(0, 3) + 3 * i) for i in range(100_000))
    models: list[tuple[str, str, int]] = []  # (model, tenant, next seq)
    for i in range(14):
        tenant = rng.choice(tenants)
        session = interactive_session(engine, tenant, f"sess-{i}")
        model = interactive_model(engine, session, tenant, base, f"imdl-{i:02d}")
        models.append((model, tenant, 0))
    # Another base's calls are never taken here.
    session = interactive_session(engine, tenants[0], "sess-other")
    _ask(
        engine,
        interactive_model(engine, session, tenants[0], other_base, "imdl-x"),
        tenants[0],
        other_base,
        0,
        T0,
    )
    with engine.begin() as conn:  # some tenants served before, at random times
        for tenant in rng.sample(tenants, 3):
            conn.execute(
                text("INSERT INTO interactive_turns VALUES (:t, :b, :at)"),
                {"t": tenant, "b": base, "at": T0 + timedelta(seconds=rng.randrange(100))},
            )
    running: list[tuple[calls.Call, str]] = []
    checked = taken = 0
    for _ in range(400):
        action = rng.random()
        if action < 0.35:  # a tenant asks more of one of its models
            i = rng.randrange(len(models))
            model, tenant, seq = models[i]
            for _ in range(rng.randrange(1, 6)):
                _ask(engine, model, tenant, base, seq, next(at))
                seq += 1
            models[i] = (model, tenant, seq)
        elif action < 0.45:  # another executor holds a model now, or one is unloaded
            model = rng.choice(models)[0]
            change = rng.choice(["held_by = 'exec-other'", "held_by = NULL, unloaded_at = now()"])
            with engine.begin() as conn:
                conn.execute(
                    text(
                        f"UPDATE interactive_models SET {change} WHERE id = :m AND held_by IS "
                        "DISTINCT FROM 'exec-1'"
                    ),
                    {"m": model},
                )
        elif action < 0.7 and running:  # a running call is answered, or fails
            call, executor = running.pop(rng.randrange(len(running)))
            with engine.begin() as conn:
                if rng.random() < 0.8:
                    assert calls.finish(conn, call, executor, {})
                else:
                    assert calls.fail(conn, call, executor, "refused")
        else:
            expected = _reference(engine, base, "exec-1")
            call = _claim(engine, "exec-1", base)
            assert (call.id if call else None) == expected
            checked += 1
            if call is not None:
                taken += 1
                running.append((call, "exec-1"))
    assert checked > 100 and taken > 50, (checked, taken)
