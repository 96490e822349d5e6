"""A job's loss curves as the job page's chart gets them (`queries.loss_curves`): every point of
a short run, and past the chart's points the narrowest bucket width that fits, each bucket its
points' mean step and mean loss, from revision 0015's sums kept as the events are inserted. The
reference (`tests.curves`, which an interactive model's curves answer to as well) buckets every
event in Python; the curves must equal it, read from at most a chart's worth of rows however
long the run."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, text

from control_plane import metric_rollups
from control_plane.dashboard import queries
from control_plane.events import add_event, metric_events_in_bulk
from control_plane.queue_stats import QueueBusyError
from tests.curves import assert_same_curves, downsampled
from tests.factories import enqueue_jobs, log_metric_steps, make_base, make_file, make_tenant
from tests.integration.test_queue_scale import DATABASE_EXAMPLES, _plan_rows_from
from tests.integration.test_reads_at_scale import _plan, _statements_of

Point = tuple[float, float | None, float | None]  # step, train loss, eval loss


def reference(points: list[Point], max_points: int) -> dict[str, Any]:
    """The curves by the rule (`tests.curves.downsampled`), from every point."""
    train = [(s, t) for s, t, _ in points if t is not None]
    evaluation = [(s, e) for s, _, e in points if e is not None]
    return downsampled({"train": train, "eval": evaluation}, max_points)


def curves_as_points(curves: queries.LossCurves) -> dict[str, Any]:
    return {
        "train": list(zip(curves.train.steps, curves.train.values, strict=True)),
        "eval": list(zip(curves.eval.steps, curves.eval.values, strict=True)),
        "downsampled": curves.downsampled,
    }


def insert_batch(conn: Connection, job_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Events in one statement, in order (a batch, as a restore or an import writes them)."""
    conn.execute(
        text(
            "INSERT INTO job_events (job_id, type, message, data) "
            "SELECT :job, e ->> 0, 'batch', e -> 1 "
            "FROM jsonb_array_elements(CAST(:events AS jsonb)) WITH ORDINALITY AS x(e, n) "
            "ORDER BY n"
        ),
        {"job": job_id, "events": json.dumps(events)},
    )


@pytest.fixture
def job_of(engine: Engine) -> Any:
    base = make_base(engine)
    tenant = make_tenant(engine, f"curves-{secrets.token_hex(3)}")
    file_id = make_file(engine, tenant.id).id

    def new_job() -> str:
        (job_id,) = enqueue_jobs(engine, tenant.id, base.id, file_id, 1)
        return job_id

    return new_job


LOSS = st.floats(min_value=0, max_value=20, allow_nan=False) | st.sampled_from(["high", None])
STEP = (
    st.integers(min_value=0, max_value=60_000)
    | st.integers(min_value=0, max_value=40).map(lambda n: n + 0.5)
    | st.sampled_from(["7", None])
)
EVENT = st.tuples(st.sampled_from(["metrics", "metrics", "metrics", "message"]), STEP, LOSS, LOSS)


def event_data(step: Any, train: Any, evaluation: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"tokens_per_s": 100}
    for key, value in (("step", step), ("train_loss", train), ("eval_loss", evaluation)):
        if value is not None:
            data[key] = value
    return data


def counted(kind: str, step: Any, train: Any, evaluation: Any) -> Point | None:
    """The point an event gives the chart: a metrics event's numeric step, and its numeric
    losses (a string is no loss), when it has one; else None."""
    number = (int, float)
    if kind != "metrics" or not isinstance(step, number):
        return None
    train = train if isinstance(train, number) else None
    evaluation = evaluation if isinstance(evaluation, number) else None
    if train is None and evaluation is None:
        return None
    return (float(step), train, evaluation)


@DATABASE_EXAMPLES
@given(
    batches=st.lists(
        st.tuples(
            st.sampled_from(["one by one", "one statement", "in bulk"]),
            st.lists(EVENT, min_size=1, max_size=12),
        ),
        min_size=1,
        max_size=8,
    ),
    max_points=st.sampled_from([2, 3, 5, 20, 1000]),
)
def test_the_curves_equal_every_events_bucketing(
    engine: Engine,
    job_of: Any,
    batches: list[tuple[str, list[tuple[str, Any, Any, Any]]]],
    max_points: int,
) -> None:
    """Events one by one (as a trainer logs them), several in one statement, and in bulk
    (summed once at the end), in one transaction and in several, metric and not, with steps
    and losses that are not numbers among them, repeated steps (a resumed run) and half
    steps: the curves equal the reference's at every width the points need."""
    job_id = job_of()
    points: list[Point] = []
    for how, events in batches:
        rows = [(kind, event_data(step, t, e)) for kind, step, t, e in events]
        with engine.begin() as conn:
            if how == "one by one":
                for kind, data in rows:
                    add_event(conn, job_id, "step", type=kind, data=data)
            elif how == "one statement":
                insert_batch(conn, job_id, rows)
            else:
                with metric_events_in_bulk(conn, [job_id]):
                    insert_batch(conn, job_id, rows)
            # An event after them in the same transaction (after the bulk: summed as it comes).
            add_event(conn, job_id, "after", type="metrics", data={"step": 1, "eval_loss": 2})
            rows.append(("metrics", {"step": 1, "eval_loss": 2}))
        points += [
            p
            for p in (
                counted(kind, d.get("step"), d.get("train_loss"), d.get("eval_loss"))
                for kind, d in rows
            )
            if p is not None
        ]
    with engine.connect() as conn:
        curves = queries.loss_curves(conn, job_id, max_points=max_points)
    want = reference(points, max_points)
    assert_same_curves(curves_as_points(curves), want)
    assert curves.points_in_job == sum((t is not None) + (e is not None) for _, t, e in points)
    assert len(curves.train.steps) <= max_points and len(curves.eval.steps) <= max_points
    with engine.connect() as conn:  # sums kept event by event are no drift to the check
        assert [line for line in metric_rollups.drift(conn) if job_id in line] == []


def _points_of(conn: Connection, job_id: str) -> list[Point]:
    """The job's metric events as points, in the order logged (a reference's input)."""
    return [
        (float(step), train, evaluation)
        for step, train, evaluation in conn.execute(
            text(
                "SELECT (data ->> 'step')::float8, (data ->> 'train_loss')::float8, "
                "(data ->> 'eval_loss')::float8 FROM job_events "
                "WHERE job_id = :job AND type = 'metrics' ORDER BY id"
            ),
            {"job": job_id},
        )
    ]


def test_a_long_runs_curves_read_a_charts_worth_of_rows(engine: Engine, job_of: Any) -> None:
    """A job 30,000 steps into its run (a train loss each step, an eval loss each 100th) and a
    short one beside it: the long run's curves equal the reference's in at most 1,000 points,
    read from at most 1,000 rows and none of its events; deleting the job deletes its sums."""
    long_run, short_run = job_of(), job_of()
    log_metric_steps(
        engine,
        {long_run: 30_000, short_run: 50},
        "jsonb_strip_nulls(jsonb_build_object('step', g, "
        "'train_loss', 3.0 / (1 + g / 500.0) + (g % 7) / 100.0, "
        "'eval_loss', CASE WHEN g % 100 = 0 THEN 3.5 / (1 + g / 400.0) END))",
    )
    with engine.begin() as conn:
        add_event(conn, long_run, "Job started", data={"status": "running"})
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            text("ANALYZE job_events; ANALYZE job_metric_rollups")
        )
        points = _points_of(conn, long_run)
        found: list[queries.LossCurves] = []
        statements = _statements_of(
            engine, lambda: found.append(queries.loss_curves(conn, long_run))
        )
    (curves,) = found
    want = reference(points, queries.MAX_CHART_POINTS)
    assert want["downsampled"] and len(want["train"]) > queries.MAX_CHART_POINTS // 2
    assert_same_curves(curves_as_points(curves), want)
    assert curves.points_in_job == 30_300
    read = 0
    for statement, parameters in statements:
        plan = _plan(engine, statement, parameters)
        assert _plan_rows_from(plan, "job_events") == 0, plan
        read += _plan_rows_from(plan, "job_metric_rollups")
    assert read <= queries.MAX_CHART_POINTS + 1, read
    with engine.connect() as conn:
        short = queries.loss_curves(conn, short_run)
    assert not short.downsampled and short.train.steps == [float(s) for s in range(1, 51)]
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = :job"), {"job": long_run})
        left = conn.execute(
            text("SELECT count(*) FROM job_metric_rollups WHERE job_id = :job"), {"job": long_run}
        ).scalar_one()
    assert left == 0


def _sum_versions(engine: Engine, job_id: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                text(
                    "SELECT width, bucket, xmin::text FROM job_metric_rollups "
                    "WHERE job_id = :job ORDER BY width, bucket"
                ),
                {"job": job_id},
            )
        ]


def test_check_names_each_job_whose_chart_sums_drifted_and_repair_sums_them_again(
    engine: Engine, database_url: str, job_of: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Writes around the trigger, as a restore or a replica's apply makes them: 500 steps of one
    job logged with triggers off (its chart stops at step 3,000), another job's sums restored
    on top of its sums (doubled), sums left for a job without events. `loraforge queue check`
    names those three jobs and not the one that agrees; `repair` sums them again and leaves
    the one that agrees unwritten; its chart then equals the reference over every event."""
    from tests.integration.test_queue_repair import _around_triggers, _cli

    missed, doubled, stray, exact = sorted(job_of() for _ in range(4))
    log_metric_steps(engine, {missed: 3_000, doubled: 1_500, exact: 2_000})
    with engine.begin() as conn:
        _around_triggers(conn)
        conn.execute(
            text(
                "INSERT INTO job_events (job_id, type, message, data) "
                "SELECT :job, 'metrics', 'step ' || g, "
                "jsonb_build_object('step', g, 'train_loss', 1.0 / g) "
                "FROM generate_series(3001, 3500) AS g"
            ),
            {"job": missed},
        )
        conn.execute(
            text(
                "UPDATE job_metric_rollups SET train_points = 2 * train_points, "
                "train_steps = 2 * train_steps, train_losses = 2 * train_losses "
                "WHERE job_id = :job"
            ),
            {"job": doubled},
        )
        conn.execute(
            text(
                "INSERT INTO job_metric_rollups (job_id, width, bucket, first_step, last_step, "
                "train_points, train_steps, train_losses, eval_points, eval_steps, eval_losses) "
                "VALUES (:job, 2, 0, 1, 1, 1, 1, 0.5, 0, 0, 0)"
            ),
            {"job": stray},
        )
    exact_sums = _sum_versions(engine, exact)
    with engine.connect() as conn:
        before = queries.loss_curves(conn, missed)
        found = metric_rollups.drift(conn)
        want = reference(_points_of(conn, missed), queries.MAX_CHART_POINTS)
    assert before.train.steps[-1] <= 3_000 < want["train"][-1][0]  # the chart lost its end
    assert [line.split(":")[0] for line in found] == [
        f"metrics of job {job}" for job in (missed, doubled, stray)
    ]
    assert "sum 3000 train points" in found[0] and "its events 3500" in found[0]
    assert "sum 3000 train points" in found[1] and "its events 1500" in found[1]

    capsys.readouterr()
    assert _cli(database_url, "check") == 1
    checked = capsys.readouterr()
    assert checked.out.splitlines() == found
    assert "loss-chart sums of 3 jobs" in checked.err and "queue repair" in checked.err

    assert _cli(database_url, "repair") == 0
    assert capsys.readouterr().out.splitlines() == [f"repaired: {line}" for line in found] + [
        "summed the loss charts of 3 jobs again from their events"
    ]
    with engine.connect() as conn:
        assert metric_rollups.drift(conn) == []
        after = queries.loss_curves(conn, missed)
        strays = conn.execute(
            text("SELECT count(*) FROM job_metric_rollups WHERE job_id = :job"), {"job": stray}
        ).scalar_one()
    assert_same_curves(curves_as_points(after), want)
    assert after.points_in_job == 3_500
    assert strays == 0
    assert _sum_versions(engine, exact) == exact_sums  # a job that agreed: not written
    assert _cli(database_url, "check") == 0
    with engine.begin() as conn:
        assert metric_rollups.repair(conn) == []


def test_a_chart_repair_that_cannot_lock_the_events_in_time_writes_nothing(
    engine: Engine, job_of: Any
) -> None:
    """A transaction inserting an event holds the events' lock: the repair gives up within its
    timeout, the drift it found left as it was, and succeeds once that transaction ends."""
    job_id, other = job_of(), job_of()
    log_metric_steps(engine, {job_id: 100})
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM job_metric_rollups WHERE job_id = :job"), {"job": job_id})
    with engine.connect() as conn:
        found = metric_rollups.drift(conn)
    assert len(found) == 1 and job_id in found[0]

    with engine.connect() as holder, holder.begin():  # a trainer's event, not yet committed
        add_event(holder, other, "step", type="metrics", data={"step": 1, "train_loss": 1.0})
        with (
            pytest.raises(QueueBusyError, match=r"job_events is held .*\(no lock within 0\.2 s\)"),
            engine.begin() as conn,
        ):
            metric_rollups.repair(conn, lock_timeout_seconds=0.2)
        with engine.connect() as conn:
            assert metric_rollups.drift(conn) == found
    with engine.begin() as conn:
        assert metric_rollups.repair(conn) == found
    with engine.connect() as conn:
        assert metric_rollups.drift(conn) == []
