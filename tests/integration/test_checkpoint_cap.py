"""The cap on a tenant's checkpoint storage holds exactly when saves are written: the executor
checks a save's size against the cap before it uploads anything (`saving.save`,
`interactive_storage.make_room`), so saves asked while the tenant was below its cap cannot
together pass it. Real PostgreSQL, the real local object store, the real executor on the tiny
test base."""

# ruff: noqa: F811 (the runner tests' fixtures, imported, are parameters here)

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from control_plane import interactive_calls, interactive_saves, interactive_storage
from control_plane.services import Services
from tests.factories import ask_call, interactive_model
from tests.integration.test_interactive_runner import (  # noqa: F401
    _answer,
    _drain,
    _runner,
    services,
    world,
)
from workers.interactive.runner import InteractiveRunner


def _ask(services: Services, world: dict[str, str], model: str, kind: str, request: Any) -> str:
    with services.engine.connect() as conn:
        seq = conn.execute(
            text("SELECT count(*) FROM interactive_calls WHERE model_id = :m"), {"m": model}
        ).scalar_one()
    return ask_call(services.engine, model, world["tenant"], world["base"], kind, seq, request)


def _stored(services: Services, tenant: str) -> dict[str, int]:
    """The tenant's checkpoints by name with their recorded bytes."""
    with services.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT name, size_bytes FROM interactive_checkpoints WHERE tenant_id = :t"),
            {"t": tenant},
        ).all()
    return {row.name: int(row.size_bytes) for row in rows}


def _files(services: Services, prefix: str) -> int:
    """The bytes stored under `prefix` in the object store."""
    return sum(len(services.store.get_bytes(key)) for key in services.store.list_keys(prefix))


def _set_cap(services: Services, tenant: str, cap: int | None) -> None:
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE tenants SET max_checkpoint_bytes = :cap WHERE id = :t"),
            {"cap": cap, "t": tenant},
        )


def _prefix(services: Services, model: str, name: str) -> str:
    with services.engine.connect() as conn:
        return str(
            conn.execute(
                text(
                    "SELECT storage_prefix FROM interactive_checkpoints "
                    "WHERE model_id = :m AND name = :n"
                ),
                {"m": model, "n": name},
            ).scalar_one()
        )


def test_a_save_that_would_pass_the_cap_fails_saying_so_with_nothing_written(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A sampler save's size S is learnt with no cap; with a cap of 1.5 S, a second save asked
    while one is stored (below the cap, so the ask passes) fails naming the sizes and the cap,
    nothing of it stored and the first kept; the first overwritten under its own name fits
    (its bytes in place of its own); once the first is deleted, the second fits."""
    tenant = world["tenant"]
    model = interactive_model(services.engine, world["session"], tenant, world["base"], "imdl-a")
    runner = _runner(services, world, "exec-a", tmp_path)
    _ask(services, world, model, "create_model", {})
    probe = _ask(services, world, model, "save_weights_for_sampler", {"path": "probe"})
    _drain(runner)
    assert _answer(services, probe)[0] == "completed"
    size = _stored(services, tenant)["probe"]
    assert size > 0 and _files(services, _prefix(services, model, "probe")) == size
    with services.engine.begin() as conn:
        conn.execute(text("DELETE FROM interactive_checkpoints WHERE name = 'probe'"))
    cap = size * 3 // 2
    _set_cap(services, tenant, cap)

    first = _ask(services, world, model, "save_weights_for_sampler", {"path": "w1"})
    second = _ask(services, world, model, "save_weights_for_sampler", {"path": "w2"})
    _drain(runner)
    assert _answer(services, first)[0] == "completed"
    status, error = _answer(services, second)
    assert status == "failed" and error["category"] == "user", error
    said = interactive_storage._said
    assert error["error"] == (
        f"this save's files hold {said(size)}, which would bring your tenant's checkpoints to "
        f"{said(2 * size)}, past the limit the platform's operator set for it "
        f"(max_checkpoint_bytes = {said(cap)}); nothing was written: delete checkpoints "
        "(delete_checkpoint_from_tinker_path) or give them a time to live "
        "(set_checkpoint_ttl_from_tinker_path) before saving again"
    )
    assert _stored(services, tenant) == {"w1": size}
    w1_prefix = _prefix(services, model, "w1")
    assert _files(services, w1_prefix.replace("/w1/", "/w2/")) == 0

    # The same name again: its bytes replace its own, so it fits.
    again = _ask(services, world, model, "save_weights_for_sampler", {"path": "w1"})
    _drain(runner)
    assert _answer(services, again)[0] == "completed"
    assert _stored(services, tenant) == {"w1": size}

    with services.engine.begin() as conn:
        conn.execute(text("DELETE FROM interactive_checkpoints WHERE name = 'w1'"))
    services.store.delete_prefix(w1_prefix)
    retried = _ask(services, world, model, "save_weights_for_sampler", {"path": "w2"})
    _drain(runner)
    assert _answer(services, retried)[0] == "completed"
    assert _stored(services, tenant) == {"w2": size}


def test_two_saves_racing_on_two_executors_never_pass_the_cap_together(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """Two executors, each holding a model of one tenant, write a save each at the same moment,
    with room for one: exactly one is stored and the other fails, every time (five rounds)."""
    tenant, base = world["tenant"], world["base"]
    runners = [_runner(services, world, f"exec-{i}", tmp_path) for i in range(2)]
    models = [
        interactive_model(services.engine, world["session"], tenant, base, f"imdl-{i}")
        for i in range(2)
    ]
    for model, runner in zip(models, runners, strict=True):
        _ask(services, world, model, "create_model", {})
        _drain(runner)
    probe = _ask(services, world, models[0], "save_weights_for_sampler", {"path": "probe"})
    _drain(runners[0])
    size = _stored(services, tenant)["probe"]
    with services.engine.begin() as conn:
        conn.execute(text("DELETE FROM interactive_checkpoints WHERE name = 'probe'"))
    assert _answer(services, probe)[0] == "completed"
    _set_cap(services, tenant, size * 3 // 2)

    for round_ in range(5):
        asked = [
            _ask(services, world, model, "save_weights_for_sampler", {"path": f"r{round_}-{i}"})
            for i, model in enumerate(models)
        ]
        start = threading.Barrier(2)

        def run(runner: InteractiveRunner, start: threading.Barrier = start) -> None:
            start.wait()
            runner.run_once()

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(run, runners))
        answers = sorted(_answer(services, call_id)[0] for call_id in asked)
        assert answers == ["completed", "failed"], answers
        stored = _stored(services, tenant)
        assert len(stored) == 1 and sum(stored.values()) == size
        with services.engine.begin() as conn:
            conn.execute(
                text("DELETE FROM interactive_checkpoints WHERE tenant_id = :t"), {"t": tenant}
            )


def _advisory_locks(conn: Any) -> int:
    return int(
        conn.execute(
            text(
                "SELECT count(*) FROM pg_locks "
                "WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
        ).scalar_one()
    )


def test_a_saves_room_is_held_until_its_row_is_committed_and_no_cap_takes_no_lock(
    services: Services, world: dict[str, str]
) -> None:
    """`make_room` in one transaction holds the tenant's storage until it commits: a second
    save's check waits meanwhile and, once the first's row is committed, sees it and is
    refused. A tenant with no cap (its own nor the platform's) takes no lock."""
    engine, tenant = services.engine, world["tenant"]
    model = interactive_model(engine, world["session"], tenant, world["base"], "imdl-a")
    ask_call(engine, model, tenant, world["base"], "save_weights", 0, {"path": "s1"})
    with engine.begin() as conn:
        call = interactive_calls.claim_next(conn, "exec-1", world["base"])
        assert call is not None
    where = interactive_saves.checkpoint_location(call, "s1")

    with engine.begin() as conn:
        assert not interactive_storage.make_room(conn, tenant, None, (model, "state", "s1"), 100)
        assert _advisory_locks(conn) == 0

    def second() -> bool:
        with engine.begin() as conn:
            return interactive_storage.make_room(conn, tenant, 150, (model, "state", "s2"), 100)

    with ThreadPoolExecutor(1) as pool:
        with engine.begin() as conn:
            assert interactive_storage.make_room(conn, tenant, 150, (model, "state", "s1"), 100)
            assert _advisory_locks(conn) == 1
            waiting = pool.submit(second)
            with pytest.raises(TimeoutError):
                waiting.result(timeout=1.0)
            interactive_saves.record(conn, call, dataclasses.replace(where, size_bytes=100))
        with pytest.raises(
            interactive_storage.StorageFull, match="to 200 bytes, past the platform"
        ):
            waiting.result(timeout=30)
