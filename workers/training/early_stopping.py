"""Early stopping: end a job whose evaluations stopped improving, and keep its best weights.

A job that sets `early_stopping_patience` (and evaluates during training: `eval_every_steps`
and an eval set) stops once that many evaluations in a row have not lowered the lowest eval
loss by more than `early_stopping_threshold`, and its adapter holds the weights of its lowest
evaluation, not its last step: on a shared platform an overfitting job gives its trainer back
early and publishes the adapter that generalised best. The rule is Hugging Face Trainer's
(`EarlyStoppingCallback` with `load_best_model_at_end`): an evaluation lower than the best is
the new best whatever the threshold; only one lower by more than the threshold resets the count.

The best weights are a CPU copy of the adapter's trainable tensors (megabytes), taken at each
new best. A checkpoint keeps them beside its own weights, and the counts in its state, so a
resumed job stops where the uninterrupted one would and publishes the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from control_plane.hyperparameters import Hyperparameters
from workers.training.interface import TrainingError

# The best evaluation's weights in a checkpoint directory, when they are not its own.
BEST_WEIGHTS = "best_weights.safetensors"
# (step, lowest eval loss so far) -> why the job trails its sweep (message, data), or None.
Compare = Callable[[int, float], "tuple[str, dict[str, Any]] | None"]


@dataclass
class EarlyStopping:
    """The lowest evaluation so far, its step and weights, and the evaluations since the last
    improvement by more than `threshold` (none stop the job with `patience` 0); with
    `median_from` N, from the Nth evaluation on, its sweep's median is asked too
    (`control_plane.sweep_stopping`)."""

    patience: int
    threshold: float
    median_from: int = 0
    best_loss: float | None = None
    best_step: int | None = None
    stale: int = 0
    evaluations: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    stopped_by: str | None = None  # the hyperparameter whose rule stopped the job

    @classmethod
    def of(cls, hp: Hyperparameters) -> EarlyStopping | None:
        if not (hp.early_stopping_patience or hp.sweep_median_stopping):
            return None
        return cls(
            hp.early_stopping_patience, hp.early_stopping_threshold, hp.sweep_median_stopping
        )

    def observe(self, step: int, loss: float, model: nn.Module) -> bool:
        """Record the evaluation of `step`; True when the job should stop now."""
        if self.best_loss is None or loss < self.best_loss:
            improved = self.best_loss is None or self.best_loss - loss > self.threshold
            self.best_loss, self.best_step = loss, step
            self.best_weights = _trainable_copy(model)
            self.stale = 0 if improved else self.stale + 1
        else:
            self.stale += 1
        self.evaluations += 1
        return self.patience > 0 and self.stale >= self.patience

    def verdict(
        self, step: int, loss: float, model: nn.Module, median: Compare
    ) -> tuple[str, dict[str, Any]] | None:
        """Record the evaluation of `step`: the event that says why the job stops now (by its
        patience, else by its sweep's `median`), or None."""
        if self.observe(step, loss, model):
            self.stopped_by = "early_stopping_patience"
            return self.reason(step)
        if not self.median_from or self.evaluations < self.median_from:
            return None
        assert self.best_loss is not None
        said = median(step, self.best_loss)
        if said is None:
            return None
        self.stopped_by = "sweep_median_stopping"
        message, data = said
        return message, {**self._stop_data(step), **data}

    def _stop_data(self, step: int) -> dict[str, Any]:
        return {
            "early_stopped": True,
            "stopped_by": self.stopped_by,
            "step": step,
            "best_step": self.best_step,
        }

    def reason(self, step: int) -> tuple[str, dict[str, Any]]:
        """The event that says why the job stopped at `step`."""
        return (
            f"early stopping at step {step}: {self.stale} evaluation(s) in a row without an eval "
            f"loss below {self.best_loss:.4f} (step {self.best_step}) by more than "
            f"{self.threshold:g}",
            self._stop_data(step),
        )

    def kept(self) -> tuple[str, dict[str, Any]]:
        """The event that says which evaluation's weights the adapter holds."""
        return (
            f"the adapter holds the weights of step {self.best_step}, whose eval loss "
            f"{self.best_loss:.4f} is the job's lowest",
            {"weights_from_step": self.best_step, "best_eval_loss": self.best_loss},
        )

    def restore_best(self, model: nn.Module, step: int) -> int:
        """Put the best evaluation's weights back into `model` (now at `step`); returns the
        step whose weights the model holds."""
        if self.best_weights is None or self.best_step is None or self.best_step == step:
            return step
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if trainable.keys() != self.best_weights.keys():
            raise TrainingError("the lowest evaluation's weights do not fit the adapter trained")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(self.best_weights[name].to(param.device, param.dtype))
        return self.best_step

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self, step: int) -> dict[str, Any]:
        return {
            "early_stopping": {
                "best_loss": self.best_loss,
                "best_step": self.best_step,
                "stale": self.stale,
                "evaluations": self.evaluations,
                "best_is_this_step": self.best_step == step,
            }
        }

    def files(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """The best weights to keep beside a checkpoint of `step`, unless they are its own."""
        if self.best_weights is None or self.best_step == step:
            return {}
        return {BEST_WEIGHTS: self.best_weights}

    def load(self, state: dict[str, Any], directory: Path, model: nn.Module) -> None:
        """Take up the counts and the best weights a checkpoint (of `directory`) kept."""
        saved = state.get("early_stopping")
        if not saved or saved["best_step"] is None:
            return
        self.best_loss, self.best_step, self.stale = (
            saved["best_loss"],
            int(saved["best_step"]),
            int(saved["stale"]),
        )
        self.evaluations = int(saved.get("evaluations", 0))
        if saved["best_is_this_step"]:  # the checkpoint's own weights, already loaded
            self.best_weights = _trainable_copy(model)
        elif (directory / BEST_WEIGHTS).is_file():
            self.best_weights = load_file(directory / BEST_WEIGHTS, device="cpu")
        else:
            raise TrainingError(
                f"{directory} keeps no {BEST_WEIGHTS} for its lowest evaluation (step "
                f"{self.best_step}): it cannot resume a job that stops early"
            )


def _trainable_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: param.detach().to("cpu", copy=True)
        for name, param in model.named_parameters()
        if param.requires_grad
    }
