"""The SDK's other paths to the same numbers, on the real executor with the official `tinker`
SDK: custom losses, a function the SDK runs on the client (a forward for the logprobs, the loss
and its gradient in the client's torch, then a `cross_entropy` backward weighted by the negated
gradient), so the platform must take any real weights, negative ones included, and give the
gradient a built-in loss would, or a traced loss the server runs (`create_custom_loss`,
`test_tinker_custom_losses.py`), which must give the same numbers; and a
sampler's `compute_logprobs`, which must give what the trained model's forward gives, from
this process or another one that has only the sampler's handle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tinker
import torch
from tinker import types

from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.tinker_harness import DATUM, SEQUENCE, sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

STEP = types.AdamParams(learning_rate=1e-2)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _loss(training: Any) -> float:
    return float(training.forward([DATUM], "cross_entropy").result(timeout=120).metrics["loss:sum"])


def _negative_log_likelihood(data: list[types.Datum], logprobs: list[torch.Tensor]) -> Any:
    """The built-in cross entropy, written as a client's custom loss."""
    total = sum(
        -(lp * torch.tensor(d.loss_fn_inputs["weights"].data)).sum()
        for d, lp in zip(data, logprobs, strict=True)
    )
    return total, {"custom/nll:sum": float(total)}


def test_a_custom_loss_trains_as_the_same_builtin_loss_and_a_negative_advantage_unlearns(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    with sdk_service(live_url, tenant_a.member) as service:
        builtin, custom, unlearning = (
            service.create_lora_training_client(base_model=executor, rank=4, seed=0).result(
                timeout=120
            )
            for _ in range(3)
        )
        start = _loss(builtin)
        assert _loss(custom) == pytest.approx(start, rel=1e-6)  # one seed, one start

        # Cross entropy as a custom loss: the same loss reported, the same step taken.
        for _ in range(2):
            reference = builtin.forward_backward([DATUM], "cross_entropy").result(timeout=120)
            builtin.optim_step(STEP).result(timeout=120)
            out = custom.forward_backward_custom([DATUM], _negative_log_likelihood)
            out = out.result(timeout=120)
            assert out.metrics["custom/nll:sum"] == pytest.approx(
                reference.metrics["loss:sum"], rel=1e-4
            )
            custom.optim_step(STEP).result(timeout=120)
        assert _loss(custom) == pytest.approx(_loss(builtin), rel=1e-3)
        assert _loss(builtin) < start

        # A traced loss (`create_custom_loss`) pushing the datum away: the backward's weights
        # are negative (the negated gradient of +sum(logprobs * weights)), and the datum
        # becomes less likely (a server that dropped the sign would make it more likely).
        def push_away(logprobs: torch.Tensor, weights: torch.Tensor) -> Any:
            loss = (logprobs * weights).sum()
            return loss, {"custom/push_away:sum": loss}

        handle = service.create_custom_loss(
            push_away, input_ranks={"logprobs": 1, "weights": 1}
        ).result(timeout=60)
        for _ in range(2):
            unlearning.forward_backward_custom([DATUM], handle).result(timeout=120)
            unlearning.optim_step(STEP).result(timeout=120)
        assert _loss(unlearning) > start


def test_a_samplers_logprobs_are_the_trained_models_and_its_handle_samples_elsewhere(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    with sdk_service(live_url, tenant_a.member) as service:
        training = service.create_lora_training_client(base_model=executor, rank=4, seed=0).result(
            timeout=120
        )
        for _ in range(2):
            training.forward_backward([DATUM], "cross_entropy").result(timeout=120)
            training.optim_step(STEP).result(timeout=120)
        forward = training.forward([DATUM], "cross_entropy").result(timeout=120)
        trained = forward.loss_fn_outputs[0]["logprobs"].data
        sampler = training.save_weights_and_get_sampling_client()
        prompt = types.ModelInput.from_ints(SEQUENCE)
        computed = sampler.compute_logprobs(prompt).result(timeout=120)
        # The first token has no logprob (nothing before it); each other is the forward's.
        assert computed[0] is None and len(computed) == len(SEQUENCE)
        assert computed[1:] == pytest.approx(trained, rel=1e-3, abs=1e-3)
        base = service.create_sampling_client(base_model=executor)
        untrained = base.compute_logprobs(prompt).result(timeout=120)
        assert sum(untrained[1:]) < sum(computed[1:]) - 1  # training made the sequence likelier

        # An RL rollout worker in another process gets only the sampler's handle (and a key).
        handle = sampler.get_sampler_handle()
        elsewhere = tinker.SamplingClient.from_sampler_handle(
            handle, api_key="tml-" + tenant_a.member
        )
        greedy = types.SamplingParams(max_tokens=4, temperature=0.0)
        start = types.ModelInput.from_ints(SEQUENCE[:6])
        here = sampler.sample(start, 1, greedy).result(timeout=120).sequences[0].tokens
        there = elsewhere.sample(start, 1, greedy).result(timeout=120).sequences[0].tokens
        assert here == there and len(here) >= 1


def _model_and_logprobs(service: Any, executor: str) -> tuple[Any, torch.Tensor]:
    """A fresh training client (seed 0) and its logprobs of DATUM's targets."""
    training = service.create_lora_training_client(base_model=executor, rank=4, seed=0).result(
        timeout=120
    )
    current = training.forward([DATUM], "cross_entropy").result(timeout=120)
    return training, current.loss_fn_outputs[0]["logprobs"].to_torch()


def test_the_rl_losses_take_their_settings_from_the_sdk(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    """PPO, CISPO and DRO from the SDK, with and without a loss_fn_config: each loss is its
    formula over the model's logprobs with the settings sent (or the defaults), and DRO sent
    without its beta fails with what to send."""
    with sdk_service(live_url, tenant_a.member) as service:
        training, logprobs = _model_and_logprobs(service, executor)
        n = len(logprobs)
        advantages = torch.tensor([(-1.0) ** i for i in range(n)])
        sampler = logprobs - 1.0  # every ratio e
        rl = types.Datum(
            model_input=DATUM.model_input,
            loss_fn_inputs={
                "target_tokens": SEQUENCE[1:],
                "logprobs": sampler.tolist(),
                "advantages": advantages.tolist(),
            },
        )
        ratio = torch.exp(logprobs - sampler)

        def loss(loss_fn: str, config: dict[str, float] | None = None) -> float:
            output = training.forward([rl], loss_fn, loss_fn_config=config).result(timeout=120)
            return float(output.metrics["loss:sum"])

        def ppo(low: float, high: float) -> float:
            clipped = ratio.clamp(low, high)
            return float(-torch.minimum(ratio * advantages, clipped * advantages).sum())

        assert loss("ppo") == pytest.approx(ppo(0.8, 1.2), rel=1e-3)
        wide = {"clip_low_threshold": 0.5, "clip_high_threshold": 3.0}
        assert loss("ppo", wide) == pytest.approx(ppo(0.5, 3.0), rel=1e-3)
        assert ppo(0.5, 3.0) != pytest.approx(ppo(0.8, 1.2), rel=1e-2)
        capped = {"clip_low_threshold": 0.0, "clip_high_threshold": 2.0}
        cispo = -(ratio.clamp(0.0, 2.0) * logprobs * advantages).sum()
        assert loss("cispo", capped) == pytest.approx(float(cispo), rel=1e-3)
        dro = -(logprobs * advantages - 0.5 * 0.25 * (logprobs - sampler) ** 2).sum()
        assert loss("dro", {"beta": 0.25}) == pytest.approx(float(dro), rel=1e-3)
        with pytest.raises(tinker.RequestFailedError, match=r"dro needs loss_fn_config \{'beta'"):
            training.forward([rl], "dro").result(timeout=120)


def test_gspo_from_the_sdk_clips_one_sequence_ratio_and_stable_reinforce_is_refused(
    live_url: str, tenant_a: TenantKeys, executor: str
) -> None:
    """GSPO from the SDK with a sequence_ratio_mask: its loss is the formula over the mean
    log-ratio of the positions the mask marks, clipped as sent; sent without its clip (it has
    no default) it fails naming the setting. `stable_reinforce`, which the SDK offers, is
    refused at once with what to use instead."""
    with sdk_service(live_url, tenant_a.member) as service:
        training, logprobs = _model_and_logprobs(service, executor)
        n = len(logprobs)
        advantages = torch.tensor([(-1.0) ** i for i in range(n)])
        mask = torch.tensor([float(i % 3 != 0) for i in range(n)])
        # Each token's log-ratio its own, and 2 where the mask leaves a position out.
        shift = torch.where(mask.bool(), 0.2 + 0.5 * torch.sin(torch.arange(n)), 2.0)
        sampler = logprobs - shift
        gspo = types.Datum(
            model_input=DATUM.model_input,
            loss_fn_inputs={
                "target_tokens": SEQUENCE[1:],
                "logprobs": sampler.tolist(),
                "advantages": advantages.tolist(),
                "sequence_ratio_mask": mask.tolist(),
            },
        )
        ratio = torch.exp((shift * mask).sum() / mask.sum())

        def loss(config: dict[str, float]) -> float:
            output = training.forward([gspo], "gspo", loss_fn_config=config).result(timeout=120)
            return float(output.metrics["loss:sum"])

        def expected(low: float, high: float) -> float:
            clipped = ratio.clamp(low, high)
            return float(-torch.minimum(ratio * advantages, clipped * advantages).sum())

        narrow = {"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}
        assert loss(narrow) == pytest.approx(expected(1 - 3e-4, 1 + 4e-4), rel=1e-3)
        wide = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
        assert loss(wide) == pytest.approx(expected(0.5, 2.0), rel=1e-3)
        assert expected(0.5, 2.0) != pytest.approx(expected(1 - 3e-4, 1 + 4e-4), rel=1e-2)
        with pytest.raises(
            tinker.RequestFailedError, match=r"gspo needs loss_fn_config \{'clip_low_threshold'"
        ):
            training.forward([gspo], "gspo").result(timeout=120)
        with pytest.raises(
            tinker.BadRequestError,
            match=r"loss_fn 'stable_reinforce' is not supported here; use one of \[.*'gspo'.*\] "
            r"\(or forward_backward_custom",
        ):
            training.forward([gspo], "stable_reinforce").result(timeout=120)
