"""Early stopping's rule and its checkpointed state, against a plain reading of the rule.

The rule (Hugging Face Trainer's): stop at the first evaluation that ends a run of `patience`
evaluations, each not below the lowest before it by more than `threshold`; the weights kept are
those of the lowest evaluation up to there (the first, on a tie).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from control_plane.hyperparameters import Hyperparameters
from workers.training.early_stopping import BEST_WEIGHTS, EarlyStopping


def reference(losses: list[float], patience: int, threshold: float) -> tuple[int | None, int]:
    """(index of the evaluation that stops the job or None, index of the lowest up to it)."""
    for k in range(len(losses)):
        window = range(k - patience + 1, k + 1)
        if window.start >= 1 and all(min(losses[:j]) - losses[j] <= threshold for j in window):
            seen = losses[: k + 1]
            return k, seen.index(min(seen))
    return None, losses.index(min(losses))


def model_at(step: int) -> nn.Linear:
    """A model whose every trainable weight is `step`, and one frozen weight that is not."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(float(step))
    model.bias.requires_grad_(False)
    return model


def set_step(model: nn.Linear, step: int) -> None:
    with torch.no_grad():
        model.weight.fill_(float(step))
        model.bias.fill_(-1.0)


losses_strategy = st.lists(
    st.sampled_from([1.0, 1.05, 1.1, 1.2, 1.5, 2.0, 0.9, 0.95, 0.5]), min_size=1, max_size=14
)


@settings(max_examples=300, deadline=None)
@given(
    losses=losses_strategy,
    patience=st.integers(1, 4),
    threshold=st.sampled_from([0.0, 0.04, 0.1, 0.3]),
)
def test_the_stop_and_the_weights_kept_follow_the_rule(losses, patience, threshold):
    stop_at, best_at = reference(losses, patience, threshold)
    early = EarlyStopping(patience, threshold)
    model = model_at(0)
    stopped = None
    for index, loss in enumerate(losses):
        set_step(model, index + 1)  # evaluation `index` sees the weights of step index + 1
        if early.observe(index + 1, loss, model):
            stopped = index
            break
    assert stopped == stop_at
    assert early.best_step == best_at + 1 and early.best_loss == losses[best_at]
    now = (stopped if stopped is not None else len(losses) - 1) + 1
    held = early.restore_best(model, now)
    assert held == best_at + 1
    assert torch.all(model.weight == float(best_at + 1))
    assert torch.all(model.bias == -1.0)  # frozen weights are not touched


@settings(max_examples=200, deadline=None)
@given(
    losses=losses_strategy,
    patience=st.integers(1, 4),
    threshold=st.sampled_from([0.0, 0.1]),
    cut=st.integers(0, 13),
)
def test_a_checkpoint_carries_the_counts_and_best_weights_to_a_resumed_run(
    losses, patience, threshold, cut
):
    """Checkpointed after evaluation `cut` and resumed: the same stop, the same weights."""
    uninterrupted = EarlyStopping(patience, threshold)
    stops = []
    model = model_at(0)
    for index, loss in enumerate(losses):
        set_step(model, index + 1)
        if uninterrupted.observe(index + 1, loss, model):
            stops.append(index)
            break
    cut = min(cut, (stops[0] if stops else len(losses)) - 1)
    if cut < 0:
        return

    first, model = EarlyStopping(patience, threshold), model_at(0)
    for index in range(cut + 1):
        set_step(model, index + 1)
        assert not first.observe(index + 1, losses[index], model)
    with tempfile.TemporaryDirectory() as directory:
        for name, tensors in first.files(cut + 1).items():
            save_file(tensors, str(Path(directory) / name))
        state = first.state(cut + 1)
        resumed, model = EarlyStopping(patience, threshold), model_at(cut + 1)
        resumed.load(state, Path(directory), model)  # the checkpoint's own weights are loaded
    for index in range(cut + 1, len(losses)):
        set_step(model, index + 1)
        if resumed.observe(index + 1, losses[index], model):
            assert stops == [index]
            break
    else:
        assert stops == []
    assert (resumed.best_step, resumed.best_loss) == (
        uninterrupted.best_step,
        uninterrupted.best_loss,
    )
    resumed.restore_best(model, len(losses) + 1)
    assert torch.all(model.weight == float(uninterrupted.best_step or 0))


def test_early_stopping_is_off_by_default_and_needs_evaluations_during_training():
    assert EarlyStopping.of(Hyperparameters()) is None
    hp = Hyperparameters(eval_every_steps=5, early_stopping_patience=2)
    assert EarlyStopping.of(hp) == EarlyStopping(2, 0.0)
    with pytest.raises(ValidationError, match="set eval_every_steps too"):
        Hyperparameters(early_stopping_patience=2)


def test_the_sweeps_median_is_asked_from_the_nth_evaluation_and_no_patience_never_stops(
    tmp_path: Path,
):
    asked: list[tuple[int, float]] = []

    def median(step: int, lowest: float) -> tuple[str, dict[str, object]] | None:
        asked.append((step, lowest))
        return ("trails its sweep", {"sweep_peers": 2}) if step >= 4 else None

    early = EarlyStopping(0, 0.0, median_from=3)
    model, said = model_at(0), None
    for step, loss in enumerate([3.0, 2.0, 2.5, 2.6, 1.0], start=1):
        set_step(model, step)
        said = early.verdict(step, loss, model, median)
        if said is not None:
            break
    assert asked == [(3, 2.0), (4, 2.0)]  # from its third evaluation, with its lowest so far
    assert said == (
        "trails its sweep",
        {
            "early_stopped": True,
            "stopped_by": "sweep_median_stopping",
            "step": 4,
            "best_step": 2,
            "sweep_peers": 2,
        },
    )
    # A checkpoint carries the count of evaluations that the median waits for.
    resumed = EarlyStopping(0, 0.0, median_from=3)
    save_file(early.files(4)[BEST_WEIGHTS], str(tmp_path / BEST_WEIGHTS))
    resumed.load(early.state(4), tmp_path, model)
    assert (resumed.evaluations, resumed.best_step) == (4, 2)
    # Without patience, however long it goes without a lower loss, it is not stopped by it.
    alone = EarlyStopping(0, 0.0)
    assert not any(alone.observe(step, 5.0, model) for step in range(1, 30))
    hp = Hyperparameters(eval_every_steps=5, sweep_median_stopping=2)
    assert EarlyStopping.of(hp) == EarlyStopping(0, 0.0, 2)
