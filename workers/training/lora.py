"""The adapter: which layers LoRA targets, its peft config, its life on the resident base, and
its files in PEFT's own layout.

Small free functions (torchtune's `get_adapter_params` style), so that the recipe states what it
does with an adapter and this module how. `attached_adapter` puts a fresh adapter and the
training switches on the resident base and takes all of it off again, so that the base is
bit-identical for the next job. Files are what serving engines read unchanged:
`adapter_config.json` with layer names as targets, `adapter_model.safetensors` with peft's keys.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from control_plane.hyperparameters import Hyperparameters
from workers.kernels.fused_lora import fused_lora_layers
from workers.kernels.fused_norm import fused_rms_norms
from workers.kernels.packing import PACKED_ATTENTION
from workers.training.interface import TrainingError

ADAPTER_NAME = "default"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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


@dataclass(frozen=True)
class AttachedAdapter:
    """A trainable adapter on the resident base, and how many of its layers (and of the base's
    norms) run through the fused kernels."""

    model: PeftModel
    fused_lora_layers: int
    fused_rms_norms: int


@contextmanager
def attached_adapter(
    base_model: PreTrainedModel, config: LoraConfig, *, gradient_checkpointing: bool
) -> Iterator[AttachedAdapter]:
    """A fresh adapter on `base_model` in training mode (packed attention, fused LoRA layers and
    RMSNorms, activation checkpointing when asked); on exit the adapter and every switch are
    removed, whatever happened, and the base is back in its loaded, frozen state."""
    attention = base_model.config._attn_implementation
    model: PeftModel | None = None
    try:
        model = get_peft_model(base_model, config, adapter_name=ADAPTER_NAME)
        base_model.set_attn_implementation(PACKED_ATTENTION)
        if gradient_checkpointing:
            base_model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        with fused_lora_layers(model) as fused, fused_rms_norms(model) as norms:
            yield AttachedAdapter(model, fused, norms)
    finally:
        if model is not None:
            model.unload()
            base_model.set_attn_implementation(attention)
        for attribute in ("peft_config", "_hf_peft_config_loaded"):
            if attribute in base_model.__dict__:
                delattr(base_model, attribute)
        if base_model.is_activation_checkpointing:
            base_model.activation_checkpointing_disable()
        # Enabling checkpointing hooked the input embeddings; disabling leaves the hook.
        base_model.disable_input_require_grads()
        base_model.requires_grad_(False)
        base_model.eval()


def write_adapter(
    model: PeftModel, directory: Path, base_path: Path, dtype: torch.dtype | None
) -> None:
    """Write the adapter as a PEFT directory, its weights in `dtype` (None: as trained)."""
    config = model.peft_config[ADAPTER_NAME].to_dict()
    config["inference_mode"] = True
    config["base_model_name_or_path"] = str(base_path)
    if isinstance(config.get("target_modules"), set):
        config["target_modules"] = sorted(config["target_modules"])
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    weights = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    tensors = {
        name: tensor.detach().to(dtype or tensor.dtype).contiguous().cpu()
        for name, tensor in weights.items()
    }
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def load_initial_adapter(model: PeftModel, directory: Path, device: torch.device) -> int:
    """Start from the weights of a published adapter (a PEFT directory) instead of a fresh
    initialisation; returns how many tensors it set.

    Refused with the reason when the directory has no weights or they do not fit the adapter
    attached (another rank, other target modules): peft would otherwise skip what does not
    match and start from a silently different point.
    """
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise TrainingError(f"the adapter to continue from has no {ADAPTER_WEIGHTS}")
    weights = load_file(path, device=str(device))
    expected = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
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
    set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
    return len(weights)
