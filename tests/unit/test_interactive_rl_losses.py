"""Tinker's RL losses beyond importance sampling, on the real engine: PPO's clipped objective,
CISPO's clipped, held-constant weight and DRO's quadratic penalty, each with its
`loss_fn_config`. Each is checked by its loss value against its formula over the model's own
logprobs, and by its gradient (the norm an optim_step finds) against a loss whose gradient is
known to equal it at that point: importance sampling with the clipped tokens' advantages zeroed
(PPO), cross-entropy weighted by the clipped ratio times the advantage (CISPO), and by the
advantage less beta times the log-ratio (DRO). The tiny test base, fp32, CPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.fixtures.testbase import TEST_BASE_PATH
from tests.unit.test_interactive_engine import (
    LR,
    SEQUENCE,
    batch,
    datum,
    logprobs,
    rl_datum,
)
from workers.interactive.engine import InteractiveEngine
from workers.training.resident import ResidentBase

N = len(SEQUENCE) - 1
# Advantages of both signs, none zero.
ADVANTAGES = torch.tensor([(-1.0) ** i * (0.5 + i / N) for i in range(N)])


@pytest.fixture
def interactive() -> InteractiveEngine:
    return InteractiveEngine(ResidentBase.load(TEST_BASE_PATH, "fp32"))


def _current(engine: InteractiveEngine) -> torch.Tensor:
    """The logprobs of SEQUENCE's targets under a fresh model (seed 0: every model here)."""
    engine.create("probe", rank=4, seed=0)
    current = logprobs(engine.forward("probe", batch(datum(SEQUENCE))))
    engine.drop("probe")
    return current


def _loss_and_norm(engine: InteractiveEngine, fwd_input: dict[str, Any]) -> tuple[float, float]:
    """A fresh model's loss on `fwd_input` and the norm of the gradient it leaves."""
    engine.create("m", rank=4, seed=0)
    loss = engine.forward_backward("m", fwd_input)["metrics"]["loss:sum"]
    norm = engine.optim_step("m", LR)["metrics"]["grad_norm:mean"]
    engine.drop("m")
    return float(loss), float(norm)


def _rl(loss_fn: str, sampler: torch.Tensor, config: dict[str, float] | None = None) -> Any:
    fwd = batch(rl_datum(sampler.tolist(), ADVANTAGES.tolist()), loss_fn=loss_fn)
    return {**fwd, "loss_fn_config": config}


def _weighted(weights: torch.Tensor) -> dict[str, Any]:
    """Cross-entropy weighted per token: its gradient is -weight times d logprob."""
    return batch(datum(SEQUENCE, weights.tolist()))


def _same(measured: tuple[float, float], loss: float, norm: float) -> None:
    assert measured[0] == pytest.approx(loss, rel=1e-5, abs=1e-5)
    assert measured[1] == pytest.approx(norm, rel=1e-4)
    assert measured[1] > 0


def test_ppo_equals_importance_sampling_within_its_clip_and_stops_the_gradient_past_it(
    interactive: InteractiveEngine,
) -> None:
    current = _current(interactive)
    # Ratios within [0.8, 1.2]: nothing clipped, the importance-sampling loss and gradient.
    near = current + torch.linspace(-0.15, 0.15, N)
    _same(
        _loss_and_norm(interactive, _rl("ppo", near)),
        *_loss_and_norm(interactive, _rl("importance_sampling", near)),
    )
    # Ratios of e (the sampler found every token less likely): the positive advantages' tokens
    # are clipped to 1.2 (no gradient), the negative ones keep the ratio's.
    far = current - 1.0
    ratio = torch.exp(current - far)
    expected = -torch.minimum(ratio * ADVANTAGES, ratio.clamp(0.8, 1.2) * ADVANTAGES).sum()
    unclipped = ADVANTAGES.clamp(max=0)
    reference = {
        **batch(rl_datum(far.tolist(), unclipped.tolist()), loss_fn="importance_sampling"),
    }
    _, norm = _loss_and_norm(interactive, reference)
    _same(_loss_and_norm(interactive, _rl("ppo", far)), float(expected), norm)
    # A wider clip of its own (loss_fn_config): nothing clipped at ratios of e.
    wide = {"clip_low_threshold": 0.5, "clip_high_threshold": 3.0}
    _same(
        _loss_and_norm(interactive, _rl("ppo", far, wide)),
        *_loss_and_norm(interactive, _rl("importance_sampling", far)),
    )


def test_cispo_weighs_the_logprob_by_the_clipped_ratio_held_constant(
    interactive: InteractiveEngine,
) -> None:
    current = _current(interactive)
    # Ratios of e^2, past CISPO's default cap of 4: each token's gradient is -4 A d logprob,
    # cross-entropy's weighted by 4 A, and so is its loss.
    far = current - 2.0
    capped = 4.0 * ADVANTAGES
    _same(
        _loss_and_norm(interactive, _rl("cispo", far)),
        *_loss_and_norm(interactive, _weighted(capped)),
    )
    # Within the clip the weight is the ratio itself: importance sampling's gradient (held
    # constant or not, the gradients agree only then), with its own loss value.
    near = current + torch.linspace(-0.3, 0.3, N)
    ratio = torch.exp(current - near)
    _, norm = _loss_and_norm(interactive, _rl("importance_sampling", near))
    _same(
        _loss_and_norm(interactive, _rl("cispo", near)),
        float(-(ratio * current * ADVANTAGES).sum()),
        norm,
    )
    # A cap of its own: 2.
    config = {"clip_low_threshold": 0.0, "clip_high_threshold": 2.0}
    _same(
        _loss_and_norm(interactive, _rl("cispo", far, config)),
        *_loss_and_norm(interactive, _weighted(2.0 * ADVANTAGES)),
    )


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_dro_is_the_policy_gradient_less_a_quadratic_penalty_on_the_log_ratio(
    interactive: InteractiveEngine, beta: float
) -> None:
    current = _current(interactive)
    sampler = current - torch.linspace(-1.0, 1.0, N)
    shift = current - sampler
    expected = -(current * ADVANTAGES - 0.5 * beta * shift**2).sum()
    _, norm = _loss_and_norm(interactive, _weighted(ADVANTAGES - beta * shift))
    _same(_loss_and_norm(interactive, _rl("dro", sampler, {"beta": beta})), float(expected), norm)
