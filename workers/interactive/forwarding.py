"""Forward (and backward) passes of several models' calls in one batch on the resident base.

A tenant's forward_backward call is a few sequences; an RL loop's step, a handful. Run one call
at a time, each pass over the base is as small as its call, and every tenant waiting on the base
waits for each other's passes in turn. So the calls of several models run together: their datums
share each forward pass over the frozen base, each row through its own model's adapter (peft's
mixed batches, routed by `routing` in training mode too), and one backward pass gives
each model its own gradient: the rows of a batch are independent (attention stays within a row)
and the models' adapter weights are disjoint, so the gradient of the summed loss with respect to
a model's weights is that of its own call's loss, as if it had run alone. Each call is answered
with its own datums' outputs and loss.

A batch that fails part way (out of memory, say) leaves every model's gradients as they were
before it (`kept_gradients`), so its calls can be run again one at a time without a micro-batch
counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from workers.interactive.losses import Datum, Loss, target_logprobs, tensor_data
from workers.interactive.routing import routed
from workers.interactive.sample_batching import rope_couples_past

# The most of a micro-batch's tokens that may be padding: rows of very different lengths run in
# passes of their own rather than pad the short ones to the long (an RL batch's lengths vary).
MAX_PADDING = 0.25


@dataclass(frozen=True)
class Forward:
    """One call's part of a batch: its model's adapter and weights, its loss and datums, and
    whether its gradients are kept (forward_backward) or not (forward)."""

    adapter: str
    params: list[nn.Parameter]
    loss_fn: Loss
    data: list[Datum]
    backward: bool


def run_together(
    peft: PeftModel,
    asked: list[Forward],
    *,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
    micro_batch_tokens: int,
) -> list[dict[str, Any]]:
    """Each call's ForwardBackwardOutput, the datums of all of them run in micro-batches of at
    most `micro_batch_tokens` padded tokens; the gradients of the calls with `backward`
    accumulate in their models' weights. A model's several calls (in their order, no optim_step
    between them: the same weights) add up their gradients as they would one after another."""
    # The datums longest first, so that a micro-batch holds sequences of about one length
    # (`micro_batches` bounds its padding); within one, each model's rows are one slice
    # (`routed`). The outputs go back in each call's own order.
    rows = sorted(
        ((i, j, datum) for i, call in enumerate(asked) for j, datum in enumerate(call.data)),
        key=lambda row: -len(row[2].tokens),
    )
    mixed = len({call.adapter for call in asked}) > 1
    if mixed:
        trained = {call.adapter for call in asked if call.backward}
        for call in asked:
            for param in call.params:
                param.requires_grad_(call.adapter in trained)
    else:
        peft.set_adapter(asked[0].adapter)  # its weights alone trainable; no rows to route
    outputs: list[dict[int, dict[str, Any]]] = [{} for _ in asked]
    totals = [0.0] * len(asked)
    metrics: list[dict[str, torch.Tensor]] = [{} for _ in asked]  # summed on the device
    trainable = {id(p): p for call in asked if call.backward for p in call.params}
    with kept_gradients(list(trainable.values())):
        bound = rope_couples_past(getattr(peft, "config", None))
        for group in micro_batches(rows, micro_batch_tokens, bound):
            group.sort(key=lambda row: asked[row[0]].adapter)  # a slice a model
            backward = any(asked[i].backward for i, _, _ in group)
            routing = (
                routed(peft, [asked[i].adapter for i, _, _ in group]) if mixed else nullcontext()
            )
            sums: dict[int, list[torch.Tensor]] = {}
            with torch.set_grad_enabled(backward), autocast(), routing:
                logits = _logits(peft, [datum for _, _, datum in group], device)
                for (i, j, datum), row in zip(group, logits, strict=True):
                    inputs = {k: v.to(row.device) for k, v in datum.inputs.items()}
                    logprobs = target_logprobs(row[: len(datum.tokens)], inputs["target_tokens"])
                    scored = asked[i].loss_fn.datum(logprobs, inputs)
                    sums.setdefault(i, []).append(scored.loss)
                    outputs[i][j] = {"logprobs": tensor_data(logprobs), **scored.outputs}
                    for key, value in scored.metrics.items():
                        metrics[i][key] = metrics[i].get(key, 0) + value.detach()
                losses = {i: torch.stack(s).sum() for i, s in sums.items()}
            if backward:
                kept = [loss for i, loss in losses.items() if asked[i].backward]
                torch.stack(kept).sum().backward()
            for i, loss in losses.items():
                totals[i] += loss.item()
    return [
        {
            "loss_fn_output_type": "ArrayRecord",
            "loss_fn_outputs": [outputs[i][j] for j in range(len(asked[i].data))],
            "metrics": {**_reduced(metrics[i], len(asked[i].data)), "loss:sum": totals[i]},
        }
        for i in range(len(asked))
    ]


def _reduced(sums: dict[str, torch.Tensor], datums: int) -> dict[str, float]:
    """A call's custom metrics, summed over its datums (read from the device once each): a
    `:mean` one divided by their count."""
    return {
        key: value.item() / datums if key.endswith(":mean") else value.item()
        for key, value in sums.items()
    }


def _logits(model: nn.Module, group: list[Datum], device: torch.device) -> torch.Tensor:
    """Logits (B, L, V) of the group's inputs, right-padded to the longest."""
    width = max(len(d.tokens) for d in group)
    ids = torch.zeros((len(group), width), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, datum in enumerate(group):
        ids[row, : len(datum.tokens)] = torch.tensor(datum.tokens)
        mask[row, : len(datum.tokens)] = 1
    logits: torch.Tensor = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
    ).logits
    return logits


def micro_batches(
    rows: list[tuple[int, int, Datum]], tokens: int, couples_past: int | None = None
) -> Iterator[list[tuple[int, int, Datum]]]:
    """Consecutive rows in groups whose padded size stays within `tokens` (a longer row alone)
    and whose padding stays within MAX_PADDING of it (rows longest first pack best); where the
    base's rope couples rows past `couples_past` positions (`rope_couples_past`: its frequencies
    follow the pass's longest row), the rows longer than that apart from the others."""
    group: list[tuple[int, int, Datum]] = []
    width = real = 0
    for row in rows:
        length = len(row[2].tokens)
        wider = max(width, length)
        padded = wider * (len(group) + 1)
        coupled = couples_past is not None and (width > couples_past) != (length > couples_past)
        if group and (coupled or padded > tokens or padded - real - length > MAX_PADDING * padded):
            yield group
            group, wider, real = [], length, 0
        group.append(row)
        width, real = wider, real + length
    if group:
        yield group


@contextmanager
def kept_gradients(params: list[nn.Parameter]) -> Iterator[None]:
    """The parameters' accumulated gradients as they were, should the block fail. A model's
    first forward_backward since its optim_step has none to copy (the common case)."""
    before = [None if p.grad is None else p.grad.clone() for p in params]
    try:
        yield
    except BaseException:
        for param, grad in zip(params, before, strict=True):
            param.grad = grad
        raise
