"""One tokenized training example: what formatting produces and the kernels consume.

It lives here, below both, so that the kernels (packing) need nothing from the training package
above them; `workers.training.formatting` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
"""The label of a token that carries no loss (the Hugging Face and PyTorch convention)."""


@dataclass(frozen=True)
class TokenizedExample:
    """One training example: token ids and, aligned with them, the label of each (-100: none)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError("input_ids and labels must have the same length")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trainable_tokens(self) -> int:
        """How many tokens are predicted with a loss (the first token is never predicted)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)

    def truncated(self, length: int) -> TokenizedExample:
        """Its first `length` tokens (itself when it is no longer)."""
        if len(self) <= length:
            return self
        return TokenizedExample(self.input_ids[:length], self.labels[:length])
