"""Hyperparameters of a fine-tuning job: one validated object shared by the API and the trainers.

OpenAI's names (`n_epochs`, `batch_size`, `learning_rate_multiplier`) sit beside loraforge's LoRA
switches so that the official client's `hyperparameters={...}` works unchanged, and so that a job
stored in the database carries every value the trainer used (lineage records it whole).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

# Base learning rate that `learning_rate_multiplier` scales (LoRA's usual 2e-4).
BASE_LEARNING_RATE = 2e-4

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")


class Hyperparameters(BaseModel):
    """Everything the training recipe needs to reproduce a run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_epochs: int = Field(default=3, ge=1, le=100, description="passes over the training data")
    batch_size: int = Field(default=8, ge=1, le=1024, description="examples per optimizer step")
    learning_rate_multiplier: float = Field(
        default=1.0, gt=0, le=100, description="scales the base learning rate of 2e-4"
    )
    lora_rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r")
    lora_alpha: float = Field(default=32, gt=0, le=4096, description="LoRA scaling alpha")
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="module names to adapt, or 'all-linear'"
    )
    use_dora: bool = False
    use_rslora: bool = False
    max_seq_length: int = Field(default=1024, ge=16, le=131072)
    seed: int = Field(default=42, ge=0, le=2**31 - 1)
    warmup_ratio: float = Field(default=0.03, ge=0, le=0.5)
    lr_scheduler: Literal["cosine", "linear"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    gradient_checkpointing: bool = False
    eval_fraction: float = Field(
        default=0.0, ge=0, le=0.5, description="held-out fraction when no validation file is given"
    )
    eval_every_steps: int = Field(default=0, ge=0, le=1_000_000, description="0: only at the end")
    early_stopping_patience: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="stop after this many evaluations in a row without a lower eval loss, and "
        "publish the weights of the lowest (0: train every step)",
    )
    early_stopping_threshold: float = Field(
        default=0.0, ge=0, le=1000, description="how much lower an eval loss must be to count"
    )
    sweep_median_stopping: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="from the job's Nth evaluation on, stop it when its lowest eval loss is above "
        "the median of its sweep's other jobs at the same step (0: never)",
    )
    checkpoint_every_steps: int = Field(default=50, ge=1, le=1_000_000)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    num_gpus: int = Field(default=1, ge=1, le=64, description="GPUs (or CPU workers) for one job")
    # OpenAI's `method.type`: supervised (next-token loss on the completions) or dpo (Direct
    # Preference Optimization on preference pairs, `workers.training.preference`).
    method: Literal["supervised", "dpo"] = "supervised"
    dpo_beta: float = Field(
        default=0.1, gt=0, le=10, description="DPO's beta: how far from the reference it may move"
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """`true` is not 1 here (pydantic would take it as one): a JSON client that sends a
        switch where a number goes has mistaken the field."""
        field = cls.model_fields[info.field_name or ""]
        if isinstance(value, bool) and field.annotation in (int, float):
            raise PydanticCustomError(
                "number_type",
                "Input should be a number, not {value}",
                {"value": str(value).lower()},
            )
        return value

    @field_validator("target_modules")
    @classmethod
    def _check_modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list):
            if not value:
                raise ValueError("target_modules must name at least one module or be 'all-linear'")
            for name in value:
                if not _MODULE_NAME.match(name):
                    raise ValueError(f"target module name {name!r} is not a valid module name")
        return value

    @field_validator("early_stopping_patience", "sweep_median_stopping")
    @classmethod
    def _check_patience(cls, value: int, info: ValidationInfo) -> int:
        # (an eval_every_steps refused on its own is not in `data`: that refusal says it)
        if value and info.data.get("eval_every_steps", 1) == 0:
            raise ValueError(
                "it counts evaluations during training: set eval_every_steps too (the steps "
                "between evaluations)"
            )
        return value

    @property
    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier


FIELD_ORDER = {name: i for i, name in enumerate(Hyperparameters.model_fields)}
"""Each hyperparameter's place as `Hyperparameters` lists them (and the form shows them): the
order pages list a job's hyperparameters in, names it does not know last."""
