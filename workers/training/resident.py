"""The resident base: one frozen model and its tokenizer, loaded once and kept across jobs.

A trainer pays for loading a base once; every job after that attaches a fresh adapter to the
same weights and removes it at the end (`LoraRecipe.cleanup`), so `state_fingerprint` before and
after a job is the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from workers.bases.checkpoints import weights_sha256
from workers.training.device import (
    Precision,
    RequestedPrecision,
    default_device,
    resolve_precision,
    torch_dtype,
)


class ResidentBase:
    """One frozen base model (and its tokenizer) kept in memory across jobs."""

    load_count: ClassVar[int] = 0

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        path: Path,
        sha256: str,
        precision: Precision,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.path = path
        self.sha256 = sha256
        self.precision = precision
        self.dtype = torch_dtype(precision)

    @classmethod
    def load(cls, path: Path, precision: RequestedPrecision = "auto") -> ResidentBase:
        """Load a checkpoint dir once, frozen, in the resolved precision, on the worker device."""
        path = Path(path)
        device = default_device()
        resolved = resolve_precision(precision, device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(resolved), attn_implementation="sdpa"
        )
        model.to(device)
        model.requires_grad_(False)
        model.eval()
        cls.load_count += 1
        return cls(model, tokenizer, path, weights_sha256(path), resolved)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def state_fingerprint(self) -> str:
        """sha256 over names, dtypes, shapes and bytes of every parameter and buffer in memory."""
        digest = hashlib.sha256()
        tensors = [*self.model.named_parameters(), *self.model.named_buffers()]
        for name, tensor in sorted(tensors, key=lambda item: item[0]):
            data = tensor.detach().contiguous().cpu()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
