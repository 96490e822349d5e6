"""The LoRA training recipe: one frozen resident base, a fresh adapter per job, nothing else kept.

Shape (torchtune style): `train_adapter` builds a `LoraRecipe`, then `setup` (data, adapter,
optimizer, resume), `train` (the loop), `save_checkpoint` / `save_adapter`, and always `cleanup`,
which removes the adapter so that the base is bit-identical and free of adapter modules for the
next job. Plain transformers + peft + torch, no Hugging Face Trainer, because a worker keeps one
base resident across many jobs and the Trainer owns its model.

The recipe composes parts that live beside it in `workers.training`: the device and its precision
(`device`), the resident base (`resident`), the adapter's config, attachment and files (`lora`),
the data and its order (`data`), the update rule (`optimizer`), checkpoints (`checkpointing`),
data parallelism (`ranks`), and the interface to its caller (`interface`).

Where the time and memory go, and what the recipe does about it:

- Padding: the examples of a micro-batch are packed into one row and attention runs within each
  example (`workers.kernels.packing`), so no FLOP is spent on pad tokens or across example boundaries.
- Logits: a 49k-word vocabulary makes `batch x seq x vocab` logits the largest tensor of a step.
  The backbone runs to hidden states, only positions with a label go through `lm_head`, in chunks,
  and the loss gradient is computed in the same pass (`LinearCrossEntropy`): no logits survive a
  chunk and `lm_head` runs once per trained token instead of three times.
- LoRA layers: plain LoRA layers run as one autograd node each (`workers.kernels.fused_lora`): the scaled
  low-rank update accumulates into the base output instead of being a second output-sized
  tensor that is scaled and added (and the same in the backward). Llama-style RMSNorms run as
  one node each too (`workers.kernels.fused_norm`), and AdamW as one fused kernel.
- Precision: the frozen base stays in bf16 (never an fp32 copy) where the hardware has bf16; the
  LoRA weights and AdamW state are fp32, and their matmuls run in bf16 under autocast.

Reproducibility: the data order of an epoch is seeded by (seed, epoch) and the torch RNG by
(seed, step) before every optimizer step, so a resumed run replays the uninterrupted one's steps.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from control_plane.hyperparameters import Hyperparameters
from workers.kernels.packing import rows_of_tokens
from workers.training.checkpointing import data_sha256, read_checkpoint, staged, write_checkpoint
from workers.training.data import (
    dataset_summary,
    epoch_order,
    hash_seed,
    job_datasets,
    split_evenly,
)
from workers.training.device import Precision, peak_memory_mib, precision_event
from workers.training.early_stopping import EarlyStopping
from workers.training.interface import TrainHooks, TrainingError, TrainResult
from workers.training.lora import attached_adapter, load_initial_adapter, lora_config, write_adapter
from workers.training.optimizer import MAX_GRAD_NORM, adamw, lr_schedule
from workers.training.preference import PreferenceObjective, examples_of, job_pairs
from workers.training.progress import Progress
from workers.training.ranks import all_reduce_gradients, process_group_rank, rank_zero_decides
from workers.training.resident import ResidentBase
from workers.training.supervised import NextTokenObjective

# What a caller of the recipe needs, in one import.
__all__ = [
    "LoraRecipe",
    "ResidentBase",
    "TrainHooks",
    "TrainResult",
    "TrainingError",
    "train_adapter",
]

# Most tokens per packed row in training: a step's (micro-)batch runs as rows of at most this
# many tokens, one forward/backward each, so the activations kept for a backward are bounded by
# this, not by the longest batch; the step's update is the same.
TRAIN_ROW_TOKENS = 1024


def train_adapter(
    base: ResidentBase,
    train_records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]] | None,
    hp: Hyperparameters,
    hooks: TrainHooks,
    output_dir: Path,
    resume_dir: Path | None = None,
    init_dir: Path | None = None,
) -> TrainResult:
    """Train a LoRA adapter on the resident base; the base is left exactly as it was.

    The adapter starts fresh, or from the PEFT adapter in `init_dir` (a job that continues from
    a published version); a `resume_dir` checkpoint of this same job wins over both.

    One process trains a job with `num_gpus` 1. A data-parallel job (`num_gpus` N > 1) calls
    this on every rank of an initialised `torch.distributed` group of N (gloo on CPU, nccl on
    GPU; e.g. from the `train_loop_per_worker` of Ray Train's `TorchTrainer`), with the same
    records, hyperparameters and resume checkpoint everywhere. Each step's examples are shared
    out between ranks and the LoRA gradients summed across them, so the update is the one a
    single process would make. Rank 0 alone emits events, polls `should_stop` (its answer is
    broadcast), writes checkpoints and the adapter, and evaluates; the other ranks return a
    result with `adapter_dir=None` and `stopped` as rank 0 decided.
    """
    rank, world_size = process_group_rank(hp)
    recipe = LoraRecipe(base, hp, hooks, Path(output_dir), rank=rank, world_size=world_size)
    try:
        recipe.setup(train_records, eval_records, resume_dir, init_dir)
        return recipe.train()
    finally:
        recipe.cleanup()


class LoraRecipe:
    """One job's training run on a resident base (see the module docstring)."""

    def __init__(
        self,
        base: ResidentBase,
        hp: Hyperparameters,
        hooks: TrainHooks,
        output_dir: Path,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.base, self.hp, self.hooks, self.output_dir = base, hp, hooks, output_dir
        self.rank, self.world_size = rank, world_size
        self.model: PeftModel | None = None
        # The loss: next-token (`supervised`), or a DPO job's (`preference`).
        self.objective: NextTokenObjective | PreferenceObjective | None = None
        self.progress = Progress()
        self.early_stopping = EarlyStopping.of(hp)
        self.weights_step: int | None = None  # set when the adapter holds an earlier step's
        self._previous_checkpoint: Path | None = None
        self._exit_stack = ExitStack()

    # -- setup -------------------------------------------------------------------------------

    def setup(
        self,
        train_records: list[dict[str, Any]],
        eval_records: list[dict[str, Any]] | None,
        resume_dir: Path | None,
        init_dir: Path | None = None,
    ) -> None:
        """Tokenize the data, attach an adapter (fresh or from `init_dir`), build optimizer and
        schedule, maybe resume."""
        hp, base = self.hp, self.base
        self.precision: Precision = base.precision  # or refused, saying why
        self._event("log", *precision_event(hp.precision, base.precision, base.device))
        datasets: Any = job_pairs if hp.method == "dpo" else job_datasets
        self.train_set, self.eval_set = datasets(train_records, eval_records, base.tokenizer, hp)
        self._event("log", *dataset_summary(self.train_set, self.eval_set))
        if self.early_stopping is not None and self.eval_set is None:
            raise TrainingError(
                "early stopping (by patience or by its sweep) needs an eval set, and the job has "
                "none: give it a validation file or an eval_fraction (or its validation "
                "examples were all dropped)"
            )
        self.data_sha256 = data_sha256(examples_of(self.train_set.examples))
        self.steps_per_epoch = math.ceil(len(self.train_set.examples) / hp.batch_size)
        self.total_steps = hp.n_epochs * self.steps_per_epoch

        config = lora_config(hp, base.model)
        torch.manual_seed(hp.seed)  # the adapter's initial A matrices
        adapter = self._exit_stack.enter_context(
            attached_adapter(base.model, config, gradient_checkpointing=hp.gradient_checkpointing)
        )
        self.model = adapter.model
        fused, norms = adapter.fused_lora_layers, adapter.fused_rms_norms
        self.backbone = base.model.get_decoder()
        self.lm_head = base.model.get_output_embeddings()
        if init_dir is not None and resume_dir is None:  # a published adapter's weights
            tensors = load_initial_adapter(self.model, Path(init_dir), base.device)
            self._event(
                "log",
                f"starting from the weights of the adapter to continue from ({tensors} tensors)",
                {"initial_adapter_tensors": tensors},
            )
        parts = (self.backbone, self.lm_head, base.device, self._autocast)
        if hp.method == "dpo":  # its reference: the model as the job starts (resumed: saved)
            self.objective = PreferenceObjective(hp, *parts)
            sets = {"train": self.train_set, "eval": self.eval_set}
            if resume_dir is None:
                self.objective.compute_reference(self.model, {k: v for k, v in sets.items() if v})
        else:
            self.objective = NextTokenObjective(*parts)

        params = [p for p in self.model.parameters() if p.requires_grad]
        self._trainable = params
        self.optimizer = adamw(params, hp, self.base.device)
        self.scheduler = lr_schedule(self.optimizer, hp, self.total_steps)
        self._event(
            "log",
            f"training {sum(p.numel() for p in params):,} LoRA parameters (rank {hp.lora_rank}) "
            f"on {len(self.train_set.examples)} examples, {self.total_steps} steps "
            f"({fused} fused LoRA layers, {norms} fused RMSNorms)",
            {
                "trainable_parameters": sum(p.numel() for p in params),
                "steps": self.total_steps,
                "fused_lora_layers": fused,
                "fused_rms_norms": norms,
            },
        )
        if resume_dir is not None:
            self._resume(Path(resume_dir))

    def _resume(self, resume_dir: Path) -> None:
        """Load adapter, optimizer and schedule state; the loop continues at the saved step."""
        assert self.model is not None
        state = read_checkpoint(
            resume_dir,
            self.model,
            self.base.device,
            base_sha256=self.base.sha256,
            data_sha256=self.data_sha256,
            hp=self.hp,
        )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress.global_step = self.progress.first_step = int(state["global_step"])
        self.progress.trained_tokens = int(state["trained_tokens"])
        self.progress.last_loss = state["last_loss"]
        assert self.objective is not None
        self.objective.load_state(state)
        if self.early_stopping is not None:
            self.early_stopping.load(state, resume_dir, self.model)
        self._event(
            "log",
            f"resumed from step {self.progress.global_step} of {self.total_steps}",
            {"resumed_from_step": self.progress.global_step},
        )

    # -- train -------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run the remaining optimizer steps; stop early when the caller asks."""
        hp, progress = self.hp, self.progress
        progress.started = time.perf_counter()
        eval_loss: float | None = None
        while progress.global_step < self.total_steps:
            epoch, position = divmod(progress.global_step, self.steps_per_epoch)
            batch = self._step_examples(epoch, position)
            if not self._optimizer_step(batch):
                self._event("log", f"stopped at step {progress.global_step}", {})
                advanced = progress.global_step > progress.first_step
                if self.rank == 0 and advanced and self.hooks.checkpoint_on_stop():
                    self.save_checkpoint()
                return self._result(None, eval_loss, stopped=True)
            step = progress.global_step
            if hp.eval_every_steps and step % hp.eval_every_steps == 0 and step < self.total_steps:
                eval_loss = self._evaluate() if self.rank == 0 else None
                if self._stops_early(eval_loss):
                    break
            if self.rank != 0:
                continue  # rank 0 evaluates and writes; the others only train
            end_of_epoch = step % self.steps_per_epoch == 0
            if step % hp.checkpoint_every_steps == 0 or end_of_epoch:
                self.save_checkpoint()
        if self.rank != 0:
            return self._result(None, None, stopped=False)
        if progress.global_step == self.total_steps:  # not stopped early: the last evaluation
            eval_loss = self._evaluate()
            if self.early_stopping is not None and eval_loss is not None:
                self.early_stopping.observe(progress.global_step, eval_loss, self.model)
        return self._result(self.save_adapter(), eval_loss, stopped=False)

    def _stops_early(self, eval_loss: float | None) -> bool:
        """Whether early stopping ends the job at this evaluation (rank 0 decides)."""
        early, step = self.early_stopping, self.progress.global_step
        if early is None:
            return False
        assert self.model is not None
        said = None  # rank 0 alone evaluates, and has a verdict
        if eval_loss is not None:
            said = early.verdict(step, eval_loss, self.model, self.hooks.trails_its_sweep)
        stop = said is not None
        if self.world_size > 1:
            stop = rank_zero_decides(self.rank == 0 and stop, self.base.device)
        if said is not None:
            self._event("log", *said)
        return stop

    def _step_examples(self, epoch: int, position: int) -> list[Any]:
        order = epoch_order(len(self.train_set.examples), self.hp.seed, epoch)
        size = self.hp.batch_size
        return [self.train_set.examples[i] for i in order[position * size : (position + 1) * size]]

    def _optimizer_step(self, batch: Sequence[Any]) -> bool:
        """One optimizer step over `batch`, in gradient-accumulation micro-batches.

        The loss is the mean over every trained token of the step (not a mean of micro-batch
        means), so the gradient does not depend on how the step is split, across micro-batches
        or ranks; a DPO job's is the mean over the step's pairs. Returns False when the caller asked to stop (checked before every micro-batch;
        nothing is applied then).
        """
        assert self.model is not None
        progress, hp = self.progress, self.hp
        started = time.perf_counter()
        torch.manual_seed(hash_seed(hp.seed, progress.global_step))
        assert self.objective is not None
        targets = self.objective.denominator(batch)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.base.device)
        shard = batch[self.rank :: self.world_size]
        for micro in split_evenly(shard, hp.gradient_accumulation_steps):
            if self._stop_requested():
                self.optimizer.zero_grad(set_to_none=True)
                return False
            for row in rows_of_tokens(micro, TRAIN_ROW_TOKENS):
                with self._autocast():
                    loss = self._loss_sum(row)
                (loss / targets).backward()
                loss_sum += loss.detach()
        if self.world_size > 1:
            loss_sum = all_reduce_gradients(self._trainable, loss_sum)
        nn.utils.clip_grad_norm_(self._trainable, MAX_GRAD_NORM)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        message, metrics = progress.advance(
            sum(len(e) for e in batch),
            loss_sum.item() / targets,
            elapsed=time.perf_counter() - started,
            total_steps=self.total_steps,
            steps_per_epoch=self.steps_per_epoch,
        )
        metrics.update(learning_rate=learning_rate, **self.objective.step_metrics())
        metrics["peak_memory_mib"] = peak_memory_mib(self.base.device)
        self._event("metrics", message, metrics)
        return True

    def _loss_sum(self, row: Sequence[Any]) -> torch.Tensor:
        """The summed loss of a row of the step (the objective's)."""
        assert self.objective is not None
        return self.objective.loss_sum(row)

    def _evaluate(self) -> float | None:
        """The objective's loss over the eval set; emits a metrics event."""
        if self.eval_set is None:
            return None
        assert self.model is not None and self.objective is not None
        self.model.eval()
        loss, extra = self.objective.evaluate(self.eval_set)
        self.model.train()
        step = self.progress.global_step
        self._event(
            "metrics",
            f"step {step} eval loss {loss:.4f}",
            {"step": step, "eval_loss": loss, **extra},
        )
        return loss

    def _stop_requested(self) -> bool:
        """The caller's stop signal; across ranks, rank 0's answer."""
        if self.world_size == 1:
            return self.hooks.should_stop()
        return rank_zero_decides(self.rank == 0 and self.hooks.should_stop(), self.base.device)

    def _autocast(self) -> Any:
        if self.precision != "bf16":
            return nullcontext()
        return torch.autocast(self.base.device.type, dtype=torch.bfloat16)

    # -- save ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write adapter (training precision) + optimizer, schedule and data-order state.

        The caller's `on_checkpoint` uploads it; the previous local checkpoint is then removed.
        """
        step = self.progress.global_step
        directory = self.output_dir / "checkpoints" / f"step-{step:07d}"
        assert self.model is not None
        epoch, position = divmod(step, self.steps_per_epoch)
        state = {
            "global_step": step,
            "trained_tokens": self.progress.trained_tokens,
            "last_loss": self.progress.last_loss,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_order": {"seed": self.hp.seed, "epoch": epoch, "position": position},
            # Nothing to restore: the torch RNG is reseeded from (seed, step) every step.
            "rng": "reseeded from (seed, step) before every optimizer step",
            "base_sha256": self.base.sha256,
            "data_sha256": self.data_sha256,
            "hyperparameters": self.hp.model_dump(mode="json"),
            **(self.objective.state() if self.objective else {}),
            **(self.early_stopping.state(step) if self.early_stopping else {}),
        }
        best = self.early_stopping.files(step) if self.early_stopping else None
        write_checkpoint(directory, self.model, self.base.path, state, best)
        self._event("log", f"checkpoint at step {step}", {"step": step, "checkpoint": True})
        self.hooks.on_checkpoint(step, directory)
        if self._previous_checkpoint is not None and self._previous_checkpoint != directory:
            shutil.rmtree(self._previous_checkpoint, ignore_errors=True)
        self._previous_checkpoint = directory
        return directory

    def save_adapter(self) -> Path:
        """Write the final adapter as a PEFT directory with bf16 weights: the last step's, or
        with early stopping, the lowest evaluation's."""
        assert self.model is not None
        step, early = self.progress.global_step, self.early_stopping
        if early is not None and early.restore_best(self.model, step) != step:
            self.weights_step = early.best_step
            self._event("log", *early.kept())
        directory = self.output_dir / "adapter"
        with staged(directory) as staging:
            write_adapter(self.model, staging, self.base.path, dtype=torch.bfloat16)
        return directory

    # -- cleanup -------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove the adapter and every training switch: the base returns to its loaded state."""
        self._exit_stack.close()
        self.model = None
        self.objective = None  # its buffers go with the job

    # -- helpers -------------------------------------------------------------------------------

    def _result(
        self, adapter_dir: Path | None, eval_loss: float | None, stopped: bool
    ) -> TrainResult:
        if self.early_stopping is not None and self.weights_step is not None:
            eval_loss = self.early_stopping.best_loss  # the published weights' own
        return TrainResult(
            adapter_dir=adapter_dir,
            global_step=self.progress.global_step,
            total_steps=self.total_steps,
            final_train_loss=self.progress.last_loss,
            final_eval_loss=eval_loss,
            trained_tokens=self.progress.trained_tokens,
            stopped=stopped,
            weights_step=self.weights_step,
            early_stopped=not stopped and self.progress.global_step < self.total_steps,
            stopped_by=self.early_stopping.stopped_by if self.early_stopping else None,
            precision=self.precision,
            base_sha256=self.base.sha256,
        )

    def _event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        if self.rank == 0:
            self.hooks.on_event(kind, message, data)
