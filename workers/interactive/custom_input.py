"""A forward_backward whose loss the session uploaded (`loss_fn: custom`): the datums read for
it and the loss run on each (`custom_loss.CustomLoss`, the graph the SDK traced, rebuilt from
the operations the server allows).

The API put the stored loss in the call's request (`forward_backward_input.custom_loss`: its
id, name, inputs with their ranks, and graph), having checked that the model is of the loss's
session and that each datum carries the inputs at their ranks; this reads them again with their
values. A datum's `target_tokens` have the rank of the loss's logprobs: (N,) for one target a
position, (N, K) for K. The other inputs keep the dtype they were sent in (int64 indices for a
`gather`, say) and may have any shape of their declared rank; inputs the loss does not read are
not read (the SDK sends a datum as it was given).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from control_plane.loss_graphs import LossGraphError
from workers.interactive.custom_loss import CustomLoss
from workers.interactive.losses import (
    Datum,
    DatumLoss,
    InteractiveError,
    TensorDict,
    check_targets,
    read_tensor,
    read_tokens,
)


@dataclass(frozen=True)
class CustomLossFn:
    """A session's loss as a forward_backward computes it per datum: its scalar loss (as
    float32, summed with the other datums'), no elementwise loss, and its metrics."""

    loss: CustomLoss

    @property
    def name(self) -> str:
        return self.loss.name

    def datum(self, target_logprobs: torch.Tensor, inputs: TensorDict) -> DatumLoss:
        read = {name: inputs[name] for name in self.loss.input_names}
        loss, metrics = self.loss(target_logprobs, read)  # a 0-dim loss
        return DatumLoss(loss.to(torch.float32), {}, metrics)


def read_custom_input(
    fwd_input: Mapping[str, Any], vocab_size: int
) -> tuple[CustomLossFn, list[Datum]]:
    """The session's loss and the datums of a ForwardBackwardInput with `loss_fn: custom`."""
    stored = fwd_input.get("custom_loss")
    if not isinstance(stored, Mapping):
        raise InteractiveError(
            "a custom loss's forward_backward must be asked through the API, which adds the "
            "session's loss to it"
        )
    try:
        loss = CustomLoss.build(stored.get("name"), stored.get("inputs"), stored.get("graph"))
    except LossGraphError as exc:
        raise InteractiveError(f"custom loss {stored.get('id')}: {exc}") from None
    data = fwd_input.get("data")
    if not isinstance(data, list) or not data:
        raise InteractiveError("'data' must be a non-empty list of datums")
    return CustomLossFn(loss), [
        _read_datum(item, i, loss, vocab_size) for i, item in enumerate(data)
    ]


def _read_datum(item: Any, index: int, loss: CustomLoss, vocab_size: int) -> Datum:
    where = f"data[{index}]"
    if not isinstance(item, Mapping) or not isinstance(item.get("loss_fn_inputs"), Mapping):
        raise InteractiveError(f"{where} must be a Datum with loss_fn_inputs")
    tokens = read_tokens(item.get("model_input"), vocab_size, f"{where}.model_input")
    raw = item["loss_fn_inputs"]
    ranks = dict(loss.inputs)
    wanted = {"target_tokens": ranks["logprobs"]} | {name: ranks[name] for name in loss.input_names}
    inputs: TensorDict = {}
    for key, rank in wanted.items():
        if key not in raw:
            raise InteractiveError(
                f"{where} has no loss_fn_inputs[{key!r}], which custom loss {loss.name!r} reads"
            )
        tensor = read_tensor(raw[key], f"{where}.loss_fn_inputs.{key}")
        if tensor.dim() != rank:
            raise InteractiveError(
                f"{where}: loss_fn_inputs[{key!r}] has shape {list(tensor.shape)}; custom loss "
                f"{loss.name!r} declared it with rank {rank}"
            )
        inputs[key] = tensor
    check_targets(inputs["target_tokens"], len(tokens), (ranks["logprobs"],), vocab_size, where)
    return Datum(tokens, inputs)
