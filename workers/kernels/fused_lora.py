"""A LoRA linear layer in one autograd node: `y = x Wᵀ + b + s·(x Aᵀ) Bᵀ` for a frozen `W`.

peft's `lora.Linear.forward` computes the base output, then `lora_B(lora_A(x)) * scaling` as a
separate tensor and adds it: two passes over a `tokens x out_features` tensor per layer in the
forward, two more in the backward, and a copy of the input cast to the adapter's dtype. On a CPU
those elementwise passes cost as much as the rank-16 matmuls themselves. Here the scaled low-rank
update accumulates straight into the base output (`addmm_`), the backward folds the adapter's
input gradient into the base one the same way, and only the input and the `tokens x rank`
projection are kept for the backward.

`fused_lora_layers(model)` points the plain LoRA layers of a peft model (no DoRA, no dropout, an
`nn.Linear` base, not merged) at this forward and restores peft's on exit; any other layer, or a
call peft would treat differently (adapters disabled, mixed adapter batches), takes peft's own
path. Under autocast the matmuls run in the autocast dtype, as peft's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import nn


class LoraLinearFunction(torch.autograd.Function):
    """Forward and backward of a LoRA linear layer with a frozen base weight and bias."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        projected = rows @ lora_a.t()
        out = F.linear(rows, weight, bias)
        out.addmm_(projected, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, weight, lora_a, lora_b, projected)
        ctx.scaling = scaling
        ctx.input_shape = x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, torch.Tensor | None, torch.Tensor | None, None]:
        rows, weight, lora_a, lora_b, projected = ctx.saved_tensors
        scaling = ctx.scaling
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_projected = (grad_rows @ lora_b).mul_(scaling)
        grad_a = grad_projected.t() @ rows if ctx.needs_input_grad[3] else None
        grad_b = (grad_rows.t() @ projected).mul_(scaling) if ctx.needs_input_grad[4] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_rows @ weight).addmm_(grad_projected, lora_a).view(ctx.input_shape)
        return grad_x, None, None, grad_a, grad_b, None


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """`LoraLinearFunction` in the autocast dtype when autocast is on, else in the base's dtype."""
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else weight.dtype
    with torch.autocast(device, enabled=False):
        return LoraLinearFunction.apply(
            x.to(dtype),
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
            lora_a.to(dtype),
            lora_b.to(dtype),
            scaling,
        )


def _fusable(module: LoraLinear) -> bool:
    """Plain LoRA on an nn.Linear: what `LoraLinearFunction` computes exactly."""
    base = module.get_base_layer()
    return (
        type(base) is nn.Linear
        and not getattr(module, "fan_in_fan_out", False)
        and all(not module.use_dora.get(name, False) for name in module.lora_A)
        and not module.lora_variant
        and all(isinstance(d, nn.Identity) for d in module.lora_dropout.values())
        and all(lin.bias is None for lin in module.lora_A.values())
        and all(lin.bias is None for lin in module.lora_B.values())
    )


def _fused_forward(module: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = [name for name in module.active_adapters if name in module.lora_A]
    if args or kwargs or module.disable_adapters or module.merged or len(active) != 1:
        return LoraLinear.forward(module, x, *args, **kwargs)
    (name,) = active
    base = module.get_base_layer()
    return lora_linear(
        x,
        base.weight,
        base.bias,
        module.lora_A[name].weight,
        module.lora_B[name].weight,
        module.scaling[name],
    )


@contextmanager
def forwards_replaced(modules: list[nn.Module], forward: Callable[..., Any]) -> Iterator[int]:
    """Point each module's `forward` at `forward` (bound to it); yields how many; on exit the
    modules' class forward is theirs again."""
    for module in modules:
        module.forward = forward.__get__(module)
    try:
        yield len(modules)
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


def fused_lora_layers(model: nn.Module) -> AbstractContextManager[int]:
    """Run the model's plain LoRA layers through `LoraLinearFunction`; yields how many."""
    fused = [m for m in model.modules() if isinstance(m, LoraLinear) and _fusable(m)]
    return forwards_replaced(fused, _fused_forward)
