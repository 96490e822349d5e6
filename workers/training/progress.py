"""Where a training run stands (saved in its checkpoints) and what each optimizer step reports."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """The loop's position; saved in checkpoints."""

    global_step: int = 0
    trained_tokens: int = 0
    last_loss: float | None = None
    started: float = field(default_factory=time.perf_counter)
    first_step: int = 0

    def advance(
        self, tokens: int, loss: float, *, elapsed: float, total_steps: int, steps_per_epoch: int
    ) -> tuple[str, dict[str, Any]]:
        """Count one optimizer step of `tokens` tokens that took `elapsed` seconds; returns its
        metrics event (message, data), to which the caller adds what it alone knows."""
        self.global_step += 1
        self.trained_tokens += tokens
        self.last_loss = loss
        per_step = (time.perf_counter() - self.started) / (self.global_step - self.first_step)
        return f"step {self.global_step}/{total_steps} loss {loss:.4f}", {
            "step": self.global_step,
            "total_steps": total_steps,
            "epoch": self.global_step / steps_per_epoch,
            "train_loss": loss,
            "tokens": tokens,
            "trained_tokens": self.trained_tokens,
            "tokens_per_s": tokens / elapsed,
            "step_s": elapsed,
            "fraction_done": self.global_step / total_steps,
            "eta_s": per_step * (total_steps - self.global_step),
        }
