"""Supervised fine-tuning's objective: next-token cross-entropy on the trained tokens.

A step's loss is the mean over every trained token of the step (not a mean of micro-batch
means), so the gradient does not depend on how the step is split across micro-batches, rows or
ranks. A row's loss never holds its logits (`LinearCrossEntropy`, in chunks, its gradient
computed in the same pass). The other objective a recipe takes is DPO's (`preference`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from workers.kernels.example import TokenizedExample
from workers.kernels.packing import (
    LinearCrossEntropy,
    LogitsWorkspace,
    pack,
    packed_hidden_states,
    rows_of_tokens,
)
from workers.training.formatting import TokenizedDataset

EVAL_ROW_TOKENS = 8192  # tokens per packed row at evaluation time


class RowObjective:
    """What an objective computes its rows' losses with: the model's backbone and vocabulary
    projection, the device and the run's autocast."""

    def __init__(
        self, backbone: nn.Module, lm_head: nn.Module, device: Any, autocast: Callable[[], Any]
    ) -> None:
        self.backbone, self.lm_head = backbone, lm_head
        self.device, self.autocast = device, autocast


class NextTokenObjective(RowObjective):
    """A supervised job's loss, and what it reports (nothing beside the loss)."""

    def __init__(
        self, backbone: nn.Module, lm_head: nn.Module, device: Any, autocast: Callable[[], Any]
    ) -> None:
        super().__init__(backbone, lm_head, device, autocast)
        self.workspace = LogitsWorkspace()  # its buffers go with the job

    def denominator(self, batch: Sequence[TokenizedExample]) -> int:
        return sum(e.trainable_tokens for e in batch)

    def loss_sum(self, examples: Sequence[TokenizedExample]) -> torch.Tensor:
        """Summed next-token cross-entropy over the trained tokens of `examples`, packed in a
        row."""
        row = pack(examples, self.device)
        selected = packed_hidden_states(self.backbone, row)[row.target_positions]
        return LinearCrossEntropy.apply(selected, self.lm_head.weight, row.targets, self.workspace)

    def step_metrics(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def evaluate(self, dataset: TokenizedDataset) -> tuple[float, dict[str, float]]:
        """The token-mean loss over the evaluation set."""
        total, count = 0.0, 0
        for rows in rows_of_tokens(dataset.examples, EVAL_ROW_TOKENS):
            with self.autocast():
                total += self.loss_sum(rows).item()
            count += sum(e.trainable_tokens for e in rows)
        return total / count, {}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        pass
