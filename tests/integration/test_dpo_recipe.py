"""DPO on the shipped tiny Llama (`workers.training.preference`): real transformers + peft, the
recipe's packed rows against a plain forward, and a preference learned."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

from control_plane.hyperparameters import Hyperparameters
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.integration import test_recipe
from tests.integration.test_recipe import (
    Recorder,
    assert_base_restored,
    assert_same_adapter,
)
from workers.training.preference import (
    PreferencePair,
    dpo_losses,
    sequence_logps,
    tokenize_pair,
    tokenize_pairs,
)
from workers.training.recipe import ResidentBase, TrainingError, train_adapter

# The recipe tests' fixtures: the resident tiny base, and the base as loaded.
base = test_recipe.base
pristine = test_recipe.pristine

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
# The preferred reply names the colour asked about; the other always answers "grey".
PAIRS: list[dict[str, Any]] = [
    {
        "input": {"messages": [{"role": "user", "content": f"Say the colour {colour}."}]},
        "preferred_output": [{"role": "assistant", "content": f"{colour}"}],
        "non_preferred_output": [{"role": "assistant", "content": "grey"}],
    }
    for colour in COLOURS
]
HP = Hyperparameters(
    method="dpo",
    dpo_beta=0.5,
    n_epochs=3,
    batch_size=4,
    learning_rate_multiplier=10,
    lora_rank=8,
    max_seq_length=64,
    checkpoint_every_steps=2,
    warmup_ratio=0.0,
)  # 8 pairs: 2 steps an epoch, 6 steps


def plain_logp(model: Any, example: Any) -> float:
    """The summed log-probability of an example's trained tokens, from one unpacked forward."""
    ids = torch.tensor([example.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    logp = F.log_softmax(logits[:-1], dim=-1)
    total = 0.0
    for position, label in enumerate(example.labels[1:]):
        if label != -100:
            total += logp[position, label].item()
    return total


def test_dpo_loss_is_the_papers_and_a_pair_is_two_chat_examples(base: ResidentBase) -> None:
    policy = torch.tensor([[-3.0, -5.0], [-2.0, -1.0]], dtype=torch.float64)
    reference = torch.tensor([[-4.0, -4.0], [-2.5, -1.5]], dtype=torch.float64)
    losses, rewards = dpo_losses(policy, reference, beta=0.2)
    for i in range(2):
        margin = 0.2 * ((policy[i, 0] - reference[i, 0]) - (policy[i, 1] - reference[i, 1]))
        assert losses[i].item() == pytest.approx(math.log(1 + math.exp(-margin.item())))
        assert rewards[i, 0].item() == pytest.approx(0.2 * (policy[i, 0] - reference[i, 0]).item())

    pair = tokenize_pair(PAIRS[0], base.tokenizer)
    # Both replies share the prompt and differ in the trained reply only.
    prompt = next(i for i, label in enumerate(pair.chosen.labels) if label != -100)
    assert prompt > 0 and pair.chosen.input_ids[:prompt] == pair.rejected.input_ids[:prompt]
    assert all(label == -100 for label in pair.rejected.labels[:prompt])
    assert pair.chosen.trainable_tokens and pair.rejected.trainable_tokens
    # An assistant turn in the conversation is context, not trained on.
    with_history = {
        **PAIRS[1],
        "input": {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there, friend."},
                {"role": "user", "content": "Say the colour blue."},
            ]
        },
    }
    longer = tokenize_pair(with_history, base.tokenizer)
    assert (
        longer.chosen.trainable_tokens
        == tokenize_pair(PAIRS[1], base.tokenizer).chosen.trainable_tokens
    )


def test_packed_chunked_log_probabilities_equal_a_plain_forward(
    base: ResidentBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("workers.training.preference.LOGP_CHUNK", 3)
    pairs = tokenize_pairs(PAIRS[:3], base.tokenizer, 64).examples
    examples = [e for p in pairs for e in (p.chosen, p.rejected)]
    from workers.kernels.packing import PACKED_ATTENTION

    model = base.model
    assert model.config._attn_implementation != PACKED_ATTENTION  # the recipe switches it on
    plain = [plain_logp(model, e) for e in examples]
    model.set_attn_implementation(PACKED_ATTENTION)
    try:
        with torch.no_grad():
            packed = sequence_logps(
                model.get_decoder(), model.get_output_embeddings(), examples, "cpu"
            )
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(packed, torch.tensor(plain), rtol=1e-4, atol=1e-3)


def test_dpo_learns_the_preference_from_the_base_as_its_reference(
    base: ResidentBase,
    pristine: dict[str, Any],
    tmp_path: Path,
) -> None:
    recorder = Recorder(tmp_path)
    result = train_adapter(base, PAIRS, None, HP, recorder.hooks(), tmp_path / "job")
    steps = recorder.metrics("train_loss")
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    # At the first step the adapter is fresh (B = 0): the policy is the reference, the margin 0.
    assert steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert steps[0]["rewards_margin"] == pytest.approx(0.0, abs=1e-3)
    assert steps[-1]["train_loss"] < 0.5 and steps[-1]["rewards_accuracy"] == 1.0
    assert steps[-1]["rewards_margin"] > 0.5
    assert_base_restored(base, pristine)

    # The adapter, loaded by plain peft, prefers each colour over "grey" more than the base does.
    assert result.adapter_dir is not None
    plain = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH)
    pairs = tokenize_pairs(PAIRS, base.tokenizer, 64).examples
    before = [plain_logp(plain, p.chosen) - plain_logp(plain, p.rejected) for p in pairs]
    tuned = PeftModel.from_pretrained(plain, result.adapter_dir)
    after = [plain_logp(tuned, p.chosen) - plain_logp(tuned, p.rejected) for p in pairs]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


def test_a_resumed_dpo_job_keeps_its_reference_and_ends_at_the_uninterrupted_adapter(
    base: ResidentBase, tmp_path: Path
) -> None:
    hp = HP.model_copy(update={"eval_fraction": 0.25})  # 6 training pairs, 2 held out
    whole = Recorder(tmp_path / "whole")
    uninterrupted = train_adapter(base, PAIRS, None, hp, whole.hooks(), tmp_path / "whole")
    evals = whole.metrics("eval_loss")
    assert evals and "eval_rewards_accuracy" in evals[-1]

    # Continued from the uninterrupted job's adapter, the reference is that adapter: the first
    # step compares the policy with itself.
    assert uninterrupted.adapter_dir is not None
    continued = Recorder(tmp_path / "continued")
    continued_result = train_adapter(
        base,
        PAIRS,
        None,
        hp,
        continued.hooks(),
        tmp_path / "continued",
        init_dir=uninterrupted.adapter_dir,
    )
    assert continued.metrics("train_loss")[0]["train_loss"] == pytest.approx(math.log(2), abs=2e-3)

    # Resumed mid-run, the continued job compares against the reference its checkpoint holds
    # (the adapter it started from), not the fresh adapter the resumed run attaches first.
    resumed = Recorder(tmp_path / "resumed")
    result = train_adapter(
        base,
        PAIRS,
        None,
        hp,
        resumed.hooks(),
        tmp_path / "resumed",
        resume_dir=continued.checkpoints[2],
        init_dir=uninterrupted.adapter_dir,
    )
    assert [m["step"] for m in resumed.metrics("train_loss")] == [3, 4, 5, 6]
    assert result.adapter_dir is not None and continued_result.adapter_dir is not None
    assert_same_adapter(result.adapter_dir, continued_result.adapter_dir)


def test_pairs_left_without_a_reply_are_dropped_and_none_left_is_refused(
    base: ResidentBase, tmp_path: Path
) -> None:
    long_prompt = {
        **PAIRS[0],
        "input": {"messages": [{"role": "user", "content": "word " * 200}]},
    }
    dataset = tokenize_pairs([long_prompt, PAIRS[1]], base.tokenizer, 64)
    assert len(dataset.examples) == 1 and dataset.dropped == 1 and dataset.truncated == 1
    assert isinstance(dataset.examples[0], PreferencePair) and dataset.examples[0].index == 0
    with pytest.raises(TrainingError, match="no preference pair"):
        train_adapter(base, [long_prompt], None, HP, Recorder(tmp_path).hooks(), tmp_path / "x")


def _dpo_rank_main(rank: int, world_size: int, port: int, output_dir: str) -> None:
    """One rank of a gloo group training the DPO job; rank 0 writes its step metrics."""
    import json
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        resident = ResidentBase.load(TEST_BASE_PATH)
        recorder = Recorder(Path(output_dir))
        hp = HP.model_copy(update={"num_gpus": world_size})
        train_adapter(resident, PAIRS, None, hp, recorder.hooks(), Path(output_dir) / f"rank{rank}")
        if rank == 0:
            steps = recorder.metrics("train_loss")
            (Path(output_dir) / "metrics.json").write_text(json.dumps(steps))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_make_the_single_process_dpo_step_and_report_every_ranks_pairs(
    base: ResidentBase, tmp_path: Path
) -> None:
    import json
    import socket

    single = Recorder(tmp_path / "single")
    alone = train_adapter(base, PAIRS, None, HP, single.hooks(), tmp_path / "single")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_dpo_rank_main, args=(2, port, str(tmp_path)), nprocs=2)
    ranked = json.loads((tmp_path / "metrics.json").read_text())
    for one, two in zip(single.metrics("train_loss"), ranked, strict=True):
        for key in ("train_loss", "rewards_margin", "rewards_accuracy", "rewards_chosen"):
            assert two[key] == pytest.approx(one[key], rel=0.05, abs=2e-3), (key, one, two)
    assert alone.adapter_dir is not None
    assert_same_adapter_close(tmp_path / "rank0" / "adapter", alone.adapter_dir)


def assert_same_adapter_close(left: Path, right: Path) -> None:
    a, b = test_recipe.adapter_tensors(left), test_recipe.adapter_tensors(right)
    for key in b:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0.05, atol=5e-3)
