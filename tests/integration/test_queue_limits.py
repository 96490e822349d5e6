"""Tenants at their running limit cost the claim nothing (revision 0013): a line whose tenant is
at its limit (its own, or the platform's default) is out of the index the claim walks, so a
claim past thousands of such tenants reads the lines it ranks and no more. The flag follows
every way a limit changes: a claim and a finish, a tenant's own limit set or lifted, claimers
with another default, and writes that went around the triggers (`queue repair`)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, text

import control_plane.queue as queue_module
from control_plane.queue import CLAIM_FRONT_LINES, JobQueue
from control_plane.queue_stats import drift, queue_counts, repair
from control_plane.settings import Settings
from loraforge.cli import build_parser
from tests.factories import assert_no_drift, make_base, make_file, make_tenant
from tests.integration.test_queue_scale import _plan_rows_from


def _jobs(
    conn: Connection,
    tenants: list[str],
    base: str,
    file_id: str,
    *,
    running: int = 0,
    queued: int = 0,
    priority: int = 0,
    start: datetime,
) -> None:
    """For each tenant, `running` jobs held by a trainer and `queued` jobs after them (the
    tenants' jobs interleaved by age), inserted in one statement as a bulk import would."""
    conn.execute(
        text(
            "INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, "
            "hyperparameters, priority, created_at, run_after, attempt, lease_owner, "
            "lease_expires_at, started_at) "
            "SELECT 'ftjob-' || substr(t.id, 8) || '-' || g, t.id, "
            "       CASE WHEN g <= :running THEN 'running' ELSE 'queued' END, :base, :file, "
            "       '{}'::jsonb, :priority, "
            "       CAST(:start AS timestamptz) + (g * 10000 + t.n) * interval '1 ms', "
            "       CAST(:start AS timestamptz), (g <= :running)::int, "
            "       CASE WHEN g <= :running THEN 'holder' END, "
            "       CASE WHEN g <= :running THEN now() + interval '1 hour' END, "
            "       CASE WHEN g <= :running THEN now() END "
            "FROM unnest(CAST(:tenants AS text[])) WITH ORDINALITY AS t(id, n) "
            "CROSS JOIN generate_series(1, :running + :queued) AS g"
        ),
        {
            "tenants": tenants,
            "base": base,
            "file": file_id,
            "running": running,
            "queued": queued,
            "priority": priority,
            "start": start,
        },
    )


def _saturated(engine: Engine, tenant_id: str) -> list[tuple[int, int, bool]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT running, max_running, saturated FROM queue_heads "
                "WHERE tenant_id = :t ORDER BY base_model_id"
            ),
            {"t": tenant_id},
        )
        return [(row.running, row.max_running, row.saturated) for row in rows]


def _urgent_and_calm(engine: Engine, urgent: str, queued: int, calm_queued: int) -> tuple[str, str]:
    """Tenant `urgent` (default limit) runs two jobs with `queued` of priority 1 waiting;
    tenant `calm` has `calm_queued` of priority 0. Their ids."""
    base = make_base(engine).id
    start = datetime.now(UTC) - timedelta(hours=1)
    first, calm = make_tenant(engine, urgent).id, make_tenant(engine, "calm").id
    file_id = make_file(engine, first).id
    with engine.begin() as conn:
        _jobs(conn, [first], base, file_id, running=2, queued=queued, priority=1, start=start)
        _jobs(conn, [calm], base, file_id, queued=calm_queued, start=start)
    return first, calm


def _default_limit(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(text("SELECT default_max_running FROM queue_settings")).scalar_one()
        )


def test_a_claim_past_2000_tenants_at_their_limit_reads_only_the_lines_it_ranks(
    engine: Engine,
) -> None:
    """500 tenants at the default limit with jobs of a higher priority, then 1,500 free-tier
    tenants (a limit of 1) holding their one job, rank ahead of the one tenant with room. The
    claim takes that tenant's first job, and neither the common claim nor the walk of the front
    reads more lines than it ranks (it read all 2,000 when the limit was read per line)."""
    base = make_base(engine).id
    home = make_tenant(engine, "home")
    file_id = make_file(engine, home.id).id
    start = datetime.now(UTC) - timedelta(days=1)
    busy = [make_tenant(engine, f"busy-{n}").id for n in range(500)]
    free = [make_tenant(engine, f"free-{n}", max_running_jobs=1).id for n in range(1500)]
    roomy = make_tenant(engine, "roomy", max_running_jobs=50).id
    with engine.begin() as conn:
        _jobs(conn, busy, base, file_id, running=2, queued=1, priority=5, start=start)
        _jobs(conn, free, base, file_id, running=1, queued=1, start=start)
        _jobs(conn, [roomy], base, file_id, running=10, queued=5, start=start + timedelta(hours=1))
    queue = JobQueue(engine, max_running_per_tenant=2, front_lines=CLAIM_FRONT_LINES)

    job = queue.claim("w-1")
    assert job is not None and job.tenant_id == roomy
    assert job.id == f"ftjob-{roomy[7:]}-11"
    assert _default_limit(engine) == 2  # the claim set its default before it walked

    head = queue.explain_claim()
    walk = queue.explain_claim(walk=True)
    assert _plan_rows_from(head["Plan"], "queue_heads") <= CLAIM_FRONT_LINES + 1
    assert _plan_rows_from(walk["Plan"], "queue_heads") <= CLAIM_FRONT_LINES
    # Every tenant at its limit is flagged so; the one with room is not.
    with engine.connect() as conn:
        flagged = conn.execute(
            text("SELECT count(*) FILTER (WHERE saturated), count(*) FROM queue_heads")
        ).one()
    assert tuple(flagged) == (2000, 2001)

    assert queue.complete(job.id, "w-1") is not None
    second = queue.claim("w-1")
    assert second is not None and second.id == f"ftjob-{roomy[7:]}-12"
    assert_no_drift(engine)


def test_a_finish_and_a_tenants_own_limit_move_its_lines_in_and_out_of_the_walk(
    engine: Engine,
) -> None:
    base = make_base(engine).id
    acme = make_tenant(engine, "acme", max_running_jobs=1).id
    globex = make_tenant(engine, "globex").id
    file_id = make_file(engine, acme).id
    start = datetime.now(UTC) - timedelta(hours=1)
    with engine.begin() as conn:
        _jobs(conn, [acme], base, file_id, queued=4, start=start)
        _jobs(conn, [globex], base, file_id, queued=2, start=start + timedelta(minutes=1))
    queue = JobQueue(engine, max_running_per_tenant=4)

    first = queue.claim("w")
    assert first is not None and first.tenant_id == acme
    assert _saturated(engine, acme) == [(1, 1, True)]
    # acme is at its limit: globex's jobs come next although acme's are older.
    assert [queue.claim("w").tenant_id for _ in range(2)] == [globex, globex]  # type: ignore[union-attr]
    assert queue.claim("w") is None

    # Its limit raised: its line is back in the walk at once.
    with engine.begin() as conn:
        conn.execute(text("UPDATE tenants SET max_running_jobs = 3 WHERE id = :t"), {"t": acme})
    assert _saturated(engine, acme) == [(1, 3, False)]
    assert [queue.claim("w").tenant_id for _ in range(2)] == [acme, acme]  # type: ignore[union-attr]
    assert _saturated(engine, acme) == [(3, 3, True)]
    assert queue.claim("w") is None

    # Lowered under what it runs: nothing more until two of its three finish.
    with engine.begin() as conn:
        conn.execute(text("UPDATE tenants SET max_running_jobs = 2 WHERE id = :t"), {"t": acme})
    assert queue.complete(first.id, "w") is not None
    assert _saturated(engine, acme) == [(2, 2, True)]
    assert queue.claim("w") is None
    # Lifted (the default of 4 applies): claimable again.
    with engine.begin() as conn:
        conn.execute(text("UPDATE tenants SET max_running_jobs = NULL WHERE id = :t"), {"t": acme})
    assert _saturated(engine, acme) == [(2, 4, False)]
    last = queue.claim("w")
    assert last is not None and last.tenant_id == acme
    assert_no_drift(engine)


def test_claimers_with_another_default_flag_the_lines_against_theirs_first(
    engine: Engine,
) -> None:
    """Lines are flagged against the default of the claimers that last claimed: a claim with
    another sets its own, so it never skips a tenant with room nor walks one without. A tenant
    with a limit of its own keeps it."""
    base = make_base(engine).id
    start = datetime.now(UTC) - timedelta(hours=1)
    plain = [make_tenant(engine, f"plain-{n}").id for n in range(3)]
    own = make_tenant(engine, "own-limit", max_running_jobs=2).id
    file_id = make_file(engine, own).id
    with engine.begin() as conn:
        _jobs(conn, plain, base, file_id, running=2, queued=2, start=start)
        _jobs(conn, [own], base, file_id, running=1, queued=2, start=start)
    late = make_tenant(engine, "late").id
    with engine.begin() as conn:
        _jobs(conn, [late], base, file_id, queued=3, start=start + timedelta(minutes=5))

    tight = JobQueue(engine, max_running_per_tenant=2)
    # Fair share: late (none running) first, then own (never served) on a tie, then late.
    assert [tight.claim("w").tenant_id for _ in range(3)] == [late, own, late]  # type: ignore[union-attr]
    assert _default_limit(engine) == 2
    assert all(_saturated(engine, t) == [(2, 2, True)] for t in [*plain, own, late])

    loose = JobQueue(engine, max_running_per_tenant=3)
    taken = [loose.claim("v") for _ in range(4)]
    assert _default_limit(engine) == 3
    # Each plain tenant gets its third job; late gets one more; own stays at its 2.
    assert sorted(job.tenant_id for job in taken if job is not None) == sorted([*plain, late])
    assert _saturated(engine, own) == [(2, 2, True)]
    assert loose.claim("v") is None
    assert_no_drift(engine)


def test_a_claim_never_walks_lines_flagged_against_another_default(engine: Engine) -> None:
    """Flagged against a default of 2, `urgent` (two running, a job of priority 1 queued) is at
    its limit; under 3 it is the first to serve. A claim with 3 sets its default before it
    walks, so it takes urgent's job, not the next tenant's of priority 0."""
    urgent, calm = _urgent_and_calm(engine, "urgent", 1, 2)
    first = JobQueue(engine, max_running_per_tenant=2).claim("w")
    assert first is not None and first.tenant_id == calm
    assert _saturated(engine, urgent) == [(2, 2, True)]
    job = JobQueue(engine, max_running_per_tenant=3).claim("w")
    assert job is not None and job.tenant_id == urgent and job.priority == 1
    # Nothing else was claimed on the way (a walk of the old flags would have started calm's).
    with engine.connect() as conn:
        counts = queue_counts(conn)
    assert (counts[calm].queued, counts[calm].running) == (1, 1)
    assert_no_drift(engine)


def test_a_claim_whose_default_cannot_be_set_in_time_ranks_the_backlog_instead(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction that writes the lines (a finish publishing its adapter) holds them past
    the wait: the claim with another default sets nothing and still takes the right job."""
    base = make_base(engine).id
    start = datetime.now(UTC) - timedelta(hours=1)
    acme, globex = make_tenant(engine, "acme").id, make_tenant(engine, "globex").id
    file_id = make_file(engine, acme).id
    with engine.begin() as conn:
        _jobs(conn, [acme], base, file_id, running=1, queued=2, start=start)
        _jobs(conn, [globex], base, file_id, queued=2, start=start + timedelta(minutes=1))
    monkeypatch.setattr(queue_module, "ADOPT_LOCK_TIMEOUT_MS", 200)
    with engine.connect() as holder, holder.begin():
        holder.execute(
            text("UPDATE queue_heads SET queued = queued WHERE tenant_id = :t"), {"t": acme}
        )
        job = JobQueue(engine, max_running_per_tenant=1).claim("w")
        assert job is not None and job.tenant_id == globex  # acme is at the limit of 1
        assert _default_limit(engine) == 4  # not set: the lines were held
    job = JobQueue(engine, max_running_per_tenant=1).claim("w")
    assert job is None  # both at the limit of 1, now flagged so
    assert _default_limit(engine) == 1
    assert_no_drift(engine)


def test_a_limit_written_around_the_triggers_is_named_and_repaired(engine: Engine) -> None:
    base = make_base(engine).id
    start = datetime.now(UTC) - timedelta(hours=1)
    acme = make_tenant(engine, "acme").id
    file_id = make_file(engine, acme).id
    with engine.begin() as conn:
        _jobs(conn, [acme], base, file_id, running=1, queued=2, start=start)
    queue = JobQueue(engine, max_running_per_tenant=4)
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        conn.execute(text("UPDATE tenants SET max_running_jobs = 1 WHERE id = :t"), {"t": acme})
    with engine.connect() as conn:
        found = drift(conn)
    assert found == [f"line {acme}/{base}: running limit 4, its tenant's is 1"]
    with engine.begin() as conn:
        assert repair(conn) == found
    assert _saturated(engine, acme) == [(1, 1, True)]
    assert queue.claim("w") is None
    assert_no_drift(engine)


def test_a_limit_set_while_the_tenants_first_job_is_queued_reaches_its_new_line(
    engine: Engine,
) -> None:
    """The tenant's first job is being queued (its new line took the default limit) when an
    operator sets the tenant's own limit: the setting waits for that job's transaction and then
    flags the line, so neither write is lost."""
    base = make_base(engine).id
    acme = make_tenant(engine, "acme").id
    file_id = make_file(engine, acme).id
    done = threading.Event()

    def set_limit() -> None:
        with engine.begin() as conn:
            conn.execute(text("UPDATE tenants SET max_running_jobs = 1 WHERE id = :t"), {"t": acme})
        done.set()

    with engine.connect() as queuing, queuing.begin():
        _jobs(queuing, [acme], base, file_id, running=1, queued=1, start=datetime.now(UTC))
        setter = threading.Thread(target=set_limit)
        setter.start()
        assert not done.wait(0.5)  # it waits for the job's transaction
    setter.join(timeout=10)
    assert done.is_set()
    assert _saturated(engine, acme) == [(1, 1, True)]
    assert JobQueue(engine).claim("w") is None
    assert_no_drift(engine)


def test_claimers_that_disagree_do_not_take_turns_flagging_every_line(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Two claimers with defaults of 2 and 3 (a rollout of a new setting): each sets its own
    once; within ADOPT_INTERVAL_SECONDS the one whose default is not set ranks the backlog
    instead (and says why), still by its own limit."""
    busy, calm = _urgent_and_calm(engine, "busy", 2, 3)
    old, new = (
        JobQueue(engine, max_running_per_tenant=2),
        JobQueue(engine, max_running_per_tenant=3),
    )

    assert old.claim("old").tenant_id == calm  # type: ignore[union-attr]
    assert _default_limit(engine) == 2
    assert new.claim("new").tenant_id == busy  # type: ignore[union-attr]
    assert _default_limit(engine) == 3
    with caplog.at_level("WARNING", logger="control_plane.queue"):
        job = old.claim("old")
    assert job is not None and job.tenant_id == calm  # busy runs 3, over old's limit of 2
    assert _default_limit(engine) == 3  # not flagged back
    assert "claimers disagree on the default running limit (this one: 2)" in caplog.text
    assert _saturated(engine, busy) == [(3, 3, True)]
    assert_no_drift(engine)


def test_queue_check_says_when_the_lines_follow_another_default_than_its_configuration(
    engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert JobQueue(engine, max_running_per_tenant=2).claim("w") is None  # sets its default
    assert _default_limit(engine) == 2

    def check(configured: int) -> tuple[int, str]:
        args = build_parser().parse_args(["queue", "check"])
        settings = Settings(database_url=database_url, max_running_jobs_per_tenant=configured)
        return int(args.func(args, settings)), capsys.readouterr().out

    code, out = check(4)
    assert code == 0  # not drift: the bookkeeping agrees with the jobs
    assert (
        "the queue's lines are flagged against a default running limit of 2; this "
        "configuration's MAX_RUNNING_JOBS_PER_TENANT is 4" in out
    )
    code, out = check(2)
    assert code == 0 and "flagged against" not in out
