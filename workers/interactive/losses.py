"""What a forward_backward call asks for: Tinker's datums read from their JSON wire shape, and
the built-in losses computed over the model's logprobs of the target tokens: cross-entropy, and
the RL losses (importance sampling, PPO, CISPO, DRO, GSPO-token) with Tinker's formulas and
settings. Tinker's `stable_reinforce` is not among them (its formula is not documented): it is
refused, as is any other name, and a caller writes it with `forward_backward_custom`.

Tinker's alignment: position i of a datum's `model_input` predicts `target_tokens[i]` (the
caller shifted the sequence by one already), so the targets have the input's length N, or the
shape (N, K) for K candidate tokens per position (top-K distillation with `cross_entropy`).
Every other `loss_fn_inputs` tensor has the targets' shape. A loss is a sum over positions, never
a mean, so that a batch split across calls accumulates to the same gradient as the whole batch.

The wire is read strictly where a mistake would silently change the loss (unknown or misshaped
`loss_fn_inputs` or `loss_fn_config`, tokens outside the vocabulary): the message says what to
send instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

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


def read_tensor(value: Any, name: str, *, pad: int = 0) -> torch.Tensor:
    """A TensorData (`{"data", "dtype", "shape"}`, dense or sparse CSR) as a CPU tensor; a sparse
    one's cells it does not list read `pad`."""
    if not isinstance(value, Mapping) or not isinstance(value.get("data"), list):
        raise InteractiveError(f"{name} must be a TensorData: an object with 'data' and 'dtype'")
    dtype = _DTYPES.get(value.get("dtype", ""))
    if dtype is None:
        raise InteractiveError(f"{name} has dtype {value.get('dtype')!r}; use 'int64' or 'float32'")
    shape = value.get("shape")
    try:
        data = torch.tensor(value["data"], dtype=dtype)
        if value.get("sparse_crow_indices") is not None:
            # The SDK sends 2-D target_tokens and weights as CSR; absent entries are 0 there.
            # torch densifies with 0, so the values are shifted by `pad` and back. Its invariants
            # are checked: indices that break them would read and write out of bounds.
            dense = torch.sparse_csr_tensor(
                torch.tensor(value["sparse_crow_indices"], dtype=torch.int64),
                torch.tensor(value.get("sparse_col_indices"), dtype=torch.int64),
                data - pad,
                shape,
                check_invariants=True,
            ).to_dense()
            return dense + pad
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
    """A built-in loss: the `loss_fn_inputs` it takes, the `loss_fn_config` it reads (each
    setting's default, None where it has none) and its per-position loss, given the model's
    logprobs of the target tokens, those inputs (on the model's device) and the settings."""

    name: str
    required: frozenset[str]
    optional: frozenset[str]
    multi_target: bool  # whether targets may have the shape (N, K)
    formula: Callable[[torch.Tensor, TensorDict, Mapping[str, float]], torch.Tensor]
    defaults: Mapping[str, float | None] = field(default_factory=dict)
    settings: Mapping[str, float] = field(default_factory=dict)  # a call's, defaults filled in

    def elementwise(self, target_logprobs: torch.Tensor, inputs: TensorDict) -> torch.Tensor:
        return self.formula(target_logprobs, inputs, self.settings)

    def datum(self, target_logprobs: torch.Tensor, inputs: TensorDict) -> DatumLoss:
        elementwise = self.elementwise(target_logprobs, inputs)
        return DatumLoss(elementwise.sum(), {"elementwise_loss": tensor_data(elementwise)}, {})


@dataclass(frozen=True)
class DatumLoss:
    """One datum's loss (a scalar that backward runs through), what its output holds besides
    the logprobs, and its metrics (a custom loss's `custom/<name>:sum|mean`)."""

    loss: torch.Tensor
    outputs: dict[str, Any]
    metrics: dict[str, torch.Tensor]


class Loss(Protocol):
    """What a forward_backward computes per datum: a built-in `LossFn` or a session's custom
    loss (`custom_input.CustomLossFn`)."""

    @property
    def name(self) -> str: ...

    def datum(self, target_logprobs: torch.Tensor, inputs: TensorDict) -> DatumLoss: ...


def _cross_entropy(target_logprobs: torch.Tensor, inputs: TensorDict, _: Any) -> torch.Tensor:
    weights = inputs.get("weights")
    return -target_logprobs * (weights if weights is not None else 1.0)


def _ratio(target_logprobs: torch.Tensor, inputs: TensorDict) -> torch.Tensor:
    """The trained model's probability of each sampled token over the sampler's."""
    return torch.exp(target_logprobs - inputs["logprobs"])


def _importance_sampling(target_logprobs: torch.Tensor, inputs: TensorDict, _: Any) -> torch.Tensor:
    # REINFORCE corrected for the sampler being another (older) policy.
    return -_ratio(target_logprobs, inputs) * inputs["advantages"]


def _clipped_objective(
    ratio: torch.Tensor, advantages: torch.Tensor, config: Mapping[str, float]
) -> torch.Tensor:
    """PPO's loss per position: the ratio times the advantage, or the ratio clipped to
    [clip_low_threshold, clip_high_threshold] times it, whichever is smaller, negated. Where
    the clipped one is smaller the position has no gradient: a step gains nothing from moving
    a probability past the clip."""
    clipped = ratio.clamp(config["clip_low_threshold"], config["clip_high_threshold"])
    return -torch.minimum(ratio * advantages, clipped * advantages)


def _ppo(
    target_logprobs: torch.Tensor, inputs: TensorDict, config: Mapping[str, float]
) -> torch.Tensor:
    # The clipped objective over each token's own ratio.
    return _clipped_objective(_ratio(target_logprobs, inputs), inputs["advantages"], config)


def _cispo(
    target_logprobs: torch.Tensor, inputs: TensorDict, config: Mapping[str, float]
) -> torch.Tensor:
    # The clipped ratio weighs the log-probability's gradient (held constant itself): no
    # token's gradient is zeroed, only its weight bounded.
    ratio = _ratio(target_logprobs, inputs).clamp(
        config["clip_low_threshold"], config["clip_high_threshold"]
    )
    return -ratio.detach() * target_logprobs * inputs["advantages"]


def _dro(
    target_logprobs: torch.Tensor, inputs: TensorDict, config: Mapping[str, float]
) -> torch.Tensor:
    # The policy gradient with a quadratic penalty on the log-ratio to the sampler.
    shift = target_logprobs - inputs["logprobs"]
    return -(target_logprobs * inputs["advantages"] - 0.5 * config["beta"] * shift**2)


def _gspo(
    target_logprobs: torch.Tensor, inputs: TensorDict, config: Mapping[str, float]
) -> torch.Tensor:
    # GSPO-token (Zheng et al. 2025, arXiv 2507.18071): the clipped objective over one ratio
    # for the whole sequence, the geometric mean of its tokens' ratios over the positions that
    # sequence_ratio_mask marks, so that the clip keeps or drops the sequence as a whole. Every
    # token carries that ratio's value (held constant) times exp(lp - sg(lp)), which is 1 in
    # value and gives the gradient of the token's own log-probability: per-token advantages
    # still work. Without a mask, the marked positions are those with a nonzero advantage (a
    # zero advantage masks a position in Tinker's RL datums). A mask that marks nothing gives
    # a log-ratio of 0, where an empty mean would give NaN.
    mask = inputs.get("sequence_ratio_mask")
    marked = ((mask if mask is not None else inputs["advantages"]) != 0).float()
    shift = (target_logprobs.detach() - inputs["logprobs"]) * marked
    log_ratio = shift.sum() / marked.sum().clamp(min=1.0)
    ratio = torch.exp(log_ratio + target_logprobs - target_logprobs.detach())
    return _clipped_objective(ratio, inputs["advantages"], config)


_RL_INPUTS = frozenset({"target_tokens", "logprobs", "advantages"})
# Tinker's RL datums carry weights, yet its RL formulas have none (a zero advantage masks a
# position): accepted, and they take no part.
_RL_OPTIONAL = frozenset({"weights"})

LOSSES: dict[str, LossFn] = {
    loss.name: loss
    for loss in (
        LossFn(
            name="cross_entropy",
            required=frozenset({"target_tokens"}),
            # 1 where a caller sends no weights (the SDK's own `forward` example sends none)
            optional=frozenset({"weights"}),
            multi_target=True,
            formula=_cross_entropy,
        ),
        LossFn("importance_sampling", _RL_INPUTS, _RL_OPTIONAL, False, _importance_sampling),
        LossFn(
            "ppo",
            _RL_INPUTS,
            _RL_OPTIONAL,
            False,
            _ppo,
            defaults={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        ),
        # One-sided by default: the lower bound off, the weight capped at 4 (as Tinker's).
        LossFn(
            "cispo",
            _RL_INPUTS,
            _RL_OPTIONAL,
            False,
            _cispo,
            defaults={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
        ),
        LossFn("dro", _RL_INPUTS, _RL_OPTIONAL, False, _dro, defaults={"beta": None}),
        # No default clip: GSPO's ranges (3e-4 and 4e-4 around 1 in its paper) are far from
        # PPO's, and Tinker's defaults are not known here, so a caller sends both.
        LossFn(
            "gspo",
            _RL_INPUTS,
            _RL_OPTIONAL | {"sequence_ratio_mask"},
            False,
            _gspo,
            defaults={"clip_low_threshold": None, "clip_high_threshold": None},
        ),
    )
}


def _read_settings(loss: LossFn, raw: Any) -> dict[str, float]:
    """A call's `loss_fn_config` for `loss`, each setting a finite number >= 0, the defaults
    filled in; refused, saying what the loss reads, when it names another setting or lacks
    one without a default."""
    raw = raw or {}
    reads = sorted(loss.defaults) or "nothing"
    if not isinstance(raw, Mapping) or set(raw) - set(loss.defaults):
        unknown = sorted(raw) if isinstance(raw, Mapping) else raw
        raise InteractiveError(f"{loss.name}'s loss_fn_config reads {reads}, not {unknown}")
    settings: dict[str, float] = {}
    for key, default in loss.defaults.items():
        value = raw.get(key, default)
        if value is None:
            raise InteractiveError(f"{loss.name} needs loss_fn_config {{'{key}': a number}}")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not (math.isfinite(value) and value >= 0)
        ):
            raise InteractiveError(
                f"{loss.name}'s loss_fn_config {key} must be a finite number >= 0, got {value!r}"
            )
        settings[key] = float(value)
    if settings.get("clip_low_threshold", 0.0) > settings.get("clip_high_threshold", math.inf):
        raise InteractiveError(
            f"{loss.name}'s clip_low_threshold must not exceed its clip_high_threshold"
        )
    return settings


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
    loss = replace(loss, settings=_read_settings(loss, fwd_input.get("loss_fn_config")))
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
    check_targets(targets, len(tokens), (1, 2) if loss.multi_target else (1,), vocab_size, where)
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


def check_targets(
    targets: torch.Tensor, n: int, ranks: tuple[int, ...], vocab_size: int, where: str
) -> None:
    """A datum's `target_tokens`: int64, one row per input token (`n`), of one of `ranks` (1:
    (n,), 2: (n, K)), each a token of the vocabulary; refused saying what to send."""
    shaped = targets.shape[:1] == (n,) and targets.dim() in ranks
    if targets.dtype != torch.int64 or not shaped:
        allowed = " or ".join(f"({n},)" if rank == 1 else f"({n}, K)" for rank in ranks)
        raise InteractiveError(
            f"{where}: target_tokens must be int64 of shape {allowed}, one target per input "
            f"token (the next token of the sequence), got {targets.dtype} {list(targets.shape)}"
        )
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < vocab_size:
        raise InteractiveError(f"{where}: target_tokens outside the vocabulary of {vocab_size}")


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position, from logits (N, V) and targets (N,) or (N, K).

    Gathered logits minus the logsumexp: the (N, V) log-softmax is never materialised, which
    matters with a large vocabulary."""
    logits = logits.float()
    flat = targets[:, None] if targets.dim() == 1 else targets  # also with no position
    picked = logits.gather(-1, flat) - torch.logsumexp(logits, dim=-1, keepdim=True)
    return picked.reshape(targets.shape)
