"""Whether a job's adapter could be served, checked at submission (`serving_target` on create).

The rules of vLLM's LoRA loader that a job's hyperparameters already decide, so that a job
whose adapter the serving cluster would refuse is refused before it trains, not after (the
`AdapterSync` operator checks the same rules again on the pulled files before any load,
`loraforge.vllm_rules.vllm_problems`): no DoRA, a rank within the pods' `--max-lora-rank`, and the
base the pods serve. loraforge never trains bias terms or `modules_to_save`, which vLLM also
refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.hyperparameters import Hyperparameters

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM's `--max-lora-rank` accepts (vllm.config.LoRAConfig); the public client keeps
the same tuple for the operator, which imports nothing of the control plane."""


@dataclass(frozen=True)
class ServingTarget:
    """What the serving cluster runs: vLLM with this `--max-lora-rank`, serving this base."""

    max_lora_rank: int | None = None
    served_model: str | None = None


def serving_problems(hp: Hyperparameters, base_name: str, target: ServingTarget) -> list[str]:
    """Why `target` would refuse the adapter a job with `hp` on `base_name` produces (empty when
    it would load it)."""
    problems = []
    if hp.use_dora:
        problems.append("use_dora: vLLM does not serve DoRA adapters (train with use_dora false)")
    if target.max_lora_rank is not None and hp.lora_rank > target.max_lora_rank:
        needed = next((r for r in VLLM_MAX_LORA_RANKS if r >= hp.lora_rank), None)
        fix = f"serve it with --max-lora-rank {needed}, or " if needed else ""
        problems.append(
            f"lora_rank {hp.lora_rank} exceeds the target's --max-lora-rank "
            f"{target.max_lora_rank} ({fix}train with lora_rank <= {target.max_lora_rank})"
        )
    if target.served_model is not None and target.served_model != base_name:
        problems.append(
            f"the target serves {target.served_model!r} and this job trains on {base_name!r}: "
            "vLLM loads an adapter only onto the base it was trained on"
        )
    return problems
