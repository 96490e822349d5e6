"""A job's priority changed after it was submitted (`JobQueue.set_priority`,
`sweeps.prioritize_matching`, `POST /v1/fine_tuning/jobs/{id}/priority` and
`/v1/fine_tuning/jobs/priority`), on a real PostgreSQL: a queued job takes its new place in the
claim's order at once, the others keep it for when they are queued, the jobs over or cancelling
refuse it, the queue's bookkeeping stays exact, and a sweep's reprioritizing races claims and a
cancel of the same jobs without a deadlock."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from control_plane import audit
from control_plane.queue import JobQueue, JobStateError
from control_plane.services import Services
from control_plane.settings import Settings
from control_plane.sweeps import cancel_matching, prioritize_matching
from loraforge import Client, LoraforgeError
from loraforge.cli import build_parser
from tests.api_harness import TenantKeys
from tests.factories import (
    STATE_SQL,
    SWEEP_METADATA,
    SWEEP_SELECTORS,
    assert_no_drift,
    enqueue_jobs,
    jobs_in_states,
    make_base,
    make_file,
    make_tenant,
    tag_jobs,
)

TAKES_PRIORITY = {"validating", "queued", "paused", "running", "pausing"}


def _rows(engine: Engine, job_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """Each job's (status, priority, cancel_requested, pause_requested, events)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, status, priority, cancel_requested, pause_requested, "
                "(SELECT count(*) FROM job_events e WHERE e.job_id = jobs.id) AS events "
                "FROM jobs WHERE id = ANY(:ids)"
            ),
            {"ids": job_ids},
        )
        return {r.id: tuple(r)[1:] for r in rows}


def _last_event(engine: Engine, job_id: str) -> tuple[str, dict[str, Any]]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT message, data FROM job_events WHERE job_id = :id ORDER BY id DESC LIMIT 1"
            ),
            {"id": job_id},
        ).one()
        return row.message, row.data


def _claim(queue: JobQueue, worker: str) -> str:
    job = queue.claim(worker)
    assert job is not None
    return job.id


def test_a_person_moves_an_urgent_job_ahead_of_their_sweep_then_the_sweep_behind_everyone(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    """A tenant's urgent job waits behind six of its own sweep's jobs; given priority 10 it is
    the next claim's at once (its standing says so before any claim), and its events say what
    it was. Then the sweep makes way for another tenant's jobs: priority -5 for all six in one
    request, and the other tenant's jobs are claimed first though that tenant runs more."""
    engine, queue = services.engine, services.queue
    base_id = make_base(engine, "tiny-priority").id
    file_a = make_file(engine, tenant_a.tenant_id).id
    sweep = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_a, 6)
    tag_jobs(engine, {"sweep": "grid"}, *sweep)
    [urgent] = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_a, 1)
    client = Client(live_url, tenant_a.member)
    standing = client.queue_standing(urgent)
    assert (standing["waiting_for"], standing["own_jobs_ahead"]) == ("own_jobs", 6)

    job = client.set_priority(urgent, 10)
    assert (job["id"], job["status"], job["priority"]) == (urgent, "queued", 10)
    standing = client.queue_standing(urgent)
    assert (standing["waiting_for"], standing["own_jobs_ahead"]) == ("trainer", 0)
    sdk = openai.OpenAI(base_url=f"{live_url}/v1", api_key=tenant_a.reader, max_retries=0)
    [newest] = sdk.fine_tuning.jobs.list_events(urgent, limit=1).data
    assert newest.message == "Priority changed from 0 to 10"
    events = _rows(engine, [urgent])[urgent][-1]
    assert client.set_priority(urgent, 10)["priority"] == 10  # the same: nothing happens
    assert _rows(engine, [urgent])[urgent][-1] == events
    assert_no_drift(engine)
    assert _claim(queue, "w1") == urgent

    file_b = make_file(engine, tenant_b.tenant_id).id
    theirs = enqueue_jobs(engine, tenant_b.tenant_id, base_id, file_b, 3)
    theirs_first = _claim(queue, "w2")
    assert theirs_first in theirs  # b runs none and a one: b's share is lower
    moved = client.prioritize_jobs({"sweep": "grid"}, -5)
    assert moved == {
        "object": "fine_tuning.jobs.prioritized",
        "metadata": {"sweep": "grid"},
        "priority": -5,
        "changed": 6,
    }
    assert client.prioritize_jobs({"sweep": "grid"}, -5)["changed"] == 0
    assert _last_event(engine, sweep[0]) == (
        "Priority changed from 0 to -5",
        {"priority": -5, "previous_priority": 0},
    )
    assert_no_drift(engine)
    # Each tenant runs one: a's sweep would go first (a was served less recently), but its
    # priority is lower now: b's other two jobs go first, then the sweep.
    claimed = [_claim(queue, f"w{n}") for n in range(3, 7)]
    assert set(claimed[:2]) == set(theirs) - {theirs_first}
    assert set(claimed[2:]) <= set(sweep)
    assert_no_drift(engine)


@pytest.mark.parametrize("state", [*sorted(STATE_SQL), "failed", "cancelled"])
def test_each_state_takes_a_new_priority_or_refuses_it_unchanged(
    engine: Engine, state: str
) -> None:
    """Validating, queued, paused and running jobs (asked to pause or not) take it, with an
    event; cancelling and finished jobs refuse it, their row and events as they were."""
    tenant = make_tenant(engine, f"s-{state}")
    base_id = make_base(engine, f"b-{state}").id
    file_id = make_file(engine, tenant.id).id
    [job_id] = enqueue_jobs(engine, tenant.id, base_id, file_id, 1)
    sql = STATE_SQL.get(state) or f"status = '{state}', finished_at = now()"
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE jobs SET {sql} WHERE id = :id"), {"id": job_id})
    before = _rows(engine, [job_id])[job_id]
    queue = JobQueue(engine)
    if state in TAKES_PRIORITY:
        job = queue.set_priority(job_id, 7)
        assert (job.priority, job.status) == (7, before[0])
        status, _, cancel, pause, events = before
        assert _rows(engine, [job_id])[job_id] == (status, 7, cancel, pause, events + 1)
        assert _last_event(engine, job_id)[0] == "Priority changed from 0 to 7"
    else:
        with pytest.raises(JobStateError) as refused:
            queue.set_priority(job_id, 7)
        assert refused.value.status == before[0]
        assert _rows(engine, [job_id])[job_id] == before
    assert_no_drift(engine)


def test_a_new_priority_is_refused_with_a_reason_and_changes_nothing(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    engine, queue = services.engine, services.queue
    base_id = make_base(engine, "tiny-priority").id
    file_id = make_file(engine, tenant_a.tenant_id).id
    [done] = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 1)
    assert queue.complete(_claim(queue, "w"), "w") is not None
    [waiting] = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 1)
    tag_jobs(engine, {"sweep": "s"}, waiting, done)
    before = _rows(engine, [waiting, done])
    one = f"{live_url}/v1/fine_tuning/jobs/{waiting}/priority"
    sweep = f"{live_url}/v1/fine_tuning/jobs/priority"
    cases: list[tuple[str, dict[str, str], Any, int, str]] = [
        (one, tenant_a.headers(), {"priority": 101}, 400, "priority"),
        (one, tenant_a.headers(), {"priority": -101}, 400, "priority"),
        (one, tenant_a.headers(), {"priority": "high"}, 400, "priority"),
        (one, tenant_a.headers(), {}, 400, "priority"),
        (one, tenant_a.headers(), {"priority": 3, "status": "queued"}, 400, "status"),
        (one, tenant_a.headers("reader"), {"priority": 3}, 403, "reader role"),
        (one, {}, {"priority": 3}, 401, "key"),
        (one, tenant_b.headers(), {"priority": 3}, 404, waiting),
        (one.replace(waiting, done), tenant_a.headers(), {"priority": 3}, 409, "succeeded"),
        (sweep, tenant_a.headers(), {"metadata": {"sweep": "s"}}, 400, "priority"),
        (sweep, tenant_a.headers(), {"metadata": {}, "priority": 3}, 400, "metadata"),
        (sweep, tenant_a.headers(), {"metadata": {"sweep": "s"}, "priority": 200}, 400, "priority"),
        (
            sweep,
            tenant_a.headers("reader"),
            {"metadata": {"sweep": "s"}, "priority": 3},
            403,
            "reader role",
        ),
    ]
    for url, headers, body, status, named in cases:
        answer = httpx.post(url, json=body, headers=headers)
        assert answer.status_code == status, (url, body, answer.text)
        error = answer.json()["error"]
        assert named in error["message"].lower() or named == error.get("param"), error
        if status == 409:
            assert error["code"] == "job_not_prioritizable"
    with pytest.raises(LoraforgeError) as refused:
        Client(live_url, tenant_a.reader).prioritize_jobs({"sweep": "s"}, 3)
    assert refused.value.status == 403
    assert _rows(engine, [waiting, done]) == before  # nothing changed, no event written


@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    jobs=st.lists(
        st.tuples(
            st.sampled_from(sorted(STATE_SQL)),
            st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4]),  # its metadata: mostly a sweep's
            st.integers(0, 2),  # created_at: three instants, so many jobs tie
            st.sampled_from([True, True, True, False]),  # the tenant's, or another's
            st.integers(-1, 1),  # its priority
        ),
        min_size=1,
        max_size=30,
    ),
    selector=st.integers(0, len(SWEEP_SELECTORS) - 1),
    batch=st.integers(1, 4),
    priority=st.integers(-1, 1),
)
# Always: one job in every state, half of them at the priority asked for already.
@example(
    jobs=[(s, 0, 1, True, n % 2) for n, s in enumerate(sorted(STATE_SQL))],
    selector=0,
    batch=3,
    priority=1,
)
def test_a_sweeps_new_priority_changes_exactly_the_matching_jobs_and_keeps_the_queue_exact(
    engine: Engine,
    jobs: list[tuple[str, int, int, bool, int]],
    selector: int,
    batch: int,
    priority: int,
) -> None:
    """Random jobs in every state and at three priorities, with metadata that matches in
    whole, in part or not at all, created at three instants, some another tenant's: in batches
    of 1 to 4, exactly the tenant's matching jobs that take a priority and had another take it,
    each with its event, nothing else changes, the count says how many, and every line's head
    (the claim's view of the backlog) is what the jobs say it is."""
    mine, ids = jobs_in_states(
        engine,
        [(state, SWEEP_METADATA[meta], at, own, was) for state, meta, at, own, was in jobs],
    )
    before = _rows(engine, ids)
    wanted = SWEEP_SELECTORS[selector]

    changed = prioritize_matching(engine, mine, wanted, priority, batch=batch)

    expected = dict(before)
    for job_id, (state, meta, _, own, was) in zip(ids, jobs, strict=True):
        holds = wanted.items() <= (SWEEP_METADATA[meta] or {}).items()
        if own and holds and state in TAKES_PRIORITY and was != priority:
            status, _, cancel, pause, events = before[job_id]
            expected[job_id] = (status, priority, cancel, pause, events + 1)
            assert _last_event(engine, job_id) == (
                f"Priority changed from {was} to {priority}",
                {"priority": priority, "previous_priority": was},
            )
    assert _rows(engine, ids) == expected
    assert changed == sum(1 for j in ids if expected[j] != before[j])
    assert_no_drift(engine)


def test_claims_a_cancel_and_a_new_priority_on_the_same_sweep_end_without_a_deadlock(
    engine: Engine,
) -> None:
    """Four claimers claim and finish, a sweep is reprioritized in batches of 5 and then
    cancelled in batches of 7 from another thread while the reprioritizing runs: each takes
    its jobs' rows before their tenant's and line's rows, in the same order, so none waits in
    a circle (PostgreSQL would abort one with a deadlock error); every job of the sweep ends
    cancelled or cancelling, and the bookkeeping is exact."""
    tenant = make_tenant(engine, "racing-priority", max_running_jobs=1000)
    base_id = make_base(engine, "tiny-race").id
    file_id = make_file(engine, tenant.id).id
    sweep = enqueue_jobs(engine, tenant.id, base_id, file_id, 300)
    enqueue_jobs(engine, tenant.id, base_id, file_id, 100)
    tag_jobs(engine, {"sweep": "race"}, *sweep)
    queue = JobQueue(engine, max_running_per_tenant=1000)
    stop = threading.Event()
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        claims = 0
        while not stop.is_set():
            job = queue.claim(name)
            if job is None:
                return
            claims += 1
            if claims % 2:  # every other one finishes: its tenant's row and line move again
                queue.complete(job.id, name)

    def run(move: Any) -> None:
        try:
            move()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"c{n}",)) for n in range(4)]
    threads += [
        threading.Thread(
            target=run,
            args=(
                lambda p=p: prioritize_matching(engine, tenant.id, {"sweep": "race"}, p, batch=5),
            ),
        )
        for p in (3, -3)
    ]
    for thread in threads:
        thread.start()
    run(lambda: cancel_matching(engine, tenant.id, {"sweep": "race"}, batch=7))
    stop.set()
    for thread in threads:
        thread.join(120)
    assert errors == []
    with engine.connect() as conn:
        statuses = set(
            conn.execute(
                text("SELECT DISTINCT status FROM jobs WHERE id = ANY(:ids)"), {"ids": sweep}
            ).scalars()
        )
    assert statuses <= {"cancelled", "cancelling", "succeeded"}
    assert_no_drift(engine)


def _admin(database_url: str, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        args = build_parser().parse_args(["admin", *argv])
        code = int(args.func(args, Settings(database_url=database_url)))
    except SystemExit as exit:  # argparse's refusal
        code = int(exit.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _interactive_cap(engine: Engine, name: str) -> int | None:
    with engine.connect() as conn:
        cap = conn.execute(
            text("SELECT max_interactive_models FROM tenants WHERE name = :n"), {"n": name}
        ).scalar_one()
    return None if cap is None else int(cap)


def test_a_tenants_priority_cap_refuses_what_is_above_it_wherever_it_is_asked_for(
    services: Services,
    database_url: str,
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The platform's operator caps a tenant's priority (`loraforge admin tenant NAME
    --max-priority 5`): a job created above it, a job given one above it and a sweep given one
    above it are refused (403, the cap named) with nothing created or changed; at or below the
    cap they are taken, lowering always is, and another tenant is not capped. `none` lifts it; the
    platform's default (`MAX_PRIORITY_PER_TENANT`) caps every tenant without a cap of its own.
    The same command (and `create-key` for a new tenant) sets, shows and clears the tenant's cap
    on loaded interactive models, a default shown as such."""
    engine = services.engine
    base_name = make_base(engine, "tiny-priority").name
    file_id = make_file(engine, tenant_a.tenant_id).id
    with engine.connect() as conn:
        name = conn.execute(
            text("SELECT name FROM tenants WHERE id = :id"), {"id": tenant_a.tenant_id}
        ).scalar_one()
    assert _admin(database_url, capsys, "tenant", name, "--max-priority", "5") == (
        0,
        f"tenant {name} ({tenant_a.tenant_id}): max_running_jobs 4 (default), max_priority 5, "
        "max_interactive_models 8 (default), max_checkpoint_bytes none\n",
    )
    code, said = _admin(database_url, capsys, "tenant", name, "--max-priority", "101")
    assert code == 2 and "101 is not from -100 to 100" in said
    for bad, why in (("0", "0 is not from 1 to 10000"), ("many", "'many' is not a whole number")):
        code, said = _admin(database_url, capsys, "tenant", name, "--max-interactive-models", bad)
        assert code == 2 and why in said
    assert _interactive_cap(engine, name) is None  # refused: nothing set
    code, said = _admin(database_url, capsys, "tenant", name, "--max-interactive-models", "3")
    assert code == 0 and said.endswith(
        "max_priority 5, max_interactive_models 3, max_checkpoint_bytes none\n"
    )
    assert _interactive_cap(engine, name) == 3
    code, said = _admin(database_url, capsys, "tenant", name, "--max-interactive-models", "none")
    assert code == 0 and said.endswith(
        "max_interactive_models 8 (default), max_checkpoint_bytes none\n"
    )
    assert _interactive_cap(engine, name) is None
    code, said = _admin(
        database_url, capsys, "create-key", "--tenant", "newco", "--max-interactive-models", "2"
    )
    assert code == 0 and said.startswith("lf-")
    assert _interactive_cap(engine, "newco") == 2
    # What the command line changed is in each tenant's audit log, done by no key.
    today = datetime.now(UTC).date()
    with engine.connect() as conn:
        newco = conn.execute(text("SELECT id FROM tenants WHERE name = 'newco'")).scalar_one()
        made = audit.day_entries(conn, newco, today, "all")
        changed = audit.day_entries(conn, tenant_a.tenant_id, today, "organizations")
    assert [(e.event, "actor" in e.details) for e in made] == [
        ("tenant_created", False),
        ("api_key_created", False),
    ]
    assert made[0].details["limits"]["max_interactive_models"] == 2
    assert [e.details["limits"] for e in changed] == [
        {"max_priority": 5},
        {"max_interactive_models": 3},
        {"max_interactive_models": None},
    ]
    client = Client(live_url, tenant_a.member)
    body = {"model": base_name, "training_file": file_id}
    with pytest.raises(LoraforgeError) as refused:
        client.create_job(**body, priority=6)
    assert (refused.value.status, refused.value.code, refused.value.param) == (
        403,
        "priority_above_tenant_cap",
        "priority",
    )
    assert "above 5, the highest this tenant's jobs may ask for" in refused.value.message
    with engine.connect() as conn:
        assert (
            conn.execute(
                text("SELECT count(*) FROM jobs WHERE tenant_id = :t"), {"t": tenant_a.tenant_id}
            ).scalar_one()
            == 0
        )  # nothing created
    [job_id] = enqueue_jobs(engine, tenant_a.tenant_id, make_base(engine, "b2").id, file_id, 1)
    tag_jobs(engine, {"sweep": "s"}, job_id)
    assert client.set_priority(job_id, 5)["priority"] == 5  # at the cap: taken
    before = _rows(engine, [job_id])
    for ask in (
        lambda: client.set_priority(job_id, 6),
        lambda: client.prioritize_jobs({"sweep": "s"}, 100),
    ):
        with pytest.raises(LoraforgeError) as refused:
            ask()
        assert (refused.value.status, refused.value.code) == (403, "priority_above_tenant_cap")
    assert _rows(engine, [job_id]) == before  # nothing changed, no event
    assert client.prioritize_jobs({"sweep": "s"}, -3)["changed"] == 1  # lowering: taken
    other = Client(live_url, tenant_b.member)
    file_b = make_file(engine, tenant_b.tenant_id).id
    assert other.create_job(model=base_name, training_file=file_b, priority=100)["priority"] == 100

    assert _admin(database_url, capsys, "tenant", name, "--max-priority", "none")[1].endswith(
        "max_priority none, max_interactive_models 8 (default), max_checkpoint_bytes none\n"
    )
    assert client.set_priority(job_id, 100)["priority"] == 100
    code, said = _admin(database_url, capsys, "tenant", name, "--max-running-jobs", "1")
    assert code == 0 and "max_running_jobs 1, max_priority none" in said
    with engine.connect() as conn:  # its queue line re-flagged against the new limit
        assert conn.execute(
            text("SELECT DISTINCT max_running FROM queue_heads WHERE tenant_id = :t"),
            {"t": tenant_a.tenant_id},
        ).scalars().all() == [1]
    assert _admin(database_url, capsys, "tenant", "nobody") == (1, "no tenant named 'nobody'\n")

    # The platform's default cap (MAX_PRIORITY_PER_TENANT) holds for a tenant without its own.
    services.settings.max_priority_per_tenant = 10
    with pytest.raises(LoraforgeError) as refused:
        other.create_job(model=base_name, training_file=file_b, priority=11)
    assert refused.value.status == 403 and "above 10" in refused.value.message
    assert other.create_job(model=base_name, training_file=file_b, priority=10)["priority"] == 10
    with pytest.raises(LoraforgeError) as refused:  # a has no cap of its own either now
        client.set_priority(job_id, 50)
    assert refused.value.status == 403
    monkeypatch.setenv("LORAFORGE_MAX_PRIORITY_PER_TENANT", "10")
    monkeypatch.setenv("LORAFORGE_MAX_INTERACTIVE_MODELS_PER_TENANT", "6")
    monkeypatch.setenv("LORAFORGE_MAX_CHECKPOINT_BYTES_PER_TENANT", "5000000000")
    assert _admin(database_url, capsys, "tenant", name)[1].endswith(
        "max_priority 10 (default), max_interactive_models 6 (default), "
        "max_checkpoint_bytes 5000000000 (5 GB, default)\n"
    )
    assert _admin(database_url, capsys, "tenant", name, "--max-priority", "100")[0] == 0
    assert client.set_priority(job_id, 50)["priority"] == 50  # its own cap before the default
    assert_no_drift(engine)
