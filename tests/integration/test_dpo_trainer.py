"""A DPO job end to end: queued with a preference file, claimed by a real trainer on the shipped
tiny Llama, trained, and published as a version whose lineage says how it was trained."""

from __future__ import annotations

from pathlib import Path

from control_plane import registry
from control_plane.services import Services
from tests.integration import test_trainer
from tests.integration.test_dpo_recipe import PAIRS
from tests.integration.test_trainer import job_row, metric_events, run_one, submit
from workers.runner import JobRunner

# The trainer tests' fixtures: services with a short lease, a tenant and the tiny base.
trainer_services = test_trainer.trainer_services
world = test_trainer.world


def test_a_dpo_job_trains_on_its_pairs_and_publishes_a_version_that_says_so(
    trainer_services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    job_id = submit(trainer_services, world, records=PAIRS, method="dpo", dpo_beta=0.5, n_epochs=3)
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    assert run_one(runner) == "succeeded"
    job = job_row(trainer_services, job_id)
    assert job.status == "succeeded" and job.fine_tuned_model
    steps = [m for m in metric_events(trainer_services, job_id) if "train_loss" in m]
    assert abs(steps[0]["rewards_margin"]) < 1e-3  # the policy starts as its reference
    assert steps[-1]["rewards_accuracy"] == 1.0 and steps[-1]["train_loss"] < steps[0]["train_loss"]
    # Both replies of every pair are the tokens it trained on.
    assert job.trained_tokens == sum(m["tokens"] for m in steps)
    with trainer_services.engine.connect() as conn:
        version = registry.resolve_version(conn, world["tenant"], "sums", "latest")
    assert version.job_id == job_id
    hyperparameters = version.lineage["hyperparameters"]
    assert (hyperparameters["method"], hyperparameters["dpo_beta"]) == ("dpo", 0.5)
