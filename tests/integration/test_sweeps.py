"""Cancelling a sweep: every unfinished job of a tenant whose metadata holds the given pairs
(`control_plane.sweeps`, `POST /v1/fine_tuning/jobs/cancel`), on a real PostgreSQL. Each job
moves as its own cancel moves it; nothing else moves; the queue's bookkeeping stays exact; a
claim racing the cancel never leaves a job of the sweep running unasked."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from control_plane.queue import CANCEL_CHANNEL, JOBS_CHANNEL, JobQueue, QueueListener
from control_plane.services import Services
from control_plane.sweeps import cancel_matching, pause_matching, resume_matching
from loraforge import Client, LoraforgeError
from tests.api_harness import TenantKeys
from tests.factories import (
    SWEEP_METADATA,
    SWEEP_SELECTORS,
    assert_no_drift,
    create_validating_job,
    enqueue_jobs,
    jobs_in_states,
    make_base,
    make_file,
    make_tenant,
    tag_jobs,
)


def _states(engine: Engine, job_ids: list[str]) -> dict[str, tuple[str, bool]]:
    """Each job's (status, cancel_requested)."""
    return {job_id: full[:2] for job_id, full in _full_states(engine, job_ids).items()}


def _full_states(engine: Engine, job_ids: list[str]) -> dict[str, tuple[str, bool, bool]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, status, cancel_requested, pause_requested FROM jobs "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": job_ids},
        )
        return {r.id: (r.status, r.cancel_requested, r.pause_requested) for r in rows}


def _last_message(engine: Engine, job_id: str) -> str:
    with engine.connect() as conn:
        return str(
            conn.execute(
                text("SELECT message FROM job_events WHERE job_id = :id ORDER BY id DESC LIMIT 1"),
                {"id": job_id},
            ).scalar_one()
        )


def _claim(queue: JobQueue, worker: str) -> str:
    job = queue.claim(worker)
    assert job is not None
    return job.id


def test_a_person_cancels_a_sweep_by_its_metadata_and_only_its_unfinished_jobs_move(
    services: Services,
    database_url: str,
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
) -> None:
    engine, queue = services.engine, services.queue  # 4 running jobs a tenant by default
    base_id = make_base(engine, "tiny-sweep").id
    file_a = make_file(engine, tenant_a.tenant_id).id
    ids = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_a, 13)
    r1, r2, r3, r4 = (_claim(queue, f"w{n}") for n in range(1, 5))
    assert queue.complete(r4, "w4") is not None  # over: a cancel leaves it
    queue.request_cancel(r3)  # already cancelling: left as it is
    queue.request_pause(r2)  # running, asked to pause: a cancel still stops it
    r5 = _claim(queue, "w5")
    q1, q2, q3, q4, q5, q6, q7, q8 = (i for i in ids if i not in {r1, r2, r3, r4, r5})
    queue.request_pause(q1)
    v1 = create_validating_job(engine, tenant_a.tenant_id, base_id, file_a)
    grid = {"sweep": "grid-1"}
    tag_jobs(engine, grid, r1, r2, r3, r4, r5, q1, q2, q3, q4, v1)
    tag_jobs(engine, {"sweep": "grid-1", "lr": "0.1"}, q5)
    tag_jobs(engine, {"sweep": "grid-2"}, q6, q7)  # q8 has no metadata
    others = enqueue_jobs(
        engine, tenant_b.tenant_id, base_id, make_file(engine, tenant_b.tenant_id).id, 2
    )
    tag_jobs(engine, grid, *others)
    everything = [*ids, v1, *others]
    before = _states(engine, everything)
    assert_no_drift(engine)

    client = Client(live_url, tenant_a.member)
    # Every pair must match: the narrower selector takes the one job with both.
    narrow = client.cancel_jobs({"sweep": "grid-1", "lr": "0.1"})
    assert (narrow["cancelled"], narrow["cancelling"]) == (1, 0)
    assert _states(engine, [q5]) == {q5: ("cancelled", True)}

    with QueueListener(database_url, channels=(CANCEL_CHANNEL,)) as listener:
        listener.drain()
        moved = client.cancel_jobs(grid)
        told = {payload for _, payload in listener.wait(5)}
        while len(told) < 3 and (more := listener.wait(2)):
            told |= {payload for _, payload in more}
    assert moved == {
        "object": "fine_tuning.jobs.cancelled",
        "metadata": grid,
        "cancelled": 5,
        "cancelling": 3,
    }
    assert told == {r1, r2, r5}  # the running jobs' trainers are told
    after = _states(engine, everything)
    for job_id in (q1, q2, q3, q4, v1):
        assert after[job_id] == ("cancelled", True)
        assert _last_message(engine, job_id) == "Job cancelled"
    for job_id, worker in ((r1, "w1"), (r2, "w2"), (r5, "w5")):
        assert after[job_id] == ("cancelling", True)
        assert _last_message(engine, job_id) == "Cancellation requested"
        assert queue.heartbeat(job_id, worker).cancel_requested  # its trainer's next beat
    for job_id in (r3, r4, q6, q7, q8, *others):  # over, already asked, another sweep or tenant
        assert after[job_id] == before[job_id]
    assert_no_drift(engine)

    # What the person sees through the official SDK's metadata filter.
    sdk = openai.OpenAI(base_url=f"{live_url}/v1", api_key=tenant_a.reader, max_retries=0)
    seen = {j.id: j.status for j in sdk.fine_tuning.jobs.list(metadata=grid, limit=100).data}
    assert seen == {
        **dict.fromkeys((q1, q2, q3, q4, q5, v1), "cancelled"),
        **dict.fromkeys((r1, r2, r3, r5), "cancelling"),
        r4: "succeeded",
    }

    # Again: nothing left to move. The trainers wind down; only the other jobs are claimed.
    assert client.cancel_jobs(grid)["cancelled"] == client.cancel_jobs(grid)["cancelling"] == 0
    for job_id, worker in ((r1, "w1"), (r2, "w2"), (r5, "w5")):
        assert queue.finish_cancelled(job_id, worker) is not None
    claimed = [queue.claim(f"w{n}") for n in range(6, 12)]
    assert {job.id for job in claimed if job} == {q6, q7, q8, *others}  # tenant b's, unmoved
    assert claimed[-1] is None
    assert_no_drift(engine)


def test_a_person_pauses_a_sweep_to_make_way_and_resumes_it(
    services: Services, database_url: str, live_url: str, tenant_a: TenantKeys
) -> None:
    """A sweep makes way for something urgent: its queued jobs pause at once and are claimed
    by no one, its running job is asked to and its trainer's hand-back leaves it `paused`; the
    urgent job is claimed; resumed, the sweep is queued again (trainers woken) and claimed."""
    engine, queue = services.engine, services.queue
    base_id = make_base(engine, "tiny-sweep").id
    file_id = make_file(engine, tenant_a.tenant_id).id
    sweep = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 5)
    tag_jobs(engine, {"sweep": "grid"}, *sweep)
    running = _claim(queue, "w1")
    urgent = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 1)[0]
    client = Client(live_url, tenant_a.member)

    paused = client.pause_jobs({"sweep": "grid"})
    assert (paused["paused"], paused["pausing"]) == (4, 1)
    assert client.pause_jobs({"sweep": "grid"})["pausing"] == 0  # asked once
    states = _full_states(engine, sweep)
    assert states[running] == ("running", False, True)
    assert [states[j] for j in sweep if j != running] == [("paused", False, False)] * 4
    waiting = [j for j in sweep if j != running]
    assert _last_message(engine, waiting[0]).startswith("Job paused; resume it")
    assert queue.heartbeat(running, "w1").pause_requested  # its trainer's next beat
    assert _claim(queue, "w2") == urgent  # the sweep's queued jobs made way
    assert queue.claim("w3") is None
    handed = queue.hand_back(running, "w1", reason="asked to; stopped by w1 with a checkpoint")
    assert handed is not None and handed.status == "paused"
    assert_no_drift(engine)

    with QueueListener(database_url, channels=(JOBS_CHANNEL,)) as listener:
        listener.drain()
        resumed = client.resume_jobs({"sweep": "grid"})
        woken = listener.wait(5)
    assert (resumed["resumed"], resumed["pause_withdrawn"]) == (5, 0)
    assert woken  # idle trainers hear of the queued jobs (none sleeps here: the channel)
    assert _last_message(engine, waiting[0]) == _last_message(engine, running) == "Job resumed"
    claimed = {_claim(queue, f"r{n}") for n in range(3)}  # the tenant's limit is 4
    assert claimed <= set(sweep) and len(claimed) == 3
    assert client.resume_jobs({"sweep": "grid"})["resumed"] == 0
    assert_no_drift(engine)


def test_a_sweep_cancel_is_refused_with_a_reason_for_bad_input_and_for_readers(
    services: Services, live_url: str, tenant_a: TenantKeys
) -> None:
    engine = services.engine
    base_id = make_base(engine, "tiny-sweep").id
    [job_id] = enqueue_jobs(
        engine, tenant_a.tenant_id, base_id, make_file(engine, tenant_a.tenant_id).id, 1
    )
    tag_jobs(engine, {"sweep": "s"}, job_id)
    url = f"{live_url}/v1/fine_tuning/jobs/cancel"
    cases: list[tuple[dict[str, str], Any, int, str]] = [
        (tenant_a.headers("reader"), {"metadata": {"sweep": "s"}}, 403, "reader role"),
        ({}, {"metadata": {"sweep": "s"}}, 401, "key"),
        (tenant_a.headers(), {"metadata": {}}, 400, "metadata"),
        (tenant_a.headers(), {}, 400, "metadata"),
        (tenant_a.headers(), {"metadata": {"sweep": 7}}, 400, "metadata"),
        (tenant_a.headers(), {"metadata": {f"k{n}": "v" for n in range(17)}}, 400, "metadata"),
        (tenant_a.headers(), {"metadata": {"sweep": "s"}, "status": "queued"}, 400, "status"),
    ]
    for headers, body, status, named in cases:
        answer = httpx.post(url, json=body, headers=headers)
        assert answer.status_code == status, (body, answer.text)
        error = answer.json()["error"]
        assert named in error["message"].lower() or named == error.get("param"), error
    with pytest.raises(LoraforgeError) as refused:
        Client(live_url, tenant_a.reader).cancel_jobs({"sweep": "s"})
    assert refused.value.status == 403
    assert _states(engine, [job_id]) == {job_id: ("queued", False)}  # nothing moved
    with pytest.raises(ValueError, match="at least one metadata pair"):
        cancel_matching(engine, tenant_a.tenant_id, {})


JOB_STATES = ["validating", "queued", "paused", "running", "pausing", "cancelling", "succeeded"]
# What each move makes of a job in each state it takes: (status, cancel_requested,
# pause_requested), as `JobQueue.request_cancel`, `request_pause` and `resume` leave it.
MOVES: dict[str, dict[str, tuple[str, bool, bool]]] = {
    "cancel": {
        "validating": ("cancelled", True, False),
        "queued": ("cancelled", True, False),
        "paused": ("cancelled", True, False),
        "running": ("cancelling", True, False),
        "pausing": ("cancelling", True, True),
    },
    "pause": {"queued": ("paused", False, False), "running": ("running", False, True)},
    "resume": {"paused": ("queued", False, False), "pausing": ("running", False, False)},
}
SWEEP_MOVES = {"cancel": cancel_matching, "pause": pause_matching, "resume": resume_matching}


@settings(
    max_examples=45,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    jobs=st.lists(
        st.tuples(
            st.sampled_from(JOB_STATES),
            st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4]),  # its metadata: mostly a sweep's
            st.integers(0, 2),  # created_at: three instants, so many jobs tie
            st.sampled_from([True, True, True, False]),  # the tenant's, or another's
        ),
        min_size=1,
        max_size=30,
    ),
    selector=st.integers(0, len(SWEEP_SELECTORS) - 1),
    batch=st.integers(1, 4),
    action=st.sampled_from(sorted(MOVES)),
)
# Always: more jobs at one instant than a batch holds, running and waiting ones mixed.
@example(
    jobs=[(s, 0, 0, True) for s in ("queued", "running", "queued", "paused", "queued")],
    selector=0,
    batch=2,
    action="cancel",
)
# Always: one job in every state, for each move.
@example(jobs=[(s, 0, 1, True) for s in JOB_STATES], selector=0, batch=3, action="cancel")
@example(jobs=[(s, 0, 1, True) for s in JOB_STATES], selector=0, batch=3, action="pause")
@example(jobs=[(s, 0, 1, True) for s in JOB_STATES], selector=0, batch=3, action="resume")
def test_a_sweeps_move_changes_exactly_the_matching_jobs_it_takes_in_any_batches(
    engine: Engine,
    action: str,
    jobs: list[tuple[str, int, int, bool]],
    selector: int,
    batch: int,
) -> None:
    """Random jobs in every state, with metadata that matches, matches in part or not at all,
    created at three instants (keyset ties), some another tenant's: in batches of 1 to 4, a
    cancel, a pause or a resume moves exactly the tenant's jobs whose metadata holds the
    selector and whose state it takes, each as the single move would (`MOVES`: waiting jobs at
    once, running ones asked), counts each, and leaves everything else as it was."""
    mine, ids = jobs_in_states(
        engine,
        [(state, SWEEP_METADATA[meta], at, own, 0) for state, meta, at, own in jobs],
    )
    before = _full_states(engine, ids)
    wanted = SWEEP_SELECTORS[selector]

    moved = SWEEP_MOVES[action](engine, mine, wanted, batch=batch)

    after = _full_states(engine, ids)
    expected = dict(before)
    now = asked = 0
    for job_id, (state, meta, _, own) in zip(ids, jobs, strict=True):
        holds = wanted.items() <= (SWEEP_METADATA[meta] or {}).items()
        if own and holds and state in MOVES[action]:
            expected[job_id] = MOVES[action][state]
            asked += expected[job_id][0] in ("running", "cancelling")
            now += expected[job_id][0] not in ("running", "cancelling")
    assert after == expected
    assert (moved.now, moved.asked) == (now, asked)
    assert_no_drift(engine)


def test_claims_racing_a_sweep_cancel_leave_none_of_its_jobs_running_unasked(
    engine: Engine,
) -> None:
    """Four claimers claim and finish jobs while a 400-job sweep is cancelled in batches of 7:
    a queued job the cancel has picked is waited for by no claim (SKIP LOCKED passes it) and a
    job a claim holds is waited for by the cancel, so when the cancel returns every job of the
    sweep is over, cancelled, or running and asked to stop; none runs unasked."""
    tenant = make_tenant(engine, "racing", max_running_jobs=1000)
    base_id = make_base(engine, "tiny-race").id
    file_id = make_file(engine, tenant.id).id
    sweep = enqueue_jobs(engine, tenant.id, base_id, file_id, 400)
    rest = enqueue_jobs(engine, tenant.id, base_id, file_id, 100)
    tag_jobs(engine, {"sweep": "race"}, *sweep)
    queue = JobQueue(engine, max_running_per_tenant=1000)
    stop = threading.Event()
    claimed: list[str] = []

    def claimer(name: str) -> None:
        while not stop.is_set():
            job = queue.claim(name)
            if job is None:
                return
            claimed.append(job.id)

    threads = [threading.Thread(target=claimer, args=(f"c{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    moved = cancel_matching(engine, tenant.id, {"sweep": "race"}, batch=7)
    stop.set()
    for thread in threads:
        thread.join(60)
    states = _states(engine, sweep)
    assert all(s == ("cancelled", True) or s == ("cancelling", True) for s in states.values())
    assert moved.now == sum(1 for s in states.values() if s[0] == "cancelled")
    assert moved.asked == sum(1 for s in states.values() if s[0] == "cancelling")
    assert {j for j in claimed if j in set(sweep)} == {
        j for j, s in states.items() if s[0] == "cancelling"
    }
    assert all(not asked for _, asked in _states(engine, rest).values())
    assert len(set(claimed)) == len(claimed)
    assert_no_drift(engine)
