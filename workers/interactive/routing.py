"""A batch whose rows go through different adapters of one peft model, in one forward pass.

peft offers mixed batches (`adapter_names`, one adapter a row) in eval mode only, and computes
them by gathering each adapter's rows by index and scattering its update back, copies that cost
more than the adapters' own updates on a CPU. Here every LoRA layer computes its base layer
alone (peft's mixed batch with every row `__base__`, which leaves the adapters' weights as they
are, trainable or not) and then adds each adapter's update (B A x, scaled) to its own rows, a
slice of the batch: differentiable, so training batches use it as well as sampling ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

# peft's name, in a mixed batch, for rows that take no adapter: the base alone.
BASE = "__base__"


@contextmanager
def routed(peft: PeftModel, adapters: list[str]) -> Iterator[Callable[[list[str]], None]]:
    """Each row of the forward passes run meanwhile goes through its own adapter (`adapters[i]`
    for row i; BASE for the base alone), fastest when each adapter's rows are consecutive (a
    slice each). Plain LoRA only (DoRA and the like are refused, as peft's mixed batches refuse
    them); the engine's adapters have no dropout. Yields a function that routes the passes
    after it by another list (a decode's batch once its finished rows have left it, or rows
    have joined it)."""
    layers = [module for module in peft.modules() if isinstance(module, LoraLayer)]
    routes = _Routes(adapters, layers)
    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(routes.base_rows, with_kwargs=True))
        handles.append(layer.register_forward_hook(routes.add_updates))
    try:
        yield routes.route
    finally:
        for handle in handles:
            handle.remove()


class _Routes:
    """The rows' adapters, as the hooks read them at each pass."""

    def __init__(self, adapters: list[str], layers: list[LoraLayer]) -> None:
        self.layers = layers
        self.route(adapters)

    def route(self, adapters: list[str]) -> None:
        segments = _segments(adapters)
        varied = [a for layer in self.layers for a, _, _ in segments if a in layer.lora_variant]
        if varied:  # DoRA and the like: their update is not B A x
            raise ValueError(f"adapter {varied[0]} is not plain LoRA: it cannot share a batch")
        self.segments = segments
        self.names = [BASE] * len(adapters)

    def base_rows(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, {**kwargs, "adapter_names": self.names}

    def add_updates(
        self, module: Any, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        return _add_updates(self.segments, module, args, output)


def _segments(adapters: list[str]) -> list[tuple[str, int, int]]:
    """(adapter, first row, row past its last) of each run of rows of one adapter."""
    segments: list[tuple[str, int, int]] = []
    for row, adapter in enumerate(adapters):
        if segments and segments[-1][0] == adapter:
            segments[-1] = (adapter, segments[-1][1], row + 1)
        else:
            segments.append((adapter, row, row + 1))
    return segments


def _add_updates(
    segments: list[tuple[str, int, int]], module: Any, args: tuple[Any, ...], output: torch.Tensor
) -> torch.Tensor | None:
    """The base layer's output plus each segment's adapter update (B A x, scaled) on its rows."""
    if not any(adapter in module.lora_A for adapter, _, _ in segments):
        return None  # no adapter of the batch adapts this layer
    x = args[0]
    updates = []
    for adapter, start, end in segments:
        if adapter not in module.lora_A:
            updates.append(output.new_zeros((end - start, *output.shape[1:])))
            continue
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        rows = module.lora_dropout[adapter](x[start:end].to(lora_a.weight.dtype))
        updates.append((lora_b(lora_a(rows)) * module.scaling[adapter]).to(output.dtype))
    return output + torch.cat(updates)
