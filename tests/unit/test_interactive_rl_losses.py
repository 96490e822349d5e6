"""Tinker's RL losses beyond importance sampling, on the real engine: PPO's clipped objective,
CISPO's clipped, held-constant weight, DRO's quadratic penalty and GSPO-token's clip of one
sequence ratio, each with its `loss_fn_config`. Each is checked by its loss value against its
formula over the model's own logprobs, and by its gradient (the norm an optim_step finds)
against a loss whose gradient is known to equal it at that point: importance sampling with the
clipped tokens' advantages zeroed (PPO), cross-entropy weighted by the clipped ratio times the
advantage (CISPO), by the advantage less beta times the log-ratio (DRO), and by the sequence
ratio times the advantage of the tokens the clip leaves (GSPO). The tiny test base, fp32, CPU."""

from __future__ import annotations

import math
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
    tensor,
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


# GSPO's sequence ratio reads the positions MASK marks: all but every third.
MASK = torch.tensor([float(i % 3 != 0) for i in range(N)])
# GSPO's paper's clip, 3e-4 below 1 and 4e-4 above, and one that holds e^0.1 and e^-0.1.
NARROW = {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}
WIDE = {"clip_low_threshold": 0.85, "clip_high_threshold": 1.2}


def _gspo(
    sampler: torch.Tensor,
    config: dict[str, float],
    mask: torch.Tensor | None = None,
    advantages: torch.Tensor = ADVANTAGES,
) -> dict[str, Any]:
    rl = rl_datum(sampler.tolist(), advantages.tolist())
    if mask is not None:
        rl["loss_fn_inputs"]["sequence_ratio_mask"] = tensor(mask.tolist(), "float32")
    return {**batch(rl, loss_fn="gspo"), "loss_fn_config": config}


def _sampler(current: torch.Tensor, log_ratio: float) -> torch.Tensor:
    """Sampler logprobs whose mean log-ratio over MASK's positions is `log_ratio`, each token's
    own ratio another (within about e^0.4 of the mean's), and e^2 where MASK leaves a position out:
    a ratio of each token, or of all positions, clips otherwise than the sequence's."""
    spread = 0.4 * torch.sin(torch.arange(N, dtype=torch.float32))
    spread -= (spread * MASK).sum() / MASK.sum()
    return current - torch.where(MASK.bool(), log_ratio + spread, torch.tensor(2.0))


@pytest.mark.parametrize("log_ratio", [0.1, -0.1])
def test_gspo_clips_the_sequence_ratio_and_each_token_keeps_its_own_gradient(
    interactive: InteractiveEngine, log_ratio: float
) -> None:
    current = _current(interactive)
    sampler = _sampler(current, log_ratio)
    ratio = math.exp(log_ratio)  # every token's, in value
    # Within the clip: the loss is -s A at each position, and each token's gradient is
    # -s A d logprob, cross-entropy's weighted by s A.
    _, norm = _loss_and_norm(interactive, _weighted(ratio * ADVANTAGES))
    measured = _loss_and_norm(interactive, _gspo(sampler, WIDE, MASK))
    _same(measured, -ratio * float(ADVANTAGES.sum()), norm)
    # Past the paper's clip (above it for e^0.1, below for e^-0.1): the tokens whose advantage
    # would gain from the ratio moving further take the clip's bound and no gradient; the
    # others keep -s A d logprob.
    bound = NARROW["clip_high_threshold"] if log_ratio > 0 else NARROW["clip_low_threshold"]
    expected = -torch.minimum(ratio * ADVANTAGES, bound * ADVANTAGES).sum()
    kept = ADVANTAGES.clamp(max=0) if log_ratio > 0 else ADVANTAGES.clamp(min=0)
    _, norm = _loss_and_norm(interactive, _weighted(ratio * kept))
    _same(_loss_and_norm(interactive, _gspo(sampler, NARROW, MASK)), float(expected), norm)


def test_gspos_ratio_reads_the_nonzero_advantages_without_a_mask_and_is_1_over_none(
    interactive: InteractiveEngine,
) -> None:
    current = _current(interactive)
    sampler = _sampler(current, 0.1)
    everywhere = torch.ones(N)
    # Without a mask, the positions of a nonzero advantage: all of them here.
    assert _loss_and_norm(interactive, _gspo(sampler, WIDE)) == pytest.approx(
        _loss_and_norm(interactive, _gspo(sampler, WIDE, everywhere)), rel=1e-6
    )
    # Advantages zeroed where MASK leaves a position out: the ratio is MASK's, not all
    # positions' (where the sampler is e^2 away).
    zeroed = ADVANTAGES * MASK
    unmasked = _loss_and_norm(interactive, _gspo(sampler, WIDE, None, zeroed))
    assert unmasked == pytest.approx(
        _loss_and_norm(interactive, _gspo(sampler, WIDE, MASK, zeroed)), rel=1e-6
    )
    assert unmasked[0] == pytest.approx(-math.exp(0.1) * float(zeroed.sum()), rel=1e-5)
    assert _loss_and_norm(interactive, _gspo(sampler, WIDE, everywhere, zeroed))[0] != (
        pytest.approx(unmasked[0], rel=1e-2)
    )
    # A mask that marks nothing: a ratio of 1, clipped up to 1.1, so the negative advantages'
    # tokens take the bound (no gradient) and the positive ones keep -A d logprob.
    above = {"clip_low_threshold": 1.1, "clip_high_threshold": 1.5}
    loss, norm = _loss_and_norm(interactive, _gspo(sampler, above, torch.zeros(N)))
    assert math.isfinite(loss) and math.isfinite(norm)
    expected = -torch.minimum(ADVANTAGES, 1.1 * ADVANTAGES).sum()
    _same(
        (loss, norm),
        float(expected),
        _loss_and_norm(interactive, _weighted(ADVANTAGES.clamp(min=0)))[1],
    )
