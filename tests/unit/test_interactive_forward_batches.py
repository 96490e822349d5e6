"""Several models' forward_backward and forward calls run together
(`InteractiveEngine.forward_many`): their datums share each forward pass, each row through its
own model's adapter, and one backward pass gives each model the gradient it would have had
alone, so the outputs, the losses, the gradient norms and the weights after each model's
optim_step equal those of the calls run one at a time; a refused call fails alone; a batch
that fails part way leaves every model's gradients as they were. The tiny test base, real
torch + peft, CPU, fp32."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.fixtures.testbase import TEST_BASE_PATH
from tests.unit.test_interactive_engine import LR, OTHER, SEQUENCE, batch, datum
from workers.interactive import forwarding
from workers.interactive.engine import MICRO_BATCH_TOKENS, InteractiveEngine, InteractiveError
from workers.training.resident import ResidentBase

MODELS = {"m1": (1, 4), "m2": (2, 8), "m3": (3, 4)}  # model id: (seed, rank)
ASKED = {
    "m1": batch(datum(SEQUENCE), datum(OTHER[:9])),
    "m2": batch(datum(OTHER), datum(SEQUENCE[3:15]), datum(SEQUENCE[:7])),
    "m3": batch(datum(SEQUENCE[5:]), loss_fn="cross_entropy"),
}
PROBE = batch(datum(SEQUENCE[2:20]), datum(OTHER[1:]))


def _engine(micro_batch_tokens: int = MICRO_BATCH_TOKENS) -> InteractiveEngine:
    """An engine holding three models, each trained a step on its own data (so that their
    adapters differ from each other and from the base)."""
    engine = InteractiveEngine(
        ResidentBase.load(TEST_BASE_PATH, "fp32"), micro_batch_tokens=micro_batch_tokens
    )
    for k, (model_id, (seed, rank)) in enumerate(MODELS.items()):
        engine.create(model_id, rank=rank, seed=seed)
        engine.forward_backward(model_id, batch(datum(OTHER[k:] + SEQUENCE[: 5 + k])))
        engine.optim_step(model_id, LR)
    return engine


def _routed_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The adapters of each micro-batch's rows, for the micro-batches routed from now on."""
    seen: list[list[str]] = []
    routed = forwarding.routed

    @contextmanager
    def recording(peft: Any, adapters: list[str]) -> Iterator[None]:
        seen.append(list(adapters))
        with routed(peft, adapters):
            yield

    monkeypatch.setattr(forwarding, "routed", recording)
    return seen


def _same_output(together: dict[str, Any], alone: dict[str, Any]) -> None:
    assert together["metrics"]["loss:sum"] == pytest.approx(alone["metrics"]["loss:sum"], rel=1e-5)
    pairs = zip(together["loss_fn_outputs"], alone["loss_fn_outputs"], strict=True)
    for mine, theirs in pairs:
        for key in ("logprobs", "elementwise_loss"):
            assert mine[key]["shape"] == theirs[key]["shape"]
            assert mine[key]["data"] == pytest.approx(theirs[key]["data"], abs=1e-5)


def _norm(engine: InteractiveEngine, model_id: str) -> float:
    """The gradient norm an optim_step of the model finds (and takes its step)."""
    return float(engine.optim_step(model_id, LR)["metrics"]["grad_norm:mean"])


@pytest.mark.parametrize("micro_batch_tokens", [MICRO_BATCH_TOKENS, 40])
def test_models_forward_backward_together_as_each_would_alone(
    micro_batch_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two forward_backward calls and a forward call of three models in one batch (in one
    micro-batch, and split into micro-batches that mix the models' rows): each answers what
    it answers alone, each optim_step then finds the gradient norm it finds alone and leaves
    the weights it leaves alone, and the forward call's model keeps no gradient."""
    alone, together = _engine(micro_batch_tokens), _engine(micro_batch_tokens)
    expected = {
        "m1": alone.forward_backward("m1", ASKED["m1"]),
        "m2": alone.forward_backward("m2", ASKED["m2"]),
        "m3": alone.forward("m3", ASKED["m3"]),
    }
    routed = _routed_batches(monkeypatch)
    answers = together.forward_many(
        [("m1", ASKED["m1"], True), ("m2", ASKED["m2"], True), ("m3", ASKED["m3"], False)]
    )
    # Rows of several models shared the passes: one pass, or passes mixing the models.
    assert routed and any(len(set(adapters)) > 1 for adapters in routed)
    assert sum(map(len, routed)) == 6
    # The sequences longest first, in passes whose padding stays bounded, each model's rows a
    # slice of its pass: 23, 18, 16 | 11, 8, 6 tokens (23 | 18, 16 | 11, 8, 6 within 40).
    mixed = [["adapter_0", "adapter_1", "adapter_1"]]
    if micro_batch_tokens == MICRO_BATCH_TOKENS:
        assert routed == [["adapter_0", "adapter_1", "adapter_2"], *mixed]
    else:
        assert routed == [["adapter_0"], ["adapter_1", "adapter_2"], *mixed]
    for model_id, answer in zip(MODELS, answers, strict=True):
        assert not isinstance(answer, InteractiveError)
        _same_output(answer, expected[model_id])
    for model_id in MODELS:
        norm_alone, norm_together = _norm(alone, model_id), _norm(together, model_id)
        assert norm_together == pytest.approx(norm_alone, rel=1e-4)
        assert (norm_alone == 0.0) == (model_id == "m3")  # forward keeps no gradient
        _same_output(together.forward(model_id, PROBE), alone.forward(model_id, PROBE))


def test_a_refused_call_fails_alone_and_the_others_run() -> None:
    """An unknown loss, a sampler-only model and an unknown model are refused, each with its
    reason; the calls beside them answer as they would alone."""
    alone, together = _engine(), _engine()
    expected = alone.forward_backward("m2", ASKED["m2"])
    answers = together.forward_many(
        [
            ("m1", batch(datum(SEQUENCE), loss_fn="ppo_clip"), True),
            ("m2", ASKED["m2"], True),
            ("nobody", ASKED["m3"], True),
        ]
    )
    refused, answer, unknown = answers
    assert isinstance(refused, InteractiveError) and "ppo_clip" in str(refused)
    assert isinstance(unknown, InteractiveError) and "unknown model 'nobody'" in str(unknown)
    assert not isinstance(answer, InteractiveError)
    _same_output(answer, expected)
    assert _norm(together, "m2") == pytest.approx(_norm(alone, "m2"), rel=1e-4)


def test_a_models_calls_in_one_batch_add_up_as_one_after_another() -> None:
    """m1's two forward_backward calls and a forward call (no optim_step between them) beside
    m2's in one batch: each answers what it answers in its turn alone, m1's gradient is the sum
    of its two calls' (the optim_step finds the same norm and leaves the same weights), and the
    forward adds none."""
    alone, together = _engine(40), _engine(40)
    first, second = ASKED["m1"], ASKED["m2"]
    expected = [
        alone.forward_backward("m1", first),
        alone.forward_backward("m2", ASKED["m3"]),
        alone.forward_backward("m1", second),
        alone.forward("m1", PROBE),
    ]
    answers = together.forward_many(
        [("m1", first, True), ("m2", ASKED["m3"], True), ("m1", second, True), ("m1", PROBE, False)]
    )
    for answer, reference in zip(answers, expected, strict=True):
        assert not isinstance(answer, InteractiveError)
        _same_output(answer, reference)
    for model_id in ("m1", "m2"):
        assert _norm(together, model_id) == pytest.approx(_norm(alone, model_id), rel=1e-4)
        _same_output(together.forward(model_id, PROBE), alone.forward(model_id, PROBE))


def test_a_batch_that_fails_part_way_leaves_the_gradients_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """m1 holds a forward_backward's gradient; a batch of m1 and m2 fails at its second
    micro-batch (after the first's backward pass): m1 keeps the gradient it had, m2 has none,
    so running the calls again one at a time counts nothing twice."""
    alone, together = _engine(48), _engine(48)
    for engine in (alone, together):
        engine.forward_backward("m1", ASKED["m3"])
    passes = 0
    logits = forwarding._logits

    def failing_second(*args: Any) -> Any:
        nonlocal passes
        passes += 1
        if passes == 2:
            raise RuntimeError("out of memory (a test's stand-in)")
        return logits(*args)

    monkeypatch.setattr(forwarding, "_logits", failing_second)
    with pytest.raises(RuntimeError, match="out of memory"):
        together.forward_many([("m1", ASKED["m1"], True), ("m2", ASKED["m2"], True)])
    assert passes == 2
    for model_id in ("m1", "m2"):
        assert _norm(together, model_id) == pytest.approx(_norm(alone, model_id), rel=1e-4)
        _same_output(together.forward(model_id, PROBE), alone.forward(model_id, PROBE))
