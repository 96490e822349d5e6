"""The LoRA training recipe: one frozen resident base, a fresh adapter per job, nothing else kept.

Shape (torchtune style): `train_adapter` builds a `LoraRecipe`, then `setup` (data, adapter,
optimizer, resume), `train` (the loop), `save_checkpoint` / `save_adapter`, and always `cleanup`,
which removes the adapter so that the base is bit-identical and free of adapter modules for the
next job. Plain transformers + peft + torch, no Hugging Face Trainer, because a worker keeps one
base resident across many jobs and the Trainer owns its model.

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

Reproducibility: the data order of an epoch is a permutation seeded by (seed, epoch) and the
torch RNG is reseeded by (seed, step) before every optimizer step (LoRA dropout), so a run resumed
from a checkpoint replays exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import shutil
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from control_plane.hyperparameters import Hyperparameters
from workers.bases.checkpoints import weights_sha256
from workers.kernels.fused_lora import fused_lora_layers
from workers.kernels.fused_norm import fused_rms_norms
from workers.kernels.packing import (
    PACKED_ATTENTION,
    LinearCrossEntropy,
    LogitsWorkspace,
    pack,
    packed_hidden_states,
    rows_of_tokens,
)
from workers.training.formatting import (
    DatasetFormatError,
    TokenizedDataset,
    TokenizedExample,
    tokenize_records,
)

Precision = Literal["bf16", "fp32"]
ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TRAINER_STATE = "trainer_state.pt"
MAX_GRAD_NORM = 1.0
# Tokens per packed row at evaluation time.
EVAL_ROW_TOKENS = 8192
# Most tokens per packed row in training: a step's (micro-)batch runs as rows of at most this
# many tokens, one forward/backward each, so the activations kept for a backward are bounded by
# this, not by the longest batch; the step's update is the same.
TRAIN_ROW_TOKENS = 1024
# Hyperparameters that may change between a checkpoint and its resumption.
_RESUMABLE_CHANGES = {"checkpoint_every_steps", "eval_every_steps", "num_gpus"}


class TrainingError(Exception):
    """The job cannot train as specified (data, hyperparameters); the message says why."""


# --------------------------------------------------------------------------------------------
# Precision and the resident base
# --------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    """The device a worker trains on: its GPU when it has one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (CUDA with bf16, or a CPU with oneDNN bf16 support)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    checker = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if checker is not None and not checker():
        return False
    try:
        probe = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool(torch.isfinite(probe @ probe).all())
    except RuntimeError:
        return False


def resolve_precision(
    requested: Literal["auto", "bf16", "fp32"], device: torch.device | None = None
) -> Precision:
    """`auto` becomes bf16 where the hardware has it, else fp32; explicit choices are checked."""
    device = device or default_device()
    if requested == "fp32":
        return "fp32"
    supported = bf16_supported(device)
    if requested == "bf16" and not supported:
        raise TrainingError(f"precision bf16 was requested but {device.type} has no bf16 support")
    return "bf16" if supported else "fp32"


class ResidentBase:
    """One frozen base model (and its tokenizer) kept in memory across jobs."""

    load_count: ClassVar[int] = 0

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        path: Path,
        sha256: str,
        precision: Precision,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.sha256 = sha256
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    @classmethod
    def load(cls, path: Path, precision: Literal["auto", "bf16", "fp32"] = "auto") -> ResidentBase:
        """Load a checkpoint dir once, frozen, in the resolved precision, on the worker device."""
        path = Path(path)
        device = default_device()
        resolved = resolve_precision(precision, device)
        dtype = torch.bfloat16 if resolved == "bf16" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        model.to(device)
        model.requires_grad_(False)
        model.eval()
        cls.load_count += 1
        return cls(model, tokenizer, path, weights_sha256(path), resolved)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_fingerprint(self) -> str:
        """sha256 over names, dtypes, shapes and bytes of every parameter and buffer in memory."""
        digest = hashlib.sha256()
        tensors = [*self.model.named_parameters(), *self.model.named_buffers()]
        for name, tensor in sorted(tensors, key=lambda item: item[0]):
            data = tensor.detach().contiguous().cpu()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The job's interface
# --------------------------------------------------------------------------------------------


def _no_event(kind: str, message: str, data: dict[str, Any]) -> None:
    del kind, message, data


def _never() -> bool:
    return False


def _no_checkpoint(step: int, directory: Path) -> None:
    del step, directory


@dataclass
class TrainHooks:
    """How a job talks to its caller: events out, a stop signal in, checkpoints out."""

    on_event: Callable[[str, str, dict[str, Any]], None] = _no_event
    should_stop: Callable[[], bool] = _never
    on_checkpoint: Callable[[int, Path], None] = _no_checkpoint
    # Asked when the loop stops early: whether to write a checkpoint of the step reached first
    # (a worker shutting down hands its job back; a cancelled job needs none).
    checkpoint_on_stop: Callable[[], bool] = _never


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
    """
    recipe = LoraRecipe(base, hp, hooks, Path(output_dir))
    try:
        recipe.setup(train_records, eval_records, resume_dir, init_dir)
        return recipe.train()
    finally:
        recipe.cleanup()


def train_adapter_distributed(
    base: ResidentBase,
    train_records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]] | None,
    hp: Hyperparameters,
    hooks: TrainHooks,
    output_dir: Path,
    resume_dir: Path | None = None,
    init_dir: Path | None = None,
) -> TrainResult:
    """`train_adapter` for one rank of a data-parallel job (`hp.num_gpus` ranks).

    Call it on every rank of an initialised `torch.distributed` process group (gloo on CPU, nccl
    on GPU), e.g. from the `train_loop_per_worker` of Ray Train's `TorchTrainer`, with the same
    records, hyperparameters and resume checkpoint everywhere. Each step's examples are shared
    out between ranks and the LoRA gradients summed across them, so the update is the one a
    single process would make. Rank 0 alone emits events, polls `should_stop` (its answer is
    broadcast), writes checkpoints and the adapter, and evaluates; the other ranks return a
    result with `adapter_dir=None` and `stopped` as rank 0 decided.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise TrainingError(
            "train_adapter_distributed needs an initialised torch.distributed group"
        )
    rank, world_size = dist.get_rank(), dist.get_world_size()
    recipe = LoraRecipe(base, hp, hooks, Path(output_dir), rank=rank, world_size=world_size)
    try:
        recipe.setup(train_records, eval_records, resume_dir, init_dir)
        return recipe.train()
    finally:
        recipe.cleanup()


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Loop position; saved in checkpoints."""

    global_step: int = 0
    trained_tokens: int = 0
    last_loss: float | None = None
    started: float = field(default_factory=time.perf_counter)
    first_step: int = 0


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
        self.progress = _Progress()
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
        self.precision = self._check_precision()
        self.train_set, self.eval_set = self._datasets(train_records, eval_records)
        self.steps_per_epoch = math.ceil(len(self.train_set.examples) / hp.batch_size)
        self.total_steps = hp.n_epochs * self.steps_per_epoch

        config = lora_config(hp, base.model)
        torch.manual_seed(hp.seed)  # the adapter's initial A matrices
        self._attach_method = base.model.config._attn_implementation
        self.model = get_peft_model(base.model, config, adapter_name=ADAPTER_NAME)
        base.model.set_attn_implementation(PACKED_ATTENTION)
        if hp.gradient_checkpointing:
            base.model.activation_checkpointing_enable({"use_reentrant": False})
        self.model.train()
        fused = self._exit_stack.enter_context(fused_lora_layers(self.model))
        norms = self._exit_stack.enter_context(fused_rms_norms(self.model))
        self.backbone = base.model.get_decoder()
        self.lm_head = base.model.get_output_embeddings()
        self._logits_workspace = LogitsWorkspace()
        if init_dir is not None and resume_dir is None:
            self._load_initial_adapter(Path(init_dir))

        params = [p for p in self.model.parameters() if p.requires_grad]
        self._trainable = params
        self.optimizer = torch.optim.AdamW(
            params,
            lr=hp.learning_rate,
            weight_decay=hp.weight_decay,
            betas=(0.9, 0.999),
            # one kernel for all the LoRA tensors, not a dozen ops per tensor (on a CPU: 6 ms a
            # step against 23 for SmolLM2's 420 tensors)
            fused=self.base.device.type in ("cpu", "cuda"),
        )
        warmup = math.ceil(hp.warmup_ratio * self.total_steps)
        schedule = (
            get_cosine_schedule_with_warmup
            if hp.lr_scheduler == "cosine"
            else get_linear_schedule_with_warmup
        )
        self.scheduler = schedule(self.optimizer, warmup, self.total_steps)
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

    def _check_precision(self) -> Precision:
        requested = self.hp.precision
        if requested != "auto" and requested != self.base.precision:
            raise TrainingError(
                f"the job asks for {requested} but the base is resident in {self.base.precision}; "
                f"load it with precision={requested!r}"
            )
        device = self.base.device.type
        reason = "requested" if requested != "auto" else f"auto: {device} bf16 support"
        if requested == "auto" and self.base.precision == "fp32":
            reason = f"auto: no bf16 on {device}"
        self._event(
            "log",
            f"precision {self.base.precision} ({reason}); frozen base in {self.base.precision}, "
            "LoRA weights and optimizer in fp32",
            {"precision": self.base.precision, "device": device},
        )
        return self.base.precision

    def _datasets(
        self,
        train_records: list[dict[str, Any]],
        eval_records: list[dict[str, Any]] | None,
    ) -> tuple[TokenizedDataset, TokenizedDataset | None]:
        hp, tokenizer = self.hp, self.base.tokenizer
        try:
            train_set = tokenize_records(train_records, tokenizer, hp.max_seq_length)
            eval_set = (
                tokenize_records(eval_records, tokenizer, hp.max_seq_length)
                if eval_records
                else None
            )
        except DatasetFormatError as exc:
            raise TrainingError(f"dataset record cannot be formatted: {exc}") from exc
        if not train_set.examples:
            raise TrainingError(
                f"no training example is left with a token to learn from: all {len(train_records)} "
                f"records lack an assistant/completion token within "
                f"max_seq_length={hp.max_seq_length}"
            )
        if eval_set is None and hp.eval_fraction > 0:
            train_set, eval_set = split_eval(train_set, hp.eval_fraction, hp.seed)
        if eval_set is not None and not eval_set.examples:
            eval_set = None
        self._event(
            "log",
            f"dataset: {len(train_set.examples)} training examples ({train_set.total_tokens} "
            f"tokens), {train_set.dropped} dropped, {train_set.truncated} truncated; "
            f"{len(eval_set.examples) if eval_set else 0} held out for evaluation",
            {
                "train_examples": len(train_set.examples),
                "train_tokens": train_set.total_tokens,
                "dropped_examples": train_set.dropped,
                "truncated_examples": train_set.truncated,
                "eval_examples": len(eval_set.examples) if eval_set else 0,
            },
        )
        return train_set, eval_set

    def _load_initial_adapter(self, init_dir: Path) -> None:
        """Start from a published adapter's weights instead of a fresh initialisation."""
        assert self.model is not None
        path = init_dir / ADAPTER_WEIGHTS
        if not path.is_file():
            raise TrainingError(f"the adapter to continue from has no {ADAPTER_WEIGHTS}")
        weights = load_file(path, device=str(self.base.device))
        expected = get_peft_model_state_dict(self.model, adapter_name=ADAPTER_NAME)
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        wrong_shape = sorted(
            k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape
        )
        if missing or unexpected or wrong_shape:
            first = (missing or unexpected or wrong_shape)[0]
            raise TrainingError(
                "the adapter to continue from does not fit this job's LoRA settings "
                f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} "
                f"wrongly shaped tensors, e.g. {first}); keep its rank and target modules"
            )
        set_peft_model_state_dict(self.model, weights, adapter_name=ADAPTER_NAME)
        self._event(
            "log",
            f"starting from the weights of the adapter to continue from ({len(weights)} tensors)",
            {"initial_adapter_tensors": len(weights)},
        )

    def _resume(self, resume_dir: Path) -> None:
        """Load adapter, optimizer and schedule state; the loop continues at the saved step."""
        assert self.model is not None
        state_path = resume_dir / TRAINER_STATE
        if not state_path.is_file():
            raise TrainingError(f"{resume_dir} is not a training checkpoint (no {TRAINER_STATE})")
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state["base_sha256"] != self.base.sha256:
            raise TrainingError("the checkpoint was trained on a different base model")
        if state["data_sha256"] != self._data_sha256():
            raise TrainingError("the checkpoint was trained on different data")
        saved, current = state["hyperparameters"], self.hp.model_dump(mode="json")
        changed = {k for k in current if saved.get(k) != current[k]} - _RESUMABLE_CHANGES
        if changed:
            raise TrainingError(f"hyperparameters changed since the checkpoint: {sorted(changed)}")
        weights = load_file(resume_dir / ADAPTER_WEIGHTS, device=str(self.base.device))
        result = set_peft_model_state_dict(self.model, weights, adapter_name=ADAPTER_NAME)
        if result.unexpected_keys:
            raise TrainingError(f"checkpoint adapter has unexpected keys {result.unexpected_keys}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress.global_step = self.progress.first_step = int(state["global_step"])
        self.progress.trained_tokens = int(state["trained_tokens"])
        self.progress.last_loss = state["last_loss"]
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
            if self.rank != 0:
                continue  # rank 0 evaluates and writes; the others only train
            if hp.eval_every_steps and step % hp.eval_every_steps == 0 and step < self.total_steps:
                eval_loss = self._evaluate()
            end_of_epoch = step % self.steps_per_epoch == 0
            if step % hp.checkpoint_every_steps == 0 or end_of_epoch:
                self.save_checkpoint()
        if self.rank != 0:
            return self._result(None, None, stopped=False)
        eval_loss = self._evaluate()
        return self._result(self.save_adapter(), eval_loss, stopped=False)

    def _step_examples(self, epoch: int, position: int) -> list[TokenizedExample]:
        order = epoch_order(len(self.train_set.examples), self.hp.seed, epoch)
        size = self.hp.batch_size
        return [self.train_set.examples[i] for i in order[position * size : (position + 1) * size]]

    def _optimizer_step(self, batch: Sequence[TokenizedExample]) -> bool:
        """One optimizer step over `batch`, in gradient-accumulation micro-batches.

        The loss is the mean over every trained token of the step (not a mean of micro-batch
        means), so the gradient does not depend on how the step is split, across micro-batches
        or ranks. Returns False when the caller asked to stop (checked before every micro-batch;
        nothing is applied then).
        """
        assert self.model is not None
        progress, hp = self.progress, self.hp
        started = time.perf_counter()
        torch.manual_seed(hash_seed(hp.seed, progress.global_step))
        targets = sum(e.trainable_tokens for e in batch)
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
            loss_sum = self._all_reduce_gradients(loss_sum)
        nn.utils.clip_grad_norm_(self._trainable, MAX_GRAD_NORM)
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        tokens = sum(len(e) for e in batch)
        progress.global_step += 1
        progress.trained_tokens += tokens
        progress.last_loss = loss_sum.item() / targets
        elapsed = time.perf_counter() - started
        done = progress.global_step / self.total_steps
        per_step = (time.perf_counter() - progress.started) / (
            progress.global_step - progress.first_step
        )
        self._event(
            "metrics",
            f"step {progress.global_step}/{self.total_steps} loss {progress.last_loss:.4f}",
            {
                "step": progress.global_step,
                "total_steps": self.total_steps,
                "epoch": progress.global_step / self.steps_per_epoch,
                "train_loss": progress.last_loss,
                "learning_rate": learning_rate,
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed,
                "peak_memory_mib": peak_memory_mib(self.base.device),
                "fraction_done": done,
                "eta_s": per_step * (self.total_steps - progress.global_step),
            },
        )
        return True

    def _loss_sum(self, examples: Sequence[TokenizedExample]) -> torch.Tensor:
        """Summed next-token cross-entropy over the trained tokens of `examples`, packed in a row."""
        row = pack(examples, self.base.device)
        selected = packed_hidden_states(self.backbone, row)[row.target_positions]
        return LinearCrossEntropy.apply(
            selected, self.lm_head.weight, row.targets, self._logits_workspace
        )

    @torch.no_grad()
    def _evaluate(self) -> float | None:
        """Token-mean loss over the eval set; emits a metrics event."""
        if self.eval_set is None:
            return None
        assert self.model is not None
        self.model.eval()
        total = 0.0
        count = 0
        for rows in rows_of_tokens(self.eval_set.examples, EVAL_ROW_TOKENS):
            with self._autocast():
                total += self._loss_sum(rows).item()
            count += sum(e.trainable_tokens for e in rows)
        self.model.train()
        loss = total / count
        step = self.progress.global_step
        self._event(
            "metrics", f"step {step} eval loss {loss:.4f}", {"step": step, "eval_loss": loss}
        )
        return loss

    def _stop_requested(self) -> bool:
        """The caller's stop signal; across ranks, rank 0's answer."""
        if self.world_size == 1:
            return self.hooks.should_stop()
        import torch.distributed as dist

        flag = torch.tensor([self.rank == 0 and self.hooks.should_stop()], device=self.base.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def _all_reduce_gradients(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """Sum the LoRA gradients (and the loss) over ranks, in one flat buffer."""
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._trainable]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss_sum.reshape(1)])
        dist.all_reduce(flat)
        offset = 0
        for param in self._trainable:
            param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
            offset += param.numel()
        return flat[-1]

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
        with _staged(directory) as staged:
            self._write_adapter(staged, dtype=None)
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
                "data_sha256": self._data_sha256(),
                "hyperparameters": self.hp.model_dump(mode="json"),
            }
            torch.save(state, staged / TRAINER_STATE)
        self._event("log", f"checkpoint at step {step}", {"step": step, "checkpoint": True})
        self.hooks.on_checkpoint(step, directory)
        if self._previous_checkpoint is not None and self._previous_checkpoint != directory:
            shutil.rmtree(self._previous_checkpoint, ignore_errors=True)
        self._previous_checkpoint = directory
        return directory

    def save_adapter(self) -> Path:
        """Write the final adapter as a PEFT directory with bf16 weights."""
        directory = self.output_dir / "adapter"
        with _staged(directory) as staged:
            self._write_adapter(staged, dtype=torch.bfloat16)
        return directory

    def _write_adapter(self, directory: Path, dtype: torch.dtype | None) -> None:
        assert self.model is not None
        config = self.model.peft_config[ADAPTER_NAME]
        config_dict = config.to_dict()
        config_dict["inference_mode"] = True
        config_dict["base_model_name_or_path"] = str(self.base.path)
        if isinstance(config_dict.get("target_modules"), set):
            config_dict["target_modules"] = sorted(config_dict["target_modules"])
        (directory / "adapter_config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        weights = get_peft_model_state_dict(self.model, adapter_name=ADAPTER_NAME)
        tensors = {
            name: tensor.detach().to(dtype or tensor.dtype).contiguous().cpu()
            for name, tensor in weights.items()
        }
        save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})

    def _data_sha256(self) -> str:
        """Identity of the tokenized training set: a checkpoint only resumes the same data."""
        digest = hashlib.sha256()
        for example in self.train_set.examples:
            digest.update(len(example).to_bytes(8, "little"))
            digest.update(array("q", example.input_ids).tobytes())
            digest.update(array("q", example.labels).tobytes())
        return digest.hexdigest()

    # -- cleanup -------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove the adapter and every training switch: the base returns to its loaded state."""
        model = self.base.model
        self._exit_stack.close()
        self._logits_workspace = LogitsWorkspace()  # its buffers go with the job
        if self.model is not None:
            self.model.unload()
            self.model = None
            model.set_attn_implementation(self._attach_method)
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in model.__dict__:
                delattr(model, attribute)
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
        # Enabling checkpointing hooked the input embeddings; disabling leaves the hook.
        model.disable_input_require_grads()
        model.requires_grad_(False)
        model.eval()

    # -- helpers -------------------------------------------------------------------------------

    def _result(
        self, adapter_dir: Path | None, eval_loss: float | None, stopped: bool
    ) -> TrainResult:
        return TrainResult(
            adapter_dir=adapter_dir,
            global_step=self.progress.global_step,
            total_steps=self.total_steps,
            final_train_loss=self.progress.last_loss,
            final_eval_loss=eval_loss,
            trained_tokens=self.progress.trained_tokens,
            stopped=stopped,
            precision=self.precision,
            base_sha256=self.base.sha256,
        )

    def _event(self, kind: str, message: str, data: dict[str, Any]) -> None:
        if self.rank == 0:
            self.hooks.on_event(kind, message, data)


# --------------------------------------------------------------------------------------------
# Adapter plumbing: small free functions
# --------------------------------------------------------------------------------------------


def adaptable_linears(model: PreTrainedModel) -> dict[str, nn.Linear]:
    """The linear layers of the decoder that LoRA may target (the output head excluded)."""
    head = model.get_output_embeddings()
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not head
    }


def lora_config(hp: Hyperparameters, model: PreTrainedModel) -> LoraConfig:
    """The job's LoRA settings as a peft config, refusing targets or ranks the model can't take."""
    linears = adaptable_linears(model)
    if hp.target_modules == "all-linear":
        targeted = linears
    else:
        known = sorted({name.rsplit(".", 1)[-1] for name in linears})
        unknown = [t for t in hp.target_modules if not any(_matches_target(n, t) for n in linears)]
        if unknown:
            raise TrainingError(
                f"target module(s) {unknown} not found among the model's linear layers; "
                f"choose from {known} or 'all-linear'"
            )
        targeted = {
            n: m
            for n, m in linears.items()
            if any(_matches_target(n, t) for t in hp.target_modules)
        }
    too_small = sorted(
        {
            f"{name.rsplit('.', 1)[-1]} ({module.in_features}x{module.out_features})"
            for name, module in targeted.items()
            if hp.lora_rank > min(module.in_features, module.out_features)
        }
    )
    if too_small:
        raise TrainingError(
            f"lora_rank {hp.lora_rank} is larger than the smallest dimension of {too_small}: "
            "a low-rank update cannot have a higher rank than its layer"
        )
    return LoraConfig(
        r=hp.lora_rank,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        # Layer names, not paths ('q_proj', not 'model.layers.0.self_attn.q_proj'): what serving
        # engines expect, and what peft would otherwise expand 'all-linear' to.
        target_modules=sorted({name.rsplit(".", 1)[-1] for name in targeted}),
        use_dora=hp.use_dora,
        use_rslora=hp.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _matches_target(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


# --------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------


def hash_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from the job seed and loop coordinates."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@lru_cache(maxsize=2)
def epoch_order(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order examples are seen in during `epoch`: a permutation fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(hash_seed(seed, epoch))
    return tuple(torch.randperm(count, generator=generator).tolist())


def split_eval(
    dataset: TokenizedDataset, fraction: float, seed: int
) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Hold out `fraction` of the examples (at least one, never all) for evaluation, seeded."""
    count = len(dataset.examples)
    held = min(max(1, round(count * fraction)), count - 1)
    if held <= 0:
        return dataset, TokenizedDataset(())
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:held])
    train = [e for i, e in enumerate(dataset.examples) if i not in held_out]
    evaluation = [e for i, e in enumerate(dataset.examples) if i in held_out]
    return (
        TokenizedDataset(tuple(train), dataset.dropped, dataset.truncated),
        TokenizedDataset(tuple(evaluation)),
    )


def split_evenly(items: Sequence[TokenizedExample], parts: int) -> Iterator[list[TokenizedExample]]:
    """Exactly `parts` contiguous groups of near-equal size, the last ones empty when items run
    short (gradient-accumulation micro-batches: every rank sees as many, in lock-step)."""
    size, extra = divmod(len(items), parts)
    start = 0
    for index in range(parts):
        end = start + size + (index < extra)
        yield list(items[start:end])
        start = end


# --------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def _staged(directory: Path) -> Iterator[Path]:
    """Write a directory next to its final place and rename it there when complete."""
    staged = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    try:
        yield staged
        if directory.exists():
            shutil.rmtree(directory)
        staged.rename(directory)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
