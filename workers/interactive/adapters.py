"""The engine's adapters: Tinker's LoRA settings as a peft config for the resident base, and a
named adapter's PEFT directory written and read back.

Files are PEFT's own layout, as `workers.training.lora.write_adapter` writes them; that function
serves the batch recipe's one "default" adapter, these serve any of the engine's named ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from workers.interactive.losses import InteractiveError
from workers.training.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adaptable_linears

# Tinker scales every rank's update by alpha / rank with alpha fixed, so that a learning rate
# carries over between ranks.
LORA_ALPHA = 32


@dataclass(frozen=True)
class _Layer:
    in_features: int
    out_features: int
    kind: str  # "attn", "mlp" or "unembed": which of Tinker's train_* switches covers it


@dataclass(frozen=True)
class AdaptableLayers:
    """The layers of a base that LoRA may target, by module path (read before any adapter
    wraps them)."""

    layers: dict[str, _Layer]

    @classmethod
    def of(cls, model: PreTrainedModel) -> AdaptableLayers:
        layers = {
            # A decoder's linear layers are attention or MLP; attention ones say so in their path.
            name: _Layer(m.in_features, m.out_features, "attn" if "att" in name else "mlp")
            for name, m in adaptable_linears(model).items()
        }
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if module is head and isinstance(head, nn.Linear):
                layers[name] = _Layer(head.in_features, head.out_features, "unembed")
        return cls(layers)

    def lora_config(self, rank: int, *, mlp: bool, attn: bool, unembed: bool) -> LoraConfig:
        """Tinker's LoraConfig (rank, train_mlp, train_attn, train_unembed) as a peft config."""
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise InteractiveError(f"rank must be a positive integer, got {rank!r}")
        switched = {"attn": attn, "mlp": mlp, "unembed": unembed}
        chosen = {n: layer for n, layer in self.layers.items() if switched[layer.kind]}
        if not chosen:
            raise InteractiveError("nothing to train: set train_mlp, train_attn or train_unembed")
        targets = {_suffix(n) for n in chosen}
        shared = targets & {_suffix(n) for n in self.layers if n not in chosen}
        if shared:
            raise InteractiveError(
                f"this base's attention and MLP layers share the names {sorted(shared)}; "
                "train both or neither of them"
            )
        smallest = min(min(layer.in_features, layer.out_features) for layer in chosen.values())
        if rank > smallest:
            raise InteractiveError(
                f"rank {rank} is larger than the smallest layer dimension it would adapt "
                f"({smallest}); choose a rank of at most {smallest}"
            )
        return LoraConfig(
            r=rank,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            # Layer names, not paths: what serving engines expect (as in `lora_config`).
            target_modules=sorted(targets),
            bias="none",
            task_type="CAUSAL_LM",
        )

    def read_config(self, directory: Path) -> LoraConfig:
        """The LoRA config of a PEFT directory, refused unless this base has its targets."""
        path = directory / ADAPTER_CONFIG
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            raise InteractiveError(
                f"{directory.name} is not a PEFT adapter directory (no readable {ADAPTER_CONFIG})"
            ) from None
        if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
            raise InteractiveError("the adapter is not a LoRA adapter; only LoRA is served")
        targets = raw.get("target_modules") or []
        targets = {targets} if isinstance(targets, str) else set(targets)
        unknown = sorted(targets - {_suffix(n) for n in self.layers})
        if unknown:
            raise InteractiveError(f"the adapter targets {unknown}, which this base does not have")
        accepted = {f.name for f in fields(LoraConfig) if f.init}
        try:
            config = LoraConfig(**{k: v for k, v in raw.items() if k in accepted})
        except (TypeError, ValueError) as error:
            raise InteractiveError(f"the adapter's config is not valid: {error}") from None
        config.inference_mode = False
        return config


def _suffix(module_path: str) -> str:
    return module_path.rsplit(".", 1)[-1]


def write_adapter_dir(
    model: PeftModel, adapter: str, directory: Path, base_name: str, dtype: torch.dtype | None
) -> None:
    """Write adapter `adapter` of `model` as a PEFT directory, weights in `dtype` (None: as
    trained)."""
    config = model.peft_config[adapter].to_dict()
    config["inference_mode"] = True
    config["base_model_name_or_path"] = base_name
    if isinstance(config.get("target_modules"), set):
        config["target_modules"] = sorted(config["target_modules"])
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {
        k: t.detach().to(dtype or t.dtype).contiguous().cpu()
        for k, t in _adapter_state(model, adapter).items()
    }
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def load_adapter_weights(
    model: PeftModel, adapter: str, directory: Path, device: torch.device
) -> None:
    """Set adapter `adapter`'s weights from a PEFT directory; refused with the reason unless
    they are exactly the tensors it has (peft would skip what does not match, silently)."""
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise InteractiveError(f"the adapter directory has no {ADAPTER_WEIGHTS}")
    weights = load_file(path, device=str(device))
    expected = _adapter_state(model, adapter)
    misfits = sorted(
        set(weights) ^ set(expected)
        | {k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape}
    )
    if misfits:
        raise InteractiveError(
            f"the adapter's weights do not fit its config ({len(misfits)} missing, unexpected "
            f"or misshaped tensors, e.g. {misfits[0]})"
        )
    set_peft_model_state_dict(model, weights, adapter_name=adapter)


def _adapter_state(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    # Not the embedding matrices: peft would add them whole once lm_head is a target.
    state: dict[str, torch.Tensor] = get_peft_model_state_dict(
        model, adapter_name=adapter, save_embedding_layers=False
    )
    return state
