"""Early stopping in the training recipe, on the shipped tiny Llama (real transformers + peft).

Trained on one word and evaluated on another, at a high learning rate, the eval loss falls for
a step or two and then rises: the job must stop `patience` evaluations after its lowest, and
its adapter must hold the weights of that evaluation, also when it resumed from a checkpoint
in between. The base is loaded in fp32 so that every CPU draws the same curve.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from control_plane import registry
from control_plane.hyperparameters import Hyperparameters
from control_plane.services import build_services
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.integration.test_recipe import Recorder, Run, adapter_tensors, assert_same_adapter
from tests.integration.test_trainer import (
    job_row,
    make_world,
    messages,
    metric_events,
    run_one,
    submit,
    trainer_settings,
)
from tests.unit.test_early_stopping import reference
from workers.runner import JobRunner
from workers.training.early_stopping import BEST_WEIGHTS
from workers.training.recipe import ResidentBase, TrainingError, train_adapter

TRAIN = [{"text": "red " * 30}] * 8
EVAL = [{"text": "blue " * 30}] * 4
HP = Hyperparameters(
    n_epochs=5,
    batch_size=2,
    learning_rate_multiplier=50,
    lora_rank=8,
    max_seq_length=64,
    warmup_ratio=0.0,
    eval_every_steps=1,
    early_stopping_patience=3,
    checkpoint_every_steps=1,
    precision="fp32",
)  # 8 examples: 4 steps per epoch, 20 steps, an evaluation after each


@pytest.fixture(scope="module")
def base() -> Iterator[ResidentBase]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ResidentBase.load(TEST_BASE_PATH, precision="fp32")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stopped(base: ResidentBase, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("early")
    recorder = Recorder(root)
    result = train_adapter(base, TRAIN, EVAL, HP, recorder.hooks(), root / "job")
    return Run(result, recorder)


def eval_losses(run: Run) -> list[float]:
    return [m["eval_loss"] for m in run.recorder.metrics("eval_loss")]


def in_bf16(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in adapter_tensors(checkpoint).items()}


def test_a_job_stops_after_its_patience_and_publishes_its_lowest_evaluation(stopped: Run):
    result, recorder = stopped.result, stopped.recorder
    losses = eval_losses(stopped)
    stop_at, best_at = reference(losses, HP.early_stopping_patience, 0.0)
    # The scene: the curve turns up early, so the job stops well before its 20 steps and the
    # evaluation it keeps is not its last.
    assert stop_at is not None and stop_at == len(losses) - 1
    assert result.early_stopped and not result.stopped
    assert result.global_step == stop_at + 1 < result.total_steps == 20
    assert result.weights_step == best_at + 1 < result.global_step
    assert result.final_eval_loss == min(losses)
    # It trained no step past the stop, and said why it stopped and what it kept.
    assert [m["step"] for m in recorder.metrics("train_loss")] == list(range(1, stop_at + 2))
    logs = {m: d for kind, m, d in recorder.events if kind == "log"}
    said = [d for d in logs.values() if d.get("early_stopped")]
    assert said == [
        {
            "early_stopped": True,
            "stopped_by": "early_stopping_patience",
            "step": stop_at + 1,
            "best_step": best_at + 1,
        }
    ]
    assert result.stopped_by == "early_stopping_patience"
    kept = [d for d in logs.values() if "weights_from_step" in d]
    assert kept == [{"weights_from_step": best_at + 1, "best_eval_loss": min(losses)}]
    # The adapter is the lowest evaluation's weights (the checkpoint of that step, in bf16),
    # and no other step's.
    assert result.adapter_dir is not None
    published = adapter_tensors(result.adapter_dir)
    assert sorted(recorder.checkpoints) == list(range(1, stop_at + 1))  # none at the stop
    for step, checkpoint in recorder.checkpoints.items():
        same = [torch.equal(published[k], t) for k, t in in_bf16(checkpoint).items()]
        assert len(same) == len(published) and all(same) == (step == best_at + 1), step


@pytest.mark.parametrize("after", ["best", "between"])
def test_a_job_resumed_between_its_best_and_its_stop_stops_and_publishes_the_same(
    base: ResidentBase, stopped: Run, tmp_path: Path, after: str
):
    """Resumed from the checkpoint of its lowest evaluation (whose weights are its own), or
    from one after it (which keeps the lowest's weights beside its own)."""
    best_step = stopped.result.weights_step
    assert best_step is not None and best_step + 1 < stopped.result.global_step
    step = best_step if after == "best" else best_step + 1
    checkpoint = stopped.recorder.checkpoints[step]
    assert (checkpoint / BEST_WEIGHTS).exists() == (after == "between")
    recorder = Recorder(tmp_path)
    resumed = train_adapter(
        base, TRAIN, EVAL, HP, recorder.hooks(), tmp_path / "job", resume_dir=checkpoint
    )
    assert (resumed.global_step, resumed.weights_step) == (
        stopped.result.global_step,
        stopped.result.weights_step,
    )
    assert resumed.final_eval_loss == stopped.result.final_eval_loss
    assert resumed.adapter_dir is not None and stopped.result.adapter_dir is not None
    assert_same_adapter(resumed.adapter_dir, stopped.result.adapter_dir)


def test_a_job_whose_eval_loss_keeps_falling_trains_every_step(base: ResidentBase, tmp_path):
    """Trained and evaluated on the same text, the eval loss falls at every evaluation: early
    stopping changes nothing, and the adapter holds the last step's weights."""
    hp = HP.model_copy(update={"learning_rate_multiplier": 10, "n_epochs": 2})
    recorder = Recorder(tmp_path)
    result = train_adapter(base, TRAIN, TRAIN[:4], hp, recorder.hooks(), tmp_path / "job")
    losses = [m["eval_loss"] for m in recorder.metrics("eval_loss")]
    assert losses == sorted(losses, reverse=True) and len(losses) == 8
    assert result.global_step == result.total_steps == 8
    assert result.weights_step is None and not result.early_stopped
    assert result.final_eval_loss == losses[-1]


def test_early_stopping_without_an_eval_set_is_refused(base: ResidentBase, tmp_path):
    with pytest.raises(TrainingError, match=r"early stopping .* needs an eval set"):
        train_adapter(base, TRAIN, None, HP, Recorder(tmp_path).hooks(), tmp_path / "job")


def test_a_trainer_publishes_an_early_stopped_job_with_what_it_kept(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Through the queue and a trainer: the job succeeds at its stop, its trained tokens are
    the steps it trained, and its version's metrics say which step's weights it holds."""
    trainer_services = build_services(trainer_settings(tmp_path), database_url=database_url)
    request.addfinalizer(trainer_services.close)
    world = make_world(trainer_services)
    overrides = HP.model_dump(exclude={"checkpoint_every_steps"})
    job_id = submit(trainer_services, world, records=TRAIN, validation=EVAL, **overrides)
    runner = JobRunner(trainer_services, "w1", work_dir=tmp_path / "w1")
    assert run_one(runner) == "succeeded"
    metrics = metric_events(trainer_services, job_id)
    losses = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    steps = [m for m in metrics if "train_loss" in m]
    stop_at, best_at = reference(losses, HP.early_stopping_patience, 0.0)
    assert stop_at is not None and len(steps) == stop_at + 1 < steps[-1]["total_steps"]
    job = job_row(trainer_services, job_id)
    assert job.trained_tokens == sum(m["tokens"] for m in steps)
    said = messages(trainer_services, job_id)
    assert any(m.startswith(f"early stopping at step {stop_at + 1}:") for m in said)
    assert f"the adapter holds the weights of step {best_at + 1}" in " ".join(said)
    with trainer_services.engine.connect() as conn:
        version = registry.version_for_job(conn, job_id)
    assert version is not None and version.metrics["early_stopped"] is True
    assert version.metrics["steps"] == stop_at + 1
    assert version.metrics["weights_from_step"] == best_at + 1
    assert version.metrics["final_eval_loss"] == min(losses)
    assert version.lineage["hyperparameters"]["early_stopping_patience"] == 3


def _rank_main(rank: int, world_size: int, port: int, output_dir: str) -> None:
    """One rank of a gloo group training the early-stopping job; writes what it returned."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        base = ResidentBase.load(TEST_BASE_PATH, precision="fp32")
        hp = HP.model_copy(update={"num_gpus": world_size})
        out = Path(output_dir) / f"rank{rank}"
        result = train_adapter(base, TRAIN, EVAL, hp, Recorder(out).hooks(), out / "job")
        said = {
            "global_step": result.global_step,
            "weights_step": result.weights_step,
            "adapter": result.adapter_dir is not None,
        }
        out.mkdir(parents=True, exist_ok=True)  # rank 1 writes nothing of its own
        (out / "result.json").write_text(json.dumps(said))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_of_a_data_parallel_job_stops_where_one_process_does(
    stopped: Run, tmp_path: Path
):
    """Rank 0 evaluates and decides; the other rank leaves the loop at the same step (a rank
    that went on would hang in the next step's all-reduce) and writes nothing."""
    import json
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}" / "result.json").read_text()) for r in (0, 1)]
    assert ranks == [
        {
            "global_step": stopped.result.global_step,
            "weights_step": stopped.result.weights_step,
            "adapter": True,
        },
        {"global_step": stopped.result.global_step, "weights_step": None, "adapter": False},
    ]
