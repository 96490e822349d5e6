"""The queue's bookkeeping after writes that went around its triggers (a data-only restore with
`--disable-triggers`, a logical replica's apply, a fix made under `session_replication_role =
replica`): `loraforge queue check` names what drifted, `loraforge queue repair` sets it back, and
the claim then sees every job in its order again. A repair of exact bookkeeping writes nothing;
one beside claimers in flight makes them wait rather than losing their writes; one that cannot
lock the jobs in time gives up and writes nothing."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from control_plane.queue import JobQueue
from control_plane.queue_stats import QueueBusyError, QueueCounts, drift, queue_counts, repair
from control_plane.settings import Settings
from loraforge.cli import build_parser
from tests.factories import enqueue_jobs, make_base, make_file, make_tenant


def _around_triggers(conn: Connection) -> None:
    """This transaction's writes fire no trigger, as a restore or a replica's apply would."""
    conn.execute(text("SET LOCAL session_replication_role = replica"))


def _import_queued(
    conn: Connection, tenant_id: str, base_id: str, file_id: str, n: int
) -> list[str]:
    """`n` queued jobs inserted as a bulk import would (one statement, newest last)."""
    rows = conn.execute(
        text(
            "INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, "
            "hyperparameters, created_at, run_after) "
            "SELECT 'ftjob-imported-' || g, :tenant, 'queued', :base, :file, '{}'::jsonb, "
            "now() + g * interval '1 ms', now() FROM generate_series(1, :n) AS g RETURNING id"
        ),
        {"tenant": tenant_id, "base": base_id, "file": file_id, "n": n},
    )
    return [row.id for row in rows]


def _cli(database_url: str, *argv: str) -> int:
    args = build_parser().parse_args(["queue", *argv])
    return int(args.func(args, Settings(database_url=database_url)))


def _drain(queue: JobQueue) -> list[str]:
    """Claim and complete until nothing is claimable; the jobs in the order claimed."""
    order = []
    while (job := queue.claim("drainer")) is not None:
        order.append(job.id)
        assert queue.complete(job.id, "drainer") is not None
    return order


def _served(engine: Engine, tenant_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(
            text("SELECT last_served_at FROM tenant_queue_stats WHERE tenant_id = :t"),
            {"t": tenant_id},
        ).scalar_one()


def test_check_names_the_drift_and_repair_sets_it_back_so_every_job_is_claimed(
    engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = make_base(engine)
    acme = make_tenant(engine, "acme", max_running_jobs=4)
    globex = make_tenant(engine, "globex", max_running_jobs=4)
    initech = make_tenant(engine, "initech", max_running_jobs=4)
    file_id = make_file(engine, acme.id).id
    queue = JobQueue(engine, lease_seconds=600)
    enqueue_jobs(engine, acme.id, base.id, file_id, 4)
    globex_jobs = enqueue_jobs(engine, globex.id, base.id, file_id, 3)
    first = queue.claim("w1")
    assert first is not None and queue.complete(first.id, "w1") is not None
    running = queue.claim("w2")
    assert running is not None
    acme_served = _served(engine, acme.id)
    with engine.connect() as conn:
        assert drift(conn) == []
    assert _cli(database_url, "check") == 0
    assert "agrees" in capsys.readouterr().out

    with (
        engine.connect() as conn
    ):  # globex's queued jobs tie on age: its line's head is the first id
        waiting = (
            conn.execute(
                text("SELECT id FROM jobs WHERE id = ANY(:ids) AND status = 'queued' ORDER BY id"),
                {"ids": globex_jobs},
            )
            .scalars()
            .all()
        )
    assert len(waiting) >= 2
    jumper = waiting[-1]
    with engine.begin() as conn:
        _around_triggers(conn)
        imported = _import_queued(conn, initech.id, base.id, file_id, 5)
        conn.execute(  # globex's last job jumps the queue
            text("UPDATE jobs SET priority = 9 WHERE id = :id"), {"id": jumper}
        )
        conn.execute(  # the running job finished on the primary, applied here
            text(
                "UPDATE jobs SET status = 'succeeded', finished_at = now(), lease_owner = NULL, "
                "lease_expires_at = NULL WHERE id = :id"
            ),
            {"id": running.id},
        )
    with engine.connect() as conn:
        found = drift(conn)
    assert any(initech.id in line for line in found)  # its jobs have no line: never claimed
    assert any(globex.id in line for line in found)  # its line's head is not its first job
    assert any(running.tenant_id in line for line in found)  # still counts the job running

    capsys.readouterr()
    assert _cli(database_url, "check") == 1
    checked = capsys.readouterr()
    assert checked.out.splitlines() == found
    assert "queue repair" in checked.err

    assert _cli(database_url, "repair") == 0
    repaired = capsys.readouterr().out.splitlines()
    assert repaired == [f"repaired: {line}" for line in found] + [
        f"repaired {len(found)} bookkeeping rows"
    ]
    with engine.connect() as conn:
        assert drift(conn) == []
        counts = queue_counts(conn)
    assert counts[initech.id] == QueueCounts(initech.id, 5, 0)
    assert counts[running.tenant_id].running == 0
    assert _served(engine, acme.id) == acme_served  # a row it repaired keeps its served time
    assert _cli(database_url, "check") == 0

    with engine.connect() as conn:
        queued = conn.execute(text("SELECT id FROM jobs WHERE status = 'queued'")).scalars().all()
    assert set(imported) <= set(queued) and len(queued) == 5 + 3 + 2
    order = _drain(queue)
    assert order[0] == jumper  # priority 9 first, as the jobs now say
    assert Counter(order) == Counter(queued)  # every queued job once, the imported ones too
    with engine.connect() as conn:
        assert drift(conn) == []


def _row_versions(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for table, key in (
                ("tenant_queue_stats", "tenant_id"),
                ("queue_heads", "tenant_id, base_model_id"),
            )
            for row in conn.execute(text(f"SELECT {key}, xmin::text FROM {table} ORDER BY {key}"))
        ]


def test_a_repair_of_exact_bookkeeping_writes_nothing(
    engine: Engine, capsys: pytest.CaptureFixture[str], database_url: str
) -> None:
    base, other = make_base(engine), make_base(engine, "other-base")
    acme = make_tenant(engine, "acme")
    file_id = make_file(engine, acme.id).id
    queue = JobQueue(engine, lease_seconds=600)
    enqueue_jobs(engine, acme.id, base.id, file_id, 3)
    enqueue_jobs(engine, acme.id, other.id, file_id, 2, priority=1)
    claimed = queue.claim("w1")
    assert claimed is not None
    before = _row_versions(engine)
    assert len(before) == 3  # the tenant's row and its two lines

    with engine.begin() as conn:
        assert repair(conn) == []
    assert _row_versions(engine) == before  # no row written: the same row versions
    assert _cli(database_url, "repair") == 0
    assert capsys.readouterr().out.splitlines() == [
        "the queue's bookkeeping agrees with the jobs; nothing written"
    ]
    assert _row_versions(engine) == before


def _tamper_counts(engine: Engine) -> None:
    """Finished counts that the claim does not read, made wrong on every tenant's row."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE tenant_queue_stats SET succeeded = succeeded + 1000"))


def test_a_repair_beside_claimers_makes_them_wait_and_loses_none_of_their_writes(
    engine: Engine,
) -> None:
    base = make_base(engine)
    file_id = make_file(engine, make_tenant(engine, "home").id).id
    tenants = [make_tenant(engine, f"t{n}", max_running_jobs=2).id for n in range(20)]
    queued = [j for t in tenants for j in enqueue_jobs(engine, t, base.id, file_id, 25)]
    claimed: list[str] = []
    errors: list[BaseException] = []

    def claimer(n: int) -> None:
        queue = JobQueue(engine, max_running_per_tenant=2)
        try:
            while (job := queue.claim(f"c{n}")) is not None:
                claimed.append(job.id)
                assert queue.complete(job.id, f"c{n}") is not None
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=claimer, args=(n,)) for n in range(4)]
    for thread in pool:
        thread.start()
    repairs = 0
    try:
        while any(thread.is_alive() for thread in pool) or repairs < 3:
            _tamper_counts(engine)
            with engine.begin() as conn:
                fixed = repair(conn)
            assert len(fixed) == len(tenants)  # every tenant's row, rewritten while claims wait
            repairs += 1
    finally:
        for thread in pool:
            thread.join()
    assert not errors, errors
    assert repairs >= 3
    assert Counter(claimed) == Counter(queued)  # every job exactly once
    with engine.connect() as conn:
        assert drift(conn) == []  # no claim's or finish's count overwritten by a repair
        counts = queue_counts(conn)
    assert all(counts[t] == QueueCounts(t, 0, 0) for t in tenants)


def test_a_repair_that_cannot_lock_the_jobs_in_time_writes_nothing(
    engine: Engine, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = make_base(engine)
    acme = make_tenant(engine, "acme")
    file_id = make_file(engine, acme.id).id
    jobs = enqueue_jobs(engine, acme.id, base.id, file_id, 2)
    _tamper_counts(engine)
    with engine.connect() as conn:
        found = drift(conn)
    assert len(found) == 1

    with engine.connect() as holder, holder.begin():  # a long transaction writing a job
        holder.execute(text("UPDATE jobs SET priority = 1 WHERE id = :id"), {"id": jobs[0]})
        with pytest.raises(QueueBusyError, match=r"no lock within 0\.2 s"), engine.begin() as conn:
            repair(conn, lock_timeout_seconds=0.2)
        capsys.readouterr()
        assert _cli(database_url, "repair", "--lock-timeout", "0.2") == 1
        assert "nothing was written" in capsys.readouterr().err
        with engine.connect() as conn:
            assert drift(conn) == found
    with engine.begin() as conn:
        assert repair(conn) == found
    with engine.connect() as conn:
        assert drift(conn) == []


def test_check_and_repair_refuse_a_schema_that_is_not_the_codes(
    empty_database_url: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from control_plane import db

    for command in ("check", "repair"):
        assert _cli(empty_database_url, command) == 2
        assert "no loraforge schema" in capsys.readouterr().err
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(db.migrations_dir()))
    head = scripts.get_current_head()
    assert head is not None
    before = scripts.get_revision(head).down_revision
    db.downgrade(database_url, "-1")
    assert _cli(database_url, "check") == 2
    assert (
        f"at revision {before}, not {head}: run `loraforge migrate` first"
        in capsys.readouterr().err
    )
    db.upgrade(database_url)
    assert _cli(database_url, "check") == 0
