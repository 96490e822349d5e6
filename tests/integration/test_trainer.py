"""Trainers end to end: real Postgres queue, real object store, real transformers + peft on the
shipped tiny Llama, and real Ray actors for the kill-and-resume path."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load as safetensors_load
from sqlalchemy import text
from transformers import AutoModelForCausalLM

from control_plane import jobs, registry, trainers
from control_plane.events import list_events
from control_plane.hyperparameters import Hyperparameters
from control_plane.records import CheckpointRecord, JobRecord
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from tests.factories import ADDITION_CHATS as RECORDS
from tests.factories import make_tenant, register_test_base, upload_records
from tests.faults.tcp_proxy import CuttableProxy
from tests.fixtures.testbase import TEST_BASE_PATH
from workers.runner import JobRunner
from workers.training.recipe import ResidentBase

FAST = {
    "n_epochs": 3,
    "batch_size": 4,
    "learning_rate_multiplier": 10,
    "lora_rank": 8,
    "max_seq_length": 64,
}


def trainer_settings(tmp_path: Path) -> Settings:
    """A short lease and no retry backoff, state under `tmp_path`."""
    return Settings(
        home=tmp_path / "home",
        local_store_dir=tmp_path / "objects",
        lease_seconds=4,
        retry_backoff_seconds=0,
    )


@pytest.fixture
def trainer_services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    services = build_services(trainer_settings(tmp_path), database_url=database_url)
    yield services
    services.close()


@pytest.fixture
def world(trainer_services: Services) -> dict[str, str]:
    return make_world(trainer_services)


def make_world(services: Services) -> dict[str, str]:
    """A tenant and the tiny base registered by its directory."""
    tenant = make_tenant(services.engine, "acme", max_running_jobs=10)
    base = register_test_base(services.engine)
    return {"tenant": tenant.id, "base": base.id}


def submit(
    services: Services,
    world: dict[str, str],
    *,
    records: list[dict[str, Any]] = RECORDS,
    validation: list[dict[str, Any]] | None = None,
    parent_version_id: str | None = None,
    **hp: Any,
) -> str:
    file_id = upload_records(services, world["tenant"], records)
    eval_id = None if validation is None else upload_records(services, world["tenant"], validation)
    with services.engine.begin() as conn:
        job, _ = jobs.create_job(
            conn,
            jobs.NewJob(
                tenant_id=world["tenant"],
                base_model_id=world["base"],
                training_file_id=file_id,
                validation_file_id=eval_id,
                hyperparameters=Hyperparameters(**{**FAST, **hp}).model_dump(mode="json"),
                adapter_name="sums",
                parent_version_id=parent_version_id,
            ),
        )
    services.queue.mark_queued(job.id)
    return job.id


def job_row(services: Services, job_id: str) -> JobRecord:
    with services.engine.connect() as conn:
        found = jobs.get_job_unscoped(conn, job_id)
    assert found is not None
    return found


def sleepers(services: Services) -> list[str]:
    """The trainers standing among the sleepers."""
    with services.engine.connect() as conn:
        return list(conn.execute(text("SELECT worker_id FROM queue_sleepers")).scalars())


def wait_until_asleep(services: Services, thread: threading.Thread, worker_id: str) -> None:
    """Until `worker_id` (run by `thread`) stands alone among the sleepers: 60 s at most."""
    deadline = time.monotonic() + 60
    while sleepers(services) != [worker_id]:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)


def metric_events(services: Services, job_id: str) -> list[dict[str, Any]]:
    with services.engine.connect() as conn:
        found = list_events(conn, job_id, limit=10_000, newest_first=False)
    return [e.data or {} for e in found if e.type == "metrics"]


def messages(services: Services, job_id: str) -> list[str]:
    with services.engine.connect() as conn:
        return [e.message for e in list_events(conn, job_id, limit=10_000, newest_first=False)]


def done_steps(services: Services, job_id: str) -> int:
    """The job's total optimizer steps, as its metrics report them."""
    return int(
        [m for m in metric_events(services, job_id) if "total_steps" in m][-1]["total_steps"]
    )


def wait_for_training_steps(
    services: Services, job_id: str, thread: threading.Thread, steps: int
) -> None:
    """Until the job (trained by `thread`) reported `steps` optimizer steps: 120 s at most."""
    deadline = time.monotonic() + 120
    while len([m for m in metric_events(services, job_id) if "train_loss" in m]) < steps:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.1)


def checkpointed_at_last_step(services: Services, job_id: str) -> CheckpointRecord:
    """The job's newest checkpoint, asserted to be at the last step it trained (3 or more)."""
    with services.engine.connect() as conn:
        checkpoint = jobs.latest_checkpoint(conn, job_id)
    trained = max(m["step"] for m in metric_events(services, job_id) if "train_loss" in m)
    assert checkpoint is not None and checkpoint.step == trained >= 3
    return checkpoint


def resumed_once_from(services: Services, job_id: str, checkpoint: CheckpointRecord) -> bool:
    """Whether the job's events say it resumed once, from `checkpoint`'s step."""
    resumed = [m for m in messages(services, job_id) if m.startswith("resumed from step")]
    return resumed == [f"resumed from step {checkpoint.step} of {done_steps(services, job_id)}"]


def run_one(runner: JobRunner) -> str:
    job = runner.services.queue.claim(
        runner.worker_id, prefer_base_model_id=runner.resident_base_id
    )
    assert job is not None
    return runner.run(job)


def test_job_trains_publishes_and_adapter_changes_outputs(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    job_id = submit(trainer_services, world)
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    assert run_one(runner) == "succeeded"
    job = job_row(trainer_services, job_id)
    assert job.status == "succeeded" and job.fine_tuned_model
    losses = [m["train_loss"] for m in metric_events(trainer_services, job_id) if "train_loss" in m]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    # The job's row says how many tokens it trained on: every step's, summed.
    steps = [m for m in metric_events(trainer_services, job_id) if "train_loss" in m]
    assert job.trained_tokens == sum(m["tokens"] for m in steps) == steps[-1]["trained_tokens"]
    statuses = [
        m for m in messages(trainer_services, job_id) if m.startswith(("Job started", "The job"))
    ]
    assert (
        statuses[0].startswith("Job started")
        and statuses[-1] == "The job has successfully completed"
    )
    # The published version pulls into a PEFT directory that loads on the base and changes it.
    with trainer_services.engine.connect() as conn:
        version = registry.resolve_version(conn, world["tenant"], "sums", "latest")
    assert version.job_id == job_id
    target = tmp_path / "pulled"
    for entry in version.files:
        trainer_services.store.download_to(
            version.object_prefix.rstrip("/") + "/" + entry["name"],
            target / entry["name"],
            expected_sha256=entry["sha256"],
        )
    base = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    before = base(ids).logits
    adapted = PeftModel.from_pretrained(base, target)
    assert not torch.allclose(adapted(ids).logits, before)


def version_weights(services: Services, version: registry.AdapterVersionRecord) -> dict[str, Any]:
    entry = version.file("adapter_model.safetensors")
    assert entry is not None
    data = services.store.get_bytes(version.object_prefix + entry["name"])
    return safetensors_load(data)


def test_job_continuing_from_a_version_starts_from_its_weights(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    submit(trainer_services, world)
    assert run_one(runner) == "succeeded"
    with trainer_services.engine.connect() as conn:
        parent = registry.resolve_version(conn, world["tenant"], "sums", "1")
    # A step size too small to move anything: what comes out is what went in.
    still = {"learning_rate_multiplier": 1e-9, "n_epochs": 1}
    continued = submit(trainer_services, world, parent_version_id=parent.id, **still)
    fresh = submit(trainer_services, world, **still)
    assert run_one(runner) == "succeeded" and run_one(runner) == "succeeded"
    with trainer_services.engine.connect() as conn:
        child = registry.resolve_version(conn, world["tenant"], "sums", "2")
        unrelated = registry.resolve_version(conn, world["tenant"], "sums", "3")
    assert child.job_id == continued and unrelated.job_id == fresh
    assert child.parent_version_id == parent.id and child.parent_ref == "sums@1"
    assert child.lineage["parent_version"]["model_id"] == parent.model_id
    assert unrelated.parent_version_id is None and unrelated.lineage["parent_version"] is None
    assert any(
        m.startswith("Continuing from sums@1") for m in messages(trainer_services, continued)
    )
    start, got, zero = (version_weights(trainer_services, v) for v in (parent, child, unrelated))
    lora_b = [k for k in start if "lora_B" in k]
    assert lora_b and set(got) == set(start)
    for key in start:
        torch.testing.assert_close(got[key], start[key], atol=1e-4, rtol=0)
    # A fresh adapter starts with B = 0, far from the parent's trained B.
    assert all(zero[k].abs().max() < 1e-4 < start[k].abs().max() for k in lora_b)


def test_base_stays_resident_and_untouched_across_jobs(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    first, second = submit(trainer_services, world), submit(trainer_services, world)
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    loads = ResidentBase.load_count
    assert run_one(runner) == "succeeded"
    assert runner.resident is not None
    fingerprint = runner.resident.state_fingerprint()
    assert run_one(runner) == "succeeded"
    assert ResidentBase.load_count == loads + 1
    assert runner.resident.state_fingerprint() == fingerprint
    assert any("already resident" in m for m in messages(trainer_services, second))
    assert any(m.startswith("Loaded base tiny-llama") for m in messages(trainer_services, first))


def test_cancel_running_job_stops_within_five_seconds(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    job_id = submit(trainer_services, world, records=RECORDS * 8, n_epochs=20, batch_size=2)
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1", heartbeat_seconds=0.5)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_one(runner)))
    thread.start()
    deadline = time.monotonic() + 120
    while not metric_events(trainer_services, job_id):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.2)
    asked = time.monotonic()
    trainer_services.queue.request_cancel(job_id)
    thread.join(30)
    stopped_after = time.monotonic() - asked
    assert outcome == ["cancelled"]
    assert job_row(trainer_services, job_id).status == "cancelled"
    assert stopped_after < 5, f"took {stopped_after:.1f}s"


def test_a_stopping_worker_checkpoints_and_hands_its_job_back(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A worker told to stop (SIGTERM, a pod going away) does not leave its job to the lease:
    it checkpoints the step reached, the job is queued again at once without using up an
    attempt, and the next worker resumes from that step."""
    job_id = submit(trainer_services, world, records=RECORDS * 8, n_epochs=3, batch_size=2)
    first = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1", heartbeat_seconds=0.5)
    stop = threading.Event()
    ran: list[int] = []
    thread = threading.Thread(target=lambda: ran.append(first.run_forever(stop, idle_wait=0.1)))
    thread.start()
    wait_for_training_steps(trainer_services, job_id, thread, 3)
    stop.set()
    thread.join(30)
    assert ran == [1]
    handed = job_row(trainer_services, job_id)
    assert handed.status == "queued" and handed.lease_owner is None
    assert handed.attempt == 0  # a hand-back is not a failed attempt
    checkpoint = checkpointed_at_last_step(trainer_services, job_id)
    assert any(m.startswith("Handed back to the queue") for m in messages(trainer_services, job_id))

    second = JobRunner(trainer_services, "w2", work_dir=tmp_path / "w2")
    assert run_one(second) == "succeeded"
    done = job_row(trainer_services, job_id)
    assert done.status == "succeeded" and done.attempt == 1
    assert resumed_once_from(trainer_services, job_id, checkpoint)


def test_a_job_asked_to_pause_checkpoints_leaves_its_trainer_and_resumes_from_there(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """OpenAI's pause on a running job: its trainer learns it at a heartbeat, stops at the next
    step with a checkpoint and lets the job go `paused` (its attempt not used); no trainer
    claims it while paused; resumed, the next trainer goes on from that step."""
    queue = trainer_services.queue
    job_id = submit(trainer_services, world, records=RECORDS * 8, n_epochs=3, batch_size=2)
    first = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1", heartbeat_seconds=0.5)
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(run_one(first)))
    thread.start()
    wait_for_training_steps(trainer_services, job_id, thread, 3)
    asked = time.monotonic()
    assert queue.request_pause(job_id).status == "running"
    thread.join(30)
    stopped_after = time.monotonic() - asked
    assert outcome == ["paused"]
    paused = job_row(trainer_services, job_id)
    assert paused.status == "paused" and paused.lease_owner is None and paused.attempt == 0
    assert stopped_after < 5, f"took {stopped_after:.1f}s"
    checkpoint = checkpointed_at_last_step(trainer_services, job_id)
    assert queue.claim("w2") is None

    assert queue.resume(job_id).status == "queued"
    second = JobRunner(trainer_services, "w2", work_dir=tmp_path / "w2")
    assert run_one(second) == "succeeded"
    done = job_row(trainer_services, job_id)
    assert done.status == "succeeded" and done.attempt == 1 and not done.pause_requested
    assert resumed_once_from(trainer_services, job_id, checkpoint)


def test_a_trainer_reports_itself_idle_and_busy_and_leaves_the_registry_when_it_stops(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """The trainer registry (what /readyz, /metrics and the dashboard read) hears from a trainer
    while it waits and while it trains, with the job in hand, its base and its speed."""
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1", heartbeat_seconds=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run_forever, args=(stop,), kwargs={"idle_wait": 0.1})

    def row() -> trainers.TrainerRecord | None:
        with trainer_services.engine.connect() as conn:
            found = [t for t in trainers.list_trainers(conn, lease_seconds=4) if t.id == "w1"]
        return found[0] if found else None

    def wait_until(check: Callable[[trainers.TrainerRecord], bool]) -> trainers.TrainerRecord:
        deadline = time.monotonic() + 120
        while True:
            found = row()
            if found is not None and check(found):
                return found
            assert time.monotonic() < deadline and thread.is_alive(), found
            time.sleep(0.1)

    thread.start()
    try:
        idle = wait_until(lambda t: t.alive)
        assert idle.current_job_id is None and idle.resident_base is None
        assert idle.device.startswith("cpu (") and idle.pid == os.getpid()

        job_id = submit(trainer_services, world, records=RECORDS * 8, n_epochs=3, batch_size=2)
        busy = wait_until(lambda t: t.current_job_id == job_id and t.tokens_per_second is not None)
        assert busy.resident_base == "tiny-llama"
        assert busy.step_seconds is not None and busy.step_seconds > 0
        assert busy.peak_memory_bytes is not None and busy.peak_memory_bytes > 0
        assert busy.last_heartbeat_at > idle.last_heartbeat_at
    finally:
        stop.set()
        thread.join(60)
    assert row() is None  # a clean stop takes the row with it


def test_an_idle_trainer_sleeps_with_its_resident_base_until_a_queued_job_wakes_it(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """An idle trainer stands among the sleepers (with the base it holds resident, once it
    holds one) and a queued job wakes it at once: its wait (120 s) never times out here."""
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1", heartbeat_seconds=0.5)
    stop = threading.Event()
    ran: list[int] = []
    thread = threading.Thread(
        target=lambda: ran.append(runner.run_forever(stop, idle_wait=120, max_jobs=2))
    )

    def sleeping_with() -> list[str | None]:
        with trainer_services.engine.connect() as conn:
            return list(
                conn.execute(
                    text("SELECT resident_base_id FROM queue_sleepers WHERE worker_id = 'w1'")
                ).scalars()
            )

    def run_when_woken(expected_resident: str | None) -> None:
        deadline = time.monotonic() + 60
        while sleeping_with() != [expected_resident]:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        job_id = submit(trainer_services, world, n_epochs=1)
        while job_row(trainer_services, job_id).status != "succeeded":
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.1)

    thread.start()
    try:
        run_when_woken(None)
        run_when_woken(world["base"])
        thread.join(60)
    finally:
        stop.set()
        thread.join(60)
    assert ran == [2]
    assert sleeping_with() == []


def test_an_idle_trainer_asked_to_stop_stops_within_its_wait_and_leaves_the_sleepers(
    trainer_services: Services, tmp_path: Path
) -> None:
    """Its wait (120 s here, 30 s by default) does not hold up a stop: SIGTERM on an idle
    trainer (`loraforge worker`, `loraforge up`) ends it within seconds."""
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1", heartbeat_seconds=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: runner.run_forever(stop, idle_wait=120))
    thread.start()
    try:
        wait_until_asleep(trainer_services, thread, "w1")
        time.sleep(0.5)  # into its wait
        stop.set()
        thread.join(10)
        assert not thread.is_alive(), "the idle trainer sat out its wait"
        assert sleepers(trainer_services) == []
    finally:
        stop.set()
        thread.join(130)


@pytest.mark.faults
def test_a_sleeping_trainer_cut_off_from_the_database_sleeps_again_and_is_woken_after(
    proxied_url: str, proxy: CuttableProxy, tmp_path: Path
) -> None:
    """An outage breaks an idle trainer's listening connection and the refresh of its sleeper
    row when its wait runs out; the trainer waits it out (`through_blips`, which it fails
    without) and trains a job queued once the database is back."""
    services = build_services(trainer_settings(tmp_path), database_url=proxied_url)
    runner = JobRunner(services, "w1", work_dir=tmp_path / "w1", heartbeat_seconds=0.5)
    stop = threading.Event()
    ran: list[int] = []
    thread = threading.Thread(
        target=lambda: ran.append(runner.run_forever(stop, idle_wait=2, max_jobs=1))
    )

    try:
        world = make_world(services)
        thread.start()
        wait_until_asleep(services, thread, "w1")
        proxy.cut()
        time.sleep(5)  # two of its waits run out while the database is away
        proxy.restore()
        job_id = submit(services, world, n_epochs=1)
        thread.join(120)
        assert not thread.is_alive() and ran == [1]
        assert job_row(services, job_id).status == "succeeded"
        assert sleepers(services) == []
    finally:
        stop.set()
        thread.join(60)
        services.close()


def test_a_silent_trainer_shows_as_gone_and_is_forgotten_later(trainer_services: Services) -> None:
    report = trainers.TrainerReport(id="t-silent", host="node-a", pid=7, device="cpu (fp32)")
    with trainer_services.engine.begin() as conn:
        trainers.report(conn, report)
        trainers.report(conn, trainers.TrainerReport(id="t-live", host="node-b", pid=8, device="x"))
        conn.execute(
            text(
                "UPDATE trainers SET last_heartbeat_at = now() - interval '10 seconds' "
                "WHERE id = 't-silent'"
            )
        )
    with trainer_services.engine.begin() as conn:
        listed = trainers.list_trainers(conn, lease_seconds=4)
        assert [(t.id, t.alive) for t in listed] == [("t-live", True), ("t-silent", False)]
        assert trainers.count_alive(conn, lease_seconds=4) == 1
        assert trainers.count_alive(conn, lease_seconds=60) == 2
        assert trainers.forget_gone(conn, older_than_seconds=5) == 1
        assert [t.id for t in trainers.list_trainers(conn, lease_seconds=4)] == ["t-live"]


@pytest.mark.faults
def test_a_database_outage_longer_than_the_trainers_patience_costs_the_job_no_attempt(
    proxied_url: str, proxy: CuttableProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past its patience the trainer lets the job go to its lease rather than failing it: the
    reaper hands it back as an interruption and it resumes from its checkpoint. The outage is
    a few warnings in the log, not one per heartbeat."""
    settings = Settings(
        home=tmp_path / "home",
        local_store_dir=tmp_path / "objects",
        lease_seconds=4,
        retry_backoff_seconds=0,
        database_patience_seconds=2,
    )
    services = build_services(settings, database_url=proxied_url)
    runner = JobRunner(services, "w1", work_dir=tmp_path / "w1", heartbeat_seconds=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=runner.run_forever, args=(stop,), kwargs={"idle_wait": 0.2})
    try:
        job_id = submit(
            services,
            make_world(services),
            records=RECORDS * 2,
            n_epochs=3,
            batch_size=2,
            checkpoint_every_steps=8,
        )
        thread.start()
        deadline = time.monotonic() + 120
        while True:
            with services.engine.connect() as conn:
                if jobs.latest_checkpoint(conn, job_id) is not None:
                    break
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.1)

        with caplog.at_level(logging.WARNING, logger="workers"):
            proxy.cut()
            time.sleep(3 * settings.lease_seconds)  # past the patience and the lease
            proxy.restore()
            while job_row(services, job_id).status not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline + 240 and thread.is_alive()
                time.sleep(0.2)
    finally:
        stop.set()
        thread.join(60)
        services.close()

    done = job_row(services, job_id)
    assert done.status == "succeeded", done
    assert (done.attempt, done.interruptions) == (1, 1)
    assert any(m.startswith("resumed from step") for m in messages(services, job_id))
    with services.engine.connect() as conn:
        published = conn.execute(
            text("SELECT count(*) FROM adapter_versions WHERE job_id = :j"), {"j": job_id}
        ).scalar_one()
    assert published == 1
    lines = [r.getMessage() for r in caplog.records]
    assert any("leaving the job to its lease" in line for line in lines)
    # The old heartbeat wrote a line with a traceback per beat: 24 of them in this outage.
    assert len([line for line in lines if line.startswith("heartbeat")]) <= 2, lines
    assert len(lines) <= 12, lines


def test_bad_hyperparameters_fail_the_job_and_the_runner_goes_on(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    bad = submit(trainer_services, world, target_modules=["no_such_proj"])
    good = submit(trainer_services, world, n_epochs=1)
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    stop = threading.Event()
    assert runner.run_forever(stop, idle_wait=0.1, max_jobs=2) == 2
    failed = job_row(trainer_services, bad)
    assert failed.status == "failed" and failed.error_code == "training_error"
    assert "no_such_proj" in (failed.error_message or "")
    assert job_row(trainer_services, good).status == "succeeded"


def test_empty_data_after_filtering_fails_with_reason(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    # Every example is longer than max_seq_length allows for its answer: nothing is trainable.
    long = [{"prompt": "word " * 200, "completion": "yes"}]
    job_id = submit(trainer_services, world, records=long, max_seq_length=16)
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    assert run_one(runner) == "failed"
    assert "no" in (job_row(trainer_services, job_id).error_message or "").lower()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}},
    )
    yield
    ray.shutdown()


@pytest.mark.ray
def test_killed_actor_job_resumes_from_checkpoint_on_a_new_actor(
    ray_cluster: None, trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    import ray

    from workers.actor import TrainerActor

    job_id = submit(
        trainer_services,
        world,
        records=RECORDS * 4,
        n_epochs=6,
        batch_size=2,
        checkpoint_every_steps=4,
    )
    settings_json = trainer_services.settings.model_dump_json()
    first = TrainerActor.remote(
        settings_json, trainer_services.database_url, "actor-1", str(tmp_path / "a1")
    )
    first.run.remote(max_jobs=1, idle_wait=0.2)
    deadline = time.monotonic() + 240
    while True:
        with trainer_services.engine.connect() as conn:
            checkpoint = jobs.latest_checkpoint(conn, job_id)
        if checkpoint is not None:
            break
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    # One loop per actor: a second `run` while the first trains is refused, not run beside it.
    with pytest.raises(ray.exceptions.RayTaskError, match="already running its loop"):
        ray.get(first.run.remote(max_jobs=1, idle_wait=0.2), timeout=60)
    stats = ray.get(first.stats.remote())
    # Ray starts an actor with one thread per reserved CPU; the trainer uses every CPU.
    assert stats["torch_threads"] == len(os.sched_getaffinity(0))
    pid = stats["pid"]
    os.kill(pid, 9)  # the process dies mid-job: no clean-up, no lease release
    time.sleep(trainer_services.settings.lease_seconds + 1)
    second = TrainerActor.remote(
        settings_json, trainer_services.database_url, "actor-2", str(tmp_path / "a2")
    )
    assert ray.get(second.run.remote(max_jobs=1, idle_wait=0.2), timeout=300) == 1
    job = job_row(trainer_services, job_id)
    assert (
        job.status == "succeeded" and job.attempt == 1 and job.interruptions == 1
    )  # the platform lost it
    resumed = [m for m in messages(trainer_services, job_id) if m.startswith("resumed from step")]
    assert resumed and int(resumed[0].split()[3]) >= checkpoint.step > 0
    with trainer_services.engine.connect() as conn:
        versions = conn.execute(
            text("SELECT count(*) FROM adapter_versions WHERE job_id = :j"), {"j": job_id}
        ).scalar()
    assert versions == 1
    ray.kill(second)


@pytest.mark.ray
def test_multi_worker_job_the_cluster_cannot_place_is_refused_not_left_waiting(
    ray_cluster: None, trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A job asking for more Ray Train workers than the cluster has fails with the reason; one
    the cluster could place but not now (an actor holds its CPUs) is retried later. Neither
    waits without end for resources."""
    import ray

    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    too_big = submit(trainer_services, world, num_gpus=3)  # 3 workers x 1 CPU on 2 CPUs
    assert run_one(runner) == "failed"
    failed = job_row(trainer_services, too_big)
    assert failed.error_code == "training_error"
    assert "asks for 3 Ray Train workers (3 CPU); the Ray cluster has 2 CPU in all" in (
        failed.error_message or ""
    )

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()  # what a resident trainer actor holds
    ray.get(holder.ready.remote())
    busy = submit(trainer_services, world, num_gpus=2)
    assert run_one(runner) == "queued"  # given back for a later attempt, with the reason
    row = job_row(trainer_services, busy)
    assert row.error_code == "insufficient_resources" and row.attempt == 1
    assert "1 of the cluster's 2 CPU are free now" in (row.error_message or "")
    ray.kill(holder)


@pytest.mark.ray
def test_multi_worker_job_trains_over_ray_train_like_one_process(
    ray_cluster: None, trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """`num_gpus: 2` on CPU: two Ray Train workers with gloo make the single-process update.

    In float32 on any machine: in bf16 the two ranks' packed rows (other shapes, other roundings)
    move near-zero weights apart by more than the comparison allows, which is not what it tests.
    """
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    fp32 = {"n_epochs": 2, "checkpoint_every_steps": 4, "precision": "fp32"}
    single = submit(trainer_services, world, **fp32)
    assert run_one(runner) == "succeeded"
    pair = submit(trainer_services, world, **fp32, num_gpus=2)
    assert run_one(runner) == "succeeded", job_row(trainer_services, pair).error_message
    said = messages(trainer_services, pair)
    assert "Training on 2 Ray Train workers" in said
    losses = [m["train_loss"] for m in metric_events(trainer_services, pair) if "train_loss" in m]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    with trainer_services.engine.connect() as conn:
        one = registry.resolve_version(conn, world["tenant"], "sums", "1")
        two = registry.resolve_version(conn, world["tenant"], "sums", "2")
        steps = [c.step for c in jobs.list_checkpoints(conn, pair)[0]]
    assert (one.job_id, two.job_id) == (single, pair)
    assert steps and 4 in steps  # rank 0 wrote checkpoints to the store, listed by the API
    assert two.lineage["metrics"]["steps"] == one.lineage["metrics"]["steps"]
    a, b = version_weights(trainer_services, one), version_weights(trainer_services, two)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=0.05, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpu_job_trains_over_ray_train_with_nccl(
    ray_cluster: None, trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    job_id = submit(trainer_services, world, n_epochs=2, num_gpus=2)
    assert run_one(runner) == "succeeded", job_row(trainer_services, job_id).error_message
    assert "Training on 2 Ray Train workers" in messages(trainer_services, job_id)
    assert any(m.get("device") == "cuda" for m in map(dict, _event_data(trainer_services, job_id)))


def _event_data(services: Services, job_id: str) -> list[dict[str, Any]]:
    with services.engine.connect() as conn:
        return [e.data or {} for e in list_events(conn, job_id, limit=10_000, newest_first=False)]
