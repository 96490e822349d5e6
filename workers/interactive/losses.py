"""What a forward_backward call asks for: Tinker's datums read from their JSON wire shape, and
the built-in losses computed over the model's logprobs of the target tokens.

Tinker's alignment: position i of a datum's `model_input` predicts `target_tokens[i]` (the
caller shifted the sequence by one already), so the targets have the input's length N, or the
shape (N, K) for K candidate tokens per position (top-K distillation with `cross_entropy`).
Every other `loss_fn_inputs` tensor has the targets' shape. A loss is a sum over positions, never
a mean, so that a batch split across calls accumulates to the same gradient as the whole batch.

The wire is read strictly where a mistake would silently change the loss (unknown or misshaped
`loss_fn_inputs`, tokens outside the vocabulary): the message says what to send instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

TensorDict = dict[str, torch.Tensor]
_DTYPES = {"int64": torch.int64, "float32": torch.float32}


class InteractiveError(Exception):
    """A request the engine refuses (bad shapes, unknown model, unsupported loss): message a
    person can act on. The loop records it as the call's user error."""


def read_tokens(model_input: Any, vocab_size: int, what: str) -> list[int]:
    """The token ids of a ModelInput (`{"chunks": [{"type": "encoded_text", "tokens": [...]}]}`)."""
    chunks = model_input.get("chunks") if isinstance(model_input, Mapping) else None
    if not isinstance(chunks, list):
        raise InteractiveError(f"{what} must be a ModelInput: an object with a list of 'chunks'")
    tokens: list[int] = []
    for chunk in chunks:
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, Mapping) else None
        if kind != "encoded_text":
            raise InteractiveError(
                f"{what} has a chunk of type {kind!r}; this base reads text only: send "
                "'encoded_text' chunks of token ids"
            )
        tokens.extend(_token_ids(chunk.get("tokens"), vocab_size, what))
    if not tokens:
        raise InteractiveError(f"{what} has no tokens")
    return tokens


def _token_ids(values: Any, vocab_size: int, what: str) -> list[int]:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise InteractiveError(f"{what}: 'tokens' must be a list of integer token ids")
    outside = [v for v in values if not 0 <= v < vocab_size]
    if outside:
        raise InteractiveError(
            f"{what} has token ids outside this base's vocabulary of {vocab_size}: {outside[:5]}"
        )
    return values


def read_tensor(value: Any, name: str) -> torch.Tensor:
    """A TensorData (`{"data", "dtype", "shape"}`, dense or sparse CSR) as a CPU tensor."""
    if not isinstance(value, Mapping) or not isinstance(value.get("data"), list):
        raise InteractiveError(f"{name} must be a TensorData: an object with 'data' and 'dtype'")
    dtype = _DTYPES.get(value.get("dtype", ""))
    if dtype is None:
        raise InteractiveError(f"{name} has dtype {value.get('dtype')!r}; use 'int64' or 'float32'")
    shape = value.get("shape")
    try:
        data = torch.tensor(value["data"], dtype=dtype)
        if value.get("sparse_crow_indices") is not None:
            # The SDK sends 2-D target_tokens and weights as CSR; absent entries are 0.
            return torch.sparse_csr_tensor(
                torch.tensor(value["sparse_crow_indices"], dtype=torch.int64),
                torch.tensor(value.get("sparse_col_indices"), dtype=torch.int64),
                data,
                shape,
            ).to_dense()
        return data.reshape(shape) if shape is not None else data
    except (RuntimeError, TypeError, ValueError) as error:
        raise InteractiveError(f"{name} is not a valid {value['dtype']} tensor: {error}") from None


def tensor_data(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor as TensorData JSON (float32 or int64, with its shape)."""
    floating = tensor.is_floating_point()
    values = tensor.detach().to("cpu", torch.float32 if floating else torch.int64)
    return {
        "data": values.flatten().tolist(),
        "dtype": "float32" if floating else "int64",
        "shape": list(values.shape),
    }


@dataclass(frozen=True)
class LossFn:
    """A built-in loss: the `loss_fn_inputs` it takes and its per-position loss, given the
    model's logprobs of the target tokens and those inputs (on the model's device)."""

    name: str
    required: frozenset[str]
    optional: frozenset[str]
    multi_target: bool  # whether targets may have the shape (N, K)
    elementwise: Callable[[torch.Tensor, TensorDict], torch.Tensor]


def _cross_entropy(target_logprobs: torch.Tensor, inputs: TensorDict) -> torch.Tensor:
    weights = inputs.get("weights")
    return -target_logprobs * (weights if weights is not None else 1.0)


def _importance_sampling(target_logprobs: torch.Tensor, inputs: TensorDict) -> torch.Tensor:
    # REINFORCE corrected for the sampler being another (older) policy: the ratio of the
    # trained model's probability of each sampled token to the sampler's.
    ratio = torch.exp(target_logprobs - inputs["logprobs"])
    return -ratio * inputs["advantages"]


LOSSES: dict[str, LossFn] = {
    loss.name: loss
    for loss in (
        LossFn(
            name="cross_entropy",
            required=frozenset({"target_tokens"}),
            # 1 where a caller sends no weights (the SDK's own `forward` example sends none)
            optional=frozenset({"weights"}),
            multi_target=True,
            elementwise=_cross_entropy,
        ),
        LossFn(
            name="importance_sampling",
            required=frozenset({"target_tokens", "logprobs", "advantages"}),
            # Tinker's formula has no weights (a zero advantage masks a position), yet its
            # docs' RL datum carries them: accepted, and they take no part.
            optional=frozenset({"weights"}),
            multi_target=False,
            elementwise=_importance_sampling,
        ),
    )
}


@dataclass(frozen=True)
class Datum:
    """One training sequence: its input tokens and the loss's inputs (targets included)."""

    tokens: list[int]
    inputs: TensorDict

    @property
    def targets(self) -> torch.Tensor:
        return self.inputs["target_tokens"]


def read_forward_input(fwd_input: Any, vocab_size: int) -> tuple[LossFn, list[Datum]]:
    """The loss and the datums of a ForwardBackwardInput, checked against the loss's inputs."""
    if not isinstance(fwd_input, Mapping):
        raise InteractiveError("the request must be a ForwardBackwardInput object")
    loss = LOSSES.get(fwd_input.get("loss_fn"))  # type: ignore[arg-type]
    if loss is None:
        raise InteractiveError(
            f"loss_fn {fwd_input.get('loss_fn')!r} is not supported here; "
            f"use one of {sorted(LOSSES)} (or forward_backward_custom, which runs on them)"
        )
    if fwd_input.get("loss_fn_config"):
        raise InteractiveError(f"{loss.name} takes no loss_fn_config; send null")
    data = fwd_input.get("data")
    if not isinstance(data, list) or not data:
        raise InteractiveError("'data' must be a non-empty list of datums")
    return loss, [_read_datum(item, i, loss, vocab_size) for i, item in enumerate(data)]


def _read_datum(item: Any, index: int, loss: LossFn, vocab_size: int) -> Datum:
    where = f"data[{index}]"
    if not isinstance(item, Mapping):
        raise InteractiveError(f"{where} must be a Datum object")
    tokens = read_tokens(item.get("model_input"), vocab_size, f"{where}.model_input")
    raw = item.get("loss_fn_inputs")
    if not isinstance(raw, Mapping):
        raise InteractiveError(f"{where}.loss_fn_inputs must be an object of TensorData")
    given = set(raw)
    missing = sorted(loss.required - given)
    unknown = sorted(given - loss.required - loss.optional)
    if missing or unknown:
        takes = sorted(loss.required) + [f"{k} (optional)" for k in sorted(loss.optional)]
        problem = f"lacks {missing}" if missing else f"has inputs {unknown} it does not use"
        raise InteractiveError(f"{where}: {loss.name} {problem}; it takes {takes}")
    inputs = {
        key: read_tensor(value, f"{where}.loss_fn_inputs.{key}") for key, value in raw.items()
    }
    targets = inputs["target_tokens"]
    n = len(tokens)
    allowed = f"({n},) or ({n}, K)" if loss.multi_target else f"({n},)"
    shaped = targets.shape[:1] == (n,) and targets.dim() in ((1, 2) if loss.multi_target else (1,))
    if targets.dtype != torch.int64 or not shaped:
        raise InteractiveError(
            f"{where}: target_tokens must be int64 of shape {allowed}, one target per input "
            f"token (the next token of the sequence), got {targets.dtype} {list(targets.shape)}"
        )
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < vocab_size:
        raise InteractiveError(f"{where}: target_tokens outside the vocabulary of {vocab_size}")
    for key, tensor in inputs.items():
        if key == "target_tokens":
            continue
        if tensor.shape != targets.shape:
            raise InteractiveError(
                f"{where}: {key} has shape {list(tensor.shape)}; it must match target_tokens "
                f"{list(targets.shape)}"
            )
        if not torch.isfinite(tensor.float()).all():
            raise InteractiveError(f"{where}: {key} has values that are not finite numbers")
        inputs[key] = tensor.to(torch.float32)
    return Datum(tokens, inputs)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, from logits (N, V) and targets (N,) or (N, K).

    Gathered logits minus the logsumexp: the (N, V) log-softmax is never materialised, which
    matters with a large vocabulary."""
    logits = logits.float()
    flat = targets.reshape(targets.shape[0], -1)
    picked = logits.gather(-1, flat) - torch.logsumexp(logits, dim=-1, keepdim=True)
    return picked.reshape(targets.shape)
