"""What a training run and its caller exchange: hooks in, a result out, a refusal with a reason.

The recipe knows nothing of queues, leases or object stores; whoever runs it (a trainer's job
runner, rank 0 of a Ray Train job, the demo, a benchmark) passes `TrainHooks` and reads the
`TrainResult`. A `TrainingError` means the job cannot train as specified: another attempt would
fail the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TrainingError(Exception):
    """The job cannot train as specified (data, hyperparameters); the message says why."""


def _no_event(kind: str, message: str, data: dict[str, Any]) -> None:
    del kind, message, data


def _never() -> bool:
    return False


def _no_checkpoint(step: int, directory: Path) -> None:
    del step, directory


def _no_sweep(step: int, lowest: float) -> tuple[str, dict[str, Any]] | None:
    del step, lowest
    return None


@dataclass
class TrainHooks:
    """How a job talks to its caller: events out, a stop signal in, checkpoints out."""

    on_event: Callable[[str, str, dict[str, Any]], None] = _no_event
    should_stop: Callable[[], bool] = _never
    on_checkpoint: Callable[[int, Path], None] = _no_checkpoint
    # Asked when the loop stops early: whether to write a checkpoint of the step reached first
    # (a worker shutting down hands its job back; a cancelled job needs none).
    checkpoint_on_stop: Callable[[], bool] = _never
    # Asked at an evaluation of a job with `sweep_median_stopping` (its step, its lowest eval
    # loss so far): why it trails the other jobs of its sweep (its event), or None to go on.
    trails_its_sweep: Callable[[int, float], tuple[str, dict[str, Any]] | None] = _no_sweep


@dataclass(frozen=True)
class TrainResult:
    """What a job produced; `adapter_dir` is None when it was stopped before the end."""

    adapter_dir: Path | None
    global_step: int
    total_steps: int
    final_train_loss: float | None
    final_eval_loss: float | None
    trained_tokens: int
    stopped: bool
    precision: str
    base_sha256: str | None = None
    # With early stopping: the step whose weights the adapter holds when not the last (its
    # eval loss is then `final_eval_loss`), and whether the job stopped before its last step.
    weights_step: int | None = None
    early_stopped: bool = False
    stopped_by: str | None = None  # the hyperparameter whose rule stopped it early
