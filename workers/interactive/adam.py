"""Tinker's AdamParams: each optim_step's hyperparameters, read and checked."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from workers.interactive.losses import InteractiveError


@dataclass(frozen=True)
class AdamParams:
    """Tinker's AdamParams, with its defaults."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0 or less: no clipping


def read_adam_params(raw: Any) -> AdamParams:
    """An optim_step's `adam_params`, refused with the reason unless they are Adam's, finite
    and in range."""
    if not isinstance(raw, dict):
        raise InteractiveError("adam_params must be an AdamParams object")
    names = {f.name for f in fields(AdamParams)}
    unknown = sorted(set(raw) - names - {"type"})
    if unknown or raw.get("type", "adamw") not in ("adam", "adamw"):
        wrong = unknown or raw["type"]
        raise InteractiveError(f"only Adam is offered: AdamParams {sorted(names)}, not {wrong}")
    values = {k: raw[k] for k in names if raw.get(k) is not None}
    numbers = (isinstance(v, int | float) and not isinstance(v, bool) for v in values.values())
    if not all(numbers) or not all(math.isfinite(v) for v in values.values()):
        raise InteractiveError("AdamParams values must be finite numbers")
    hp = AdamParams(**{k: float(v) for k, v in values.items()})
    if hp.learning_rate < 0 or hp.eps < 0 or hp.weight_decay < 0:
        raise InteractiveError("learning_rate, eps and weight_decay must be >= 0")
    if not (0 <= hp.beta1 < 1 and 0 <= hp.beta2 < 1):
        raise InteractiveError("beta1 and beta2 must be in [0, 1)")
    return hp
