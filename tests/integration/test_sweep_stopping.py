"""The sweep's median stopping rule (`control_plane.sweep_stopping`) on a real PostgreSQL, and
through a real trainer on the shipped tiny Llama: a job whose lowest eval loss is above the
median of its sweep's other jobs at the same step stops early; peers that have not got that
far, other sweeps and other tenants say nothing of it."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from control_plane import jobs, registry, sweep_stopping
from control_plane.events import add_event
from control_plane.services import Services, build_services
from tests.factories import enqueue_jobs, make_base, make_file, make_tenant, tag_jobs
from tests.integration.test_early_stopping import EVAL, HP, TRAIN
from tests.integration.test_trainer import (
    job_row,
    make_world,
    messages,
    metric_events,
    run_one,
    submit,
    trainer_settings,
)
from workers.runner import JobRunner


def evaluate(engine: Engine, job_id: str, losses: dict[int, float]) -> None:
    """The job's evaluations: step -> eval loss, as metrics events."""
    with engine.begin() as conn:
        for step, loss in losses.items():
            add_event(
                conn,
                job_id,
                f"step {step} eval",
                type="metrics",
                data={"step": step, "eval_loss": loss},
            )


def reference(peers: list[tuple[dict[int, float], bool]], step: int) -> list[float]:
    """Each peer (its evaluations, whether it is over) that evaluated at `step` or later, or is
    over, with an evaluation by `step`: its average eval loss by `step`."""
    told = []
    for losses, over in peers:
        by_then = [v for s, v in losses.items() if s <= step]
        if by_then and (over or max(losses) >= step):
            told.append(statistics.fmean(by_then))
    return sorted(told)


EXAMPLES = itertools.count()  # each example's tenants and base are its own
evaluations = st.dictionaries(
    st.integers(1, 12), st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]), max_size=5
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    peers=st.lists(st.tuples(evaluations, st.booleans()), max_size=5),
    strangers=st.lists(evaluations, max_size=2),
    step=st.integers(1, 12),
    lowest=st.sampled_from([0.4, 1.0, 1.25, 2.5]),
)
def test_the_peers_and_the_verdict_follow_the_rule(
    services: Services,
    peers: list[tuple[dict[int, float], bool]],
    strangers: list[dict[int, float]],
    step: int,
    lowest: float,
) -> None:
    engine, n = services.engine, next(EXAMPLES)
    tenant, other = make_tenant(engine, f"t-{n}"), make_tenant(engine, f"o-{n}")
    base = make_base(engine, f"b-{n}")
    file_id = make_file(engine, tenant.id).id
    job_id, *peer_ids = enqueue_jobs(engine, tenant.id, base.id, file_id, 1 + len(peers))
    tag_jobs(engine, {"sweep": "grid", "team": "x"}, job_id, *peer_ids)
    for peer_id, (losses, over) in zip(peer_ids, peers, strict=True):
        evaluate(engine, peer_id, losses)
        if over:
            services.queue.request_cancel(peer_id)
        # Neither a log line that holds an eval loss nor an evaluation that is not a number
        # is one of its evaluations.
        with engine.begin() as conn:
            add_event(conn, peer_id, "note", data={"step": 1, "eval_loss": 0.0})
            add_event(conn, peer_id, "odd", type="metrics", data={"step": 2, "eval_loss": "n/a"})
    # Another sweep of the tenant, and the same sweep's name in another tenant: not peers.
    apart = enqueue_jobs(engine, tenant.id, base.id, file_id, len(strangers))
    tag_jobs(engine, {"sweep": "other"}, *apart)
    elsewhere = enqueue_jobs(
        engine, other.id, base.id, make_file(engine, other.id).id, len(strangers)
    )
    tag_jobs(engine, {"sweep": "grid"}, *elsewhere)
    for stranger_id, losses in zip([*apart, *elsewhere], strangers * 2, strict=True):
        evaluate(engine, stranger_id, {s: v / 100 for s, v in losses.items()})
    evaluate(engine, job_id, {1: 0.001, 12: 0.001})  # its own are not its peers'
    with engine.connect() as conn:
        job = jobs.get_job_unscoped(conn, job_id)
        assert job is not None
        found = sweep_stopping.peers_at(conn, job, step)
    expected = reference(peers, step)
    assert found is not None
    assert found.averages == pytest.approx(expected)
    said = sweep_stopping.verdict(found, lowest)
    stops = len(expected) >= sweep_stopping.MIN_PEERS and lowest > statistics.median(expected)
    assert (said is not None) == stops
    if said is not None:
        assert said[1] == {
            "sweep_median_eval_loss": pytest.approx(statistics.median(expected)),
            "sweep_peers": len(expected),
        }


def test_a_job_of_no_sweep_has_no_peers(services: Services) -> None:
    engine = services.engine
    tenant = make_tenant(engine, "alone")
    base = make_base(engine, "b-alone")
    [job_id] = enqueue_jobs(engine, tenant.id, base.id, make_file(engine, tenant.id).id, 1)
    with engine.connect() as conn:
        job = jobs.get_job_unscoped(conn, job_id)
        assert job is not None
        assert sweep_stopping.peers_at(conn, job, 3) is None


@pytest.fixture
def trainer_services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    built = build_services(trainer_settings(tmp_path), database_url=database_url)
    yield built
    built.close()


def sweep_with_peers(
    services: Services, peer_loss: float, reached: int, *, over: bool = True, first: int = 1
) -> str:
    """A job of sweep `s` (TRAIN, evaluated on EVAL after every step, median stopping from its
    `first` evaluation), and two peers of the sweep, over (cancelled) or not (paused: the
    trainer takes only the job either way), whose every evaluation up to step `reached` was
    `peer_loss`."""
    world = make_world(services)
    overrides = HP.model_dump(exclude={"checkpoint_every_steps", "early_stopping_patience"})
    overrides["sweep_median_stopping"] = first
    job_id = submit(services, world, records=TRAIN, validation=EVAL, **overrides)
    peers = enqueue_jobs(
        services.engine,
        world["tenant"],
        world["base"],
        make_file(services.engine, world["tenant"]).id,
        2,
    )
    for peer in peers:
        (services.queue.request_cancel if over else services.queue.request_pause)(peer)
        evaluate(services.engine, peer, {step: peer_loss for step in range(1, reached + 1)})
    tag_jobs(services.engine, {"sweep": "s"}, job_id, *peers)
    return job_id


def test_a_job_trailing_its_sweep_stops_at_its_first_evaluation(
    trainer_services: Services, tmp_path: Path
) -> None:
    job_id = sweep_with_peers(trainer_services, peer_loss=0.01, reached=100)
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    assert run_one(runner) == "succeeded"
    steps = [m for m in metric_events(trainer_services, job_id) if "train_loss" in m]
    assert len(steps) == 1 < steps[-1]["total_steps"]  # stopped at its first evaluation
    said = [m for m in messages(trainer_services, job_id) if m.startswith("sweep median stopping")]
    assert said and "above 0.0100, the median of the average eval losses" in said[0]
    assert "of the 2 other jobs of sweep s" in said[0]
    with trainer_services.engine.connect() as conn:
        version = registry.version_for_job(conn, job_id)
    assert version is not None
    assert version.metrics["early_stopped"] is True
    assert version.metrics["stopped_by"] == "sweep_median_stopping"
    assert version.metrics["steps"] == version.metrics["weights_from_step"] == 1
    assert job_row(trainer_services, job_id).status == "succeeded"


def test_peers_that_are_over_tell_by_their_last_evaluation(
    trainer_services: Services, tmp_path: Path
) -> None:
    """Peers that stopped at step 2, far lower: the job, asked from its third evaluation,
    stops there (left out, they would have left it to train every step: the next test)."""
    job_id = sweep_with_peers(trainer_services, peer_loss=0.01, reached=2, first=3)
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    assert run_one(runner) == "succeeded"
    steps = [m for m in metric_events(trainer_services, job_id) if "train_loss" in m]
    assert len(steps) == 3


@pytest.mark.parametrize(
    ("peer_loss", "reached", "over"),
    [(100.0, 100, True), (0.01, 0, True), (0.01, 2, False)],
    ids=[
        "its sweep does worse",
        "its sweep has not evaluated",
        "its sweep has not got as far yet",
    ],
)
def test_a_job_its_sweep_does_not_lead_trains_every_step(
    trainer_services: Services, tmp_path: Path, peer_loss: float, reached: int, over: bool
) -> None:
    job_id = sweep_with_peers(
        trainer_services, peer_loss=peer_loss, reached=reached, over=over, first=3
    )
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    assert run_one(runner) == "succeeded"
    steps = [m for m in metric_events(trainer_services, job_id) if "train_loss" in m]
    assert len(steps) == steps[-1]["total_steps"] == 20
    assert not any(
        m.startswith("sweep median stopping") for m in messages(trainer_services, job_id)
    )
    with trainer_services.engine.connect() as conn:
        version = registry.version_for_job(conn, job_id)
    assert version is not None and version.metrics["early_stopped"] is False
