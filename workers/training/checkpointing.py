"""A job's training checkpoint: the adapter as trained plus everything the loop needs to go on.

A checkpoint directory holds the PEFT adapter in training precision and `trainer_state.pt`
(step, tokens, optimizer, schedule, data order, and the identities of base, data and
hyperparameters). It resumes only the job it came from: another base, other data or changed
hyperparameters are refused with the reason. Directories are staged beside their final place
and renamed there when complete, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import shutil
from array import array
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from control_plane.hyperparameters import Hyperparameters
from workers.kernels.example import TokenizedExample
from workers.training.interface import TrainingError
from workers.training.lora import ADAPTER_NAME, ADAPTER_WEIGHTS, write_adapter

TRAINER_STATE = "trainer_state.pt"
# Hyperparameters that may change between a checkpoint and its resumption.
RESUMABLE_CHANGES = {"checkpoint_every_steps", "eval_every_steps", "num_gpus"}


@contextmanager
def staged(directory: Path) -> Iterator[Path]:
    """Write a directory next to its final place and rename it there when complete."""
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def data_sha256(examples: Sequence[TokenizedExample]) -> str:
    """Identity of a tokenized training set: a checkpoint only resumes the same data."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(len(example).to_bytes(8, "little"))
        digest.update(array("q", example.input_ids).tobytes())
        digest.update(array("q", example.labels).tobytes())
    return digest.hexdigest()


def write_checkpoint(
    directory: Path,
    model: PeftModel,
    base_path: Path,
    state: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """The adapter in training precision and the loop's `state`, staged into `directory`, with
    any other `tensors` files (name: tensors) beside them."""
    with staged(directory) as staging:
        write_adapter(model, staging, base_path, dtype=None)
        torch.save(state, staging / TRAINER_STATE)
        for name, contents in (tensors or {}).items():
            save_file(contents, str(staging / name))


def read_checkpoint(
    resume_dir: Path,
    model: PeftModel,
    device: torch.device,
    *,
    base_sha256: str,
    data_sha256: str,
    hp: Hyperparameters,
) -> dict[str, Any]:
    """Load a checkpoint's adapter weights into `model` and return its loop state, after
    checking that it belongs to this job (same base, data and hyperparameters)."""
    state_path = resume_dir / TRAINER_STATE
    if not state_path.is_file():
        raise TrainingError(f"{resume_dir} is not a training checkpoint (no {TRAINER_STATE})")
    state: dict[str, Any] = torch.load(state_path, map_location="cpu", weights_only=True)
    if state["base_sha256"] != base_sha256:
        raise TrainingError("the checkpoint was trained on a different base model")
    if state["data_sha256"] != data_sha256:
        raise TrainingError("the checkpoint was trained on different data")
    saved, current = state["hyperparameters"], hp.model_dump(mode="json")
    # A field added since the checkpoint was written had its default then.
    defaults = Hyperparameters().model_dump(mode="json")
    changed = {k for k in current if saved.get(k, defaults[k]) != current[k]} - RESUMABLE_CHANGES
    if changed:
        raise TrainingError(f"hyperparameters changed since the checkpoint: {sorted(changed)}")
    weights = load_file(resume_dir / ADAPTER_WEIGHTS, device=str(device))
    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    if result.unexpected_keys:
        raise TrainingError(f"checkpoint adapter has unexpected keys {result.unexpected_keys}")
    return state
