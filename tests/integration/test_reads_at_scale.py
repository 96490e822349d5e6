"""Reads at a platform's scale, each shown to read its own rows: the dashboard's page of one
finished status behind a tenant's newer sweep, a long job's timeline among its metrics, a
page of a tenant's adapters among thousands, the operator's busiest tenants, the bytes a
tenant's interactive checkpoints hold, which every save asks for, and an interactive model's
training curves among many models' calls, a long one's downsampled to a chart's points."""

from __future__ import annotations

import functools
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from control_plane import queue_stats
from control_plane.dashboard import interactive_queries, queries
from control_plane.events import list_events
from control_plane.interactive_storage import CheckpointStorage, storage
from control_plane.job_status import JobStatus
from control_plane.queue import JobQueue
from control_plane.registry import reads
from tests.curves import assert_same_curves, downsampled, model_points
from tests.factories import (
    enqueue_jobs,
    interactive_model,
    interactive_session,
    interactive_training_steps,
    log_metric_steps,
    make_base,
    make_file,
    make_tenant,
)
from tests.integration.test_queue_scale import _plan_rows_from


def _statements_of(engine: Engine, run: Any) -> list[tuple[str, Any]]:
    """The statements `run()` sent through `engine`, with their parameters."""
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        run()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return statements


def _plan(engine: Engine, statement: str, parameters: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        plan: dict[str, Any] = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
        ).scalar_one()[0]["Plan"]
    return plan


def test_a_page_of_one_finished_status_seeks_past_a_newer_sweep(engine: Engine) -> None:
    """The dashboard's jobs filtered by a finished status, newest first in keyset pages: every
    page holds exactly the tenant's jobs in that status, in order, and the first page and one
    deep in the listing read their own rows off `ix_jobs_tenant_finished`, not the 3,000 newer
    queued jobs of a sweep nor the tenant's jobs in the other statuses."""
    base = make_base(engine)
    sweep = make_tenant(engine, "sweep", max_running_jobs=5)
    other = make_tenant(engine, "other", max_running_jobs=5)
    file_id = make_file(engine, sweep.id).id
    finished = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
    with engine.begin() as conn:  # history: 1,800 finished jobs, two tenants, three outcomes
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, "
                "hyperparameters, created_at, finished_at) "
                "SELECT 'ftjob-h' || lpad(g::text, 6, '0'), "
                "CASE WHEN g % 2 = 0 THEN :sweep ELSE :other END, "
                "(ARRAY['succeeded', 'failed', 'cancelled'])[1 + (g / 2) % 3], :base, :file, "
                "'{}'::jsonb, now() - interval '2 hours' + (g / 5) * interval '1 ms', now() "
                "FROM generate_series(0, 1799) AS g"
            ),
            {"sweep": sweep.id, "other": other.id, "base": base.id, "file": file_id},
        )
    enqueue_jobs(engine, sweep.id, base.id, file_id, 3000)  # then a sweep, newer than all
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE jobs"))
    with engine.connect() as conn:
        for status in finished:
            expected = [
                row.id
                for row in conn.execute(
                    text(
                        "SELECT id FROM jobs WHERE tenant_id = :t AND status = :s "
                        "ORDER BY created_at DESC, id DESC"
                    ),
                    {"t": sweep.id, "s": status},
                )
            ]
            seen: list[str] = []
            after = None
            while True:
                page, more = queries.jobs_page(
                    conn, sweep.id, status=status, search=None, after=after, limit=20
                )
                assert {job.status for job in page} <= {status}
                seen += [job.id for job in page]
                if not more:
                    break
                after = page[-1].id
            assert len(expected) == 300 and seen == expected
            # The first page (behind the sweep) and one after the 100th job.
            for cursor in (None, seen[99]):
                page_of = functools.partial(
                    queries.jobs_page, conn, sweep.id, status=status, search=None, limit=20
                )
                statements = _statements_of(engine, functools.partial(page_of, after=cursor))
                statement, parameters = statements[-1]
                assert "ORDER BY" in statement
                plan = _plan(engine, statement, parameters)
                assert "ix_jobs_tenant_finished" in str(plan), plan
                assert _plan_rows_from(plan, "jobs") <= 21, plan


def test_a_long_jobs_timeline_reads_its_status_changes_not_its_metrics(engine: Engine) -> None:
    """A job page's live panel, drawn again at each change its stream sends, shows the job's
    status changes: for a job 20,000 metric events into its run, they are read off
    `ix_job_events_status_changes`, not found among the metrics."""
    base = make_base(engine)
    tenant = make_tenant(engine, "long-run")
    file_id = make_file(engine, tenant.id).id
    jobs = enqueue_jobs(engine, tenant.id, base.id, file_id, 2)
    queue = JobQueue(engine)
    claimed = queue.claim("worker-1")  # the long run; the other job logs a little too
    assert claimed is not None
    (other,) = set(jobs) - {claimed.id}
    log_metric_steps(engine, {claimed.id: 20_000, other: 200})
    finished = queue.complete(claimed.id, "worker-1")
    assert finished is not None
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("ANALYZE job_events")  # as autovacuum does as the table grows
        )
        expected = (
            conn.execute(
                text(
                    "SELECT id FROM job_events WHERE job_id = :job AND data ? 'status' ORDER BY id"
                ),
                {"job": claimed.id},
            )
            .scalars()
            .all()
        )
        timeline: list[Any] = []
        statements = _statements_of(
            engine, lambda: timeline.extend(queries.status_changes(conn, claimed.id))
        )
    assert [e.id for e in timeline] == expected
    assert [e.data["status"] for e in timeline][-2:] == [JobStatus.RUNNING, JobStatus.SUCCEEDED]
    ((statement, parameters),) = statements
    plan = _plan(engine, statement, parameters)
    assert "ix_job_events_status_changes" in str(plan), plan
    assert _plan_rows_from(plan, "job_events") <= len(expected), plan


def test_an_older_jobs_page_reads_its_own_events_not_the_newer_ones_of_others(
    engine: Engine,
) -> None:
    """A job's page and its events API read the job's own events: for a job whose 5,000 steps
    are older than another job's 20,000, the newest page of its log, the page after a
    cursor, its stream from a cursor and past its last event (a finished job's), its newest
    event's id and its latest training metrics each read their own rows, not every newer
    event of the platform (the primary key walked back from the table's newest event read
    20,051 rows for a page of 51)."""
    base = make_base(engine)
    tenant = make_tenant(engine, "older-job")
    file_id = make_file(engine, tenant.id).id
    older, newer = enqueue_jobs(engine, tenant.id, base.id, file_id, 2)
    log_metric_steps(
        engine,
        {older: 5_000, newer: 20_000},
        "jsonb_build_object('step', g, 'train_loss', 1.0 / g, 'tokens_per_s', g)",
    )
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE job_events"))
        ids = (
            conn.execute(
                text("SELECT id FROM job_events WHERE job_id = :job ORDER BY id"), {"job": older}
            )
            .scalars()
            .all()
        )
        reads: dict[str, tuple[Any, Any, int]] = {
            "newest page": (
                lambda: [e.id for e in list_events(conn, older, limit=51)],
                ids[::-1][:51],
                51,
            ),
            "page after a cursor": (
                lambda: [e.id for e in list_events(conn, older, after=ids[2000], limit=51)],
                ids[1949:2000][::-1],
                51,
            ),
            "stream from a cursor": (
                lambda: [
                    e.id
                    for e in list_events(conn, older, after=ids[2000], limit=51, newest_first=False)
                ],
                ids[2001:2052],
                51,
            ),
            "stream past its last event": (
                lambda: list_events(conn, older, after=ids[-1], limit=51, newest_first=False),
                [],
                0,
            ),
            "newest event": (lambda: queries.latest_event_id(conn, older), ids[-1], 1),
            "latest metrics": (
                lambda: queries.latest_training_metrics(conn, older),
                {"step": 5_000, "train_loss": 1 / 5_000, "tokens_per_s": 5_000},
                1,
            ),
        }
        for name, (read, expected, rows) in reads.items():
            found: list[Any] = []
            statements = _statements_of(engine, lambda r=read, f=found: f.append(r()))
            assert found == [expected], name
            ((statement, parameters),) = statements
            plan = _plan(engine, statement, parameters)
            assert _plan_rows_from(plan, "job_events") <= rows, (name, plan)


def test_a_page_of_adapters_reads_its_own_adapters_versions(engine: Engine) -> None:
    """`GET /v1/adapters` and the dashboard's adapters page, by name in keyset pages: every page
    holds the tenant's adapters that have a version, each with its latest number and count,
    and a page among 2,000 adapters (10,000 versions) reads its own adapters' versions."""
    base = make_base(engine)
    tenant = make_tenant(engine, "registry")
    neighbour = make_tenant(engine, "neighbour")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO adapters (id, tenant_id, name, base_model_id) "
                "SELECT 'ad-' || t.id || '-' || g, t.id, 'adapter-' || lpad(g::text, 5, '0'), "
                ":base FROM generate_series(1, 2000) AS g, tenants t WHERE t.id IN (:a, :b)"
            ),
            {"base": base.id, "a": tenant.id, "b": neighbour.id},
        )
        # 1 to 9 versions each, gaps in the numbers; every 100th adapter has none (yet).
        conn.execute(
            text(
                "INSERT INTO adapter_versions (id, adapter_id, number, files, lineage, metrics, "
                "object_prefix) "
                "SELECT a.id || '-v' || n, a.id, 2 * n, '[]', '{}', '{}', 'x' FROM adapters a, "
                "generate_series(1, 9) AS n "
                "WHERE n <= 1 + abs(hashtext(a.id)) % 9 AND right(a.name, 2) <> '00'"
            )
        )
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
        expected = [
            tuple(row)
            for row in conn.execute(
                text(
                    "SELECT a.name, max(v.number), count(*) FROM adapters a "
                    "JOIN adapter_versions v ON v.adapter_id = a.id WHERE a.tenant_id = :t "
                    "GROUP BY a.name ORDER BY a.name"
                ),
                {"t": tenant.id},
            )
        ]
        listed: list[tuple[str, int, int]] = []
        after = None
        while True:
            page, more = reads.list_adapters(conn, tenant.id, after=after, limit=50)
            listed += [(a.name, a.latest_version, a.version_count) for a in page]
            if not more:
                break
            after = page[-1].name
        assert len(expected) == 1980 and listed == expected
        statements = _statements_of(
            engine, lambda: reads.list_adapters(conn, tenant.id, after=listed[999][0], limit=20)
        )
    ((statement, parameters),) = statements
    plan = _plan(engine, statement, parameters)
    assert _plan_rows_from(plan, "adapters") <= 21 + 1, plan  # one of them may have no version
    assert _plan_rows_from(plan, "adapter_versions") <= 22 * 9, plan


def test_the_busiest_tenants_are_the_reference_listing_cut_with_totals_over_all(
    engine: Engine,
) -> None:
    """The operator's queue page: the tenants with jobs queued or running, most queued first
    (then most running, then id), cut at the page's length, with totals over every busy tenant
    that equal the counts the bookkeeping holds; a tenant's own view holds only itself."""
    base = make_base(engine)
    file_id = make_file(engine, make_tenant(engine, "home").id).id
    queue = JobQueue(engine, max_running_per_tenant=3)
    tenants = [make_tenant(engine, f"t{n:03d}").id for n in range(120)]
    for n, tenant in enumerate(tenants):
        if n % 4:  # a quarter of the tenants never queued anything
            enqueue_jobs(engine, tenant, base.id, file_id, n % 7 + n % 3)
    for n in range(150):  # some tenants' jobs running, some tenants with nothing left queued
        assert queue.claim(f"w{n}") is not None
    for n in range(10):  # and some with jobs queued, none running
        enqueue_jobs(engine, make_tenant(engine, f"late{n}").id, base.id, file_id, n + 1)
    with engine.connect() as conn:
        counts = queue_stats.queue_counts(conn)
        busy = [c for c in counts.values() if c.queued or c.running]
        reference = sorted(busy, key=lambda c: (-c.queued, -c.running, c.tenant_id))
        assert any(c.queued == 0 for c in busy) and any(c.running == 0 for c in busy)
        for limit in (1, 25, len(busy), len(busy) + 10):
            found = queue_stats.busiest_tenants(conn, limit)
            assert found.tenants == reference[:limit]
            assert (found.busy, found.queued, found.running) == (
                len(busy),
                sum(c.queued for c in busy),
                sum(c.running for c in busy),
            )
        own = reference[-1]
        assert queue_stats.busiest_tenants(conn, 50, own.tenant_id) == queue_stats.BusyTenants(
            [own], 1, own.queued, own.running
        )
        idle = queue_stats.busiest_tenants(conn, 50, tenants[0])
        assert idle == queue_stats.BusyTenants([], 0, 0, 0)


def test_a_tenants_checkpoint_bytes_are_summed_off_its_own_index(engine: Engine) -> None:
    """Every interactive save asks for its tenant's checkpoint bytes (`interactive_storage`):
    among 20 tenants with 500 checkpoints each, the sum is exact (a size not recorded counts 0)
    and is an index-only scan of the tenant's 500 entries of
    `ix_interactive_checkpoints_tenant_size`: no row of the table, nor another tenant's."""
    base = make_base(engine)
    tenants = [make_tenant(engine, f"saver-{n:02d}") for n in range(20)]
    for tenant in tenants:
        session = interactive_session(engine, tenant.id, f"isess-{tenant.name}")
        interactive_model(engine, session, tenant.id, base.id, f"imdl-{tenant.name}")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO interactive_checkpoints (id, model_id, tenant_id, kind, name, path, "
                "storage_prefix, size_bytes) "
                "SELECT m.id || '-' || g, m.id, m.tenant_id, 'state', 's' || g, "
                "'tinker://' || m.id || '/weights/s' || g, 'x/', "
                "CASE WHEN g % 10 = 0 THEN NULL ELSE g * 1000000 END "
                "FROM interactive_models m, generate_series(1, 500) AS g"
            )
        )
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE interactive_checkpoints")
        )
    tenant = tenants[7]
    expected = sum(g * 1_000_000 for g in range(1, 501) if g % 10)
    found: list[CheckpointStorage] = []
    with engine.connect() as conn:
        statements = _statements_of(engine, lambda: found.append(storage(conn, tenant.id)))
    assert found == [CheckpointStorage("saver-07", 500, expected, None)]
    ((statement, parameters),) = statements
    plan = _plan(engine, statement, parameters)
    assert "'Index Name': 'ix_interactive_checkpoints_tenant_size'" in str(plan), plan
    assert "'Node Type': 'Index Only Scan'" in str(plan), plan
    assert _plan_rows_from(plan, "interactive_checkpoints") == 500, plan


def test_an_interactive_models_curves_read_its_own_calls_off_its_seq_key(engine: Engine) -> None:
    """The session page's chart of one model among 20 with 500 calls each (per step: two
    forward_backwards, a forward, an optim_step, a sample): 100 steps, each its two losses
    summed, read off the model's `(model_id, seq)` key in order, its 500 calls and no other
    model's."""
    base = make_base(engine)
    tenant = make_tenant(engine, "rl-loop")
    session = interactive_session(engine, tenant.id, "isess-rl")
    for n in range(20):
        interactive_model(engine, session, tenant.id, base.id, f"imdl-{n:02d}")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO interactive_calls (id, model_id, tenant_id, base_model_id, seq, kind, "
                "status, finished_at, metrics) "
                "SELECT m.id || '-' || g, m.id, m.tenant_id, m.base_model_id, g, "
                "(ARRAY['forward_backward', 'forward_backward', 'forward', 'optim_step', "
                "'sample'])[1 + g % 5], 'completed', now(), "
                "CASE WHEN g % 5 < 3 THEN jsonb_build_object('loss:sum', g) "
                "WHEN g % 5 = 3 THEN jsonb_build_object('grad_norm:mean', g / 1000.0) END "
                "FROM interactive_models m, generate_series(0, 499) AS g"
            )
        )
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE interactive_calls")
        )
    found: list[interactive_queries.ModelCurves | None] = []
    with engine.connect() as conn:
        statements = _statements_of(
            engine,
            lambda: found.append(
                interactive_queries.model_curves(conn, tenant.id, session, "imdl-07")
            ),
        )
    (curves,) = found
    assert curves is not None
    steps = list(range(100))
    assert curves.train.steps == steps and curves.eval.steps == steps
    assert curves.train.values == [(5 * k) + (5 * k + 1) for k in steps]
    assert curves.eval.values == [5 * k + 2 for k in steps]
    assert curves.grad_norm.steps == steps
    assert curves.grad_norm.values == pytest.approx([(5 * k + 3) / 1000 for k in steps])
    statement, parameters = statements[-1]
    plan = _plan(engine, statement, parameters)
    assert "'Index Name': 'uq_interactive_calls_model_seq'" in str(plan), plan
    assert _plan_rows_from(plan, "interactive_calls") == 500, plan


def _curve_points(curves: interactive_queries.ModelCurves) -> dict[str, Any]:
    """A model's curves in `tests.curves`' shape."""
    series = {"train": curves.train, "eval": curves.eval, "grad_norm": curves.grad_norm}
    return {name: list(zip(s.steps, s.values, strict=True)) for name, s in series.items()} | {
        "downsampled": curves.downsampled
    }


def test_a_long_models_curves_are_bucketed_as_a_jobs_chart_and_still_read_off_its_seq_key(
    engine: Engine,
) -> None:
    """A model trained 3,000 steps (15,000 calls: `interactive_training_steps`) beside one that
    trained 40 and twenty of 1,500 steps: the long model's three curves are the job chart's
    rule (`tests.curves`, buckets of 4 steps) over its every point, in at most
    MAX_CHART_POINTS points a series, the first bucket holding its first step and the last its
    newest; read in one statement off its `(model_id, seq)` key, its 15,000 calls and no other
    model's. The short model's curves are its every step, as they were, not downsampled."""
    base = make_base(engine)
    tenant = make_tenant(engine, "long-loop")
    session = interactive_session(engine, tenant.id, "isess-long")
    others = [(f"imdl-{n:02d}", 1_500) for n in range(20)]
    for model_id, steps in [("imdl-long", 3_000), ("imdl-short", 40), *others]:
        interactive_model(engine, session, tenant.id, base.id, model_id)
        interactive_training_steps(engine, model_id, steps)
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("VACUUM ANALYZE interactive_calls")
        )
    found: list[interactive_queries.ModelCurves | None] = []
    with engine.connect() as conn:
        want = downsampled(model_points(conn, "imdl-long"), queries.MAX_CHART_POINTS)
        want_short = downsampled(model_points(conn, "imdl-short"), queries.MAX_CHART_POINTS)
        statements = _statements_of(
            engine,
            lambda: found.append(
                interactive_queries.model_curves(conn, tenant.id, session, "imdl-long")
            ),
        )
        short = interactive_queries.model_curves(conn, tenant.id, session, "imdl-short")
    (curves,) = found
    assert curves is not None and short is not None
    assert want["downsampled"] and len(want["train"]) == 750
    assert_same_curves(_curve_points(curves), want)
    for series in (curves.train, curves.eval, curves.grad_norm):
        assert 0 < len(series.steps) <= queries.MAX_CHART_POINTS
    # Buckets of 4: the first holds steps 0 to 3, the newest 2,996 to 2,999 (each step has a
    # train loss and a gradient norm); an eval every tenth step is alone in its bucket.
    assert (curves.train.steps[0], curves.train.steps[-1]) == (1.5, 2_997.5)
    assert (curves.grad_norm.steps[0], curves.grad_norm.steps[-1]) == (1.5, 2_997.5)
    assert (curves.eval.steps[0], curves.eval.steps[-1], len(curves.eval.steps)) == (0, 2_990, 300)

    assert not want_short["downsampled"] and not short.downsampled
    assert_same_curves(_curve_points(short), want_short)
    assert short.train.steps == list(range(40)) and short.grad_norm.steps == list(range(40))

    statement, parameters = statements[-1]
    plan = _plan(engine, statement, parameters)
    assert "'Index Name': 'uq_interactive_calls_model_seq'" in str(plan), plan
    assert _plan_rows_from(plan, "interactive_calls") == 15_000, plan
