"""vLLM's rules for the LoRA adapters it serves, checked offline on a PEFT directory: what a
serving cluster's `AdapterSync` checks again on the pulled files before any load, and what the
API's `serving_target` checks at create (`control_plane.serving`)."""

from __future__ import annotations

import json
from pathlib import Path

# LoRA ranks vLLM's `--max-lora-rank` accepts (vllm.config.LoRAConfig).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_problems(adapter_dir: Path | str) -> list[str]:
    """Why vLLM's `--lora-modules` / `load_lora_adapter` would refuse this PEFT directory
    (empty when it loads): the rules of vLLM's PEFTHelper and LoRA loader, checked offline."""
    directory = Path(adapter_dir)
    config_path = directory / "adapter_config.json"
    weights = directory / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        return [f"{directory} needs adapter_config.json and adapter_model.safetensors"]
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        return [f"adapter_config.json is not JSON: {exc}"]
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM serves LORA adapters")
    rank = config.get("r")
    if not isinstance(rank, int) or rank > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"r={rank!r}: vLLM's --max-lora-rank goes up to {VLLM_MAX_LORA_RANKS[-1]}")
    if config.get("use_dora"):
        problems.append("use_dora: vLLM does not serve DoRA adapters")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}: vLLM serves LoRA without bias terms")
    if config.get("modules_to_save"):
        problems.append("modules_to_save: vLLM loads only the LoRA matrices")
    if not config.get("target_modules"):
        problems.append("target_modules is empty")
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as tensors:
        keys = list(tensors.keys())
    strange = [k for k in keys if not (k.startswith("base_model.model.") and ".lora_" in k)]
    if not keys or strange:
        problems.append(
            "tensor names must be base_model.model.<module>.lora_A/B.weight; "
            f"found {(strange or ['none'])[0]!r}"
        )
    return problems


def smallest_vllm_max_lora_rank(rank: int) -> int | None:
    """The `--max-lora-rank` a vLLM server needs for an adapter of rank `rank`."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)
