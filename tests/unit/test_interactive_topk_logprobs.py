"""A sample's top-k logprobs (`topk_prompt_logprobs`, `topk_sample_logprobs`) from the
interactive engine on the tiny test base (real torch + peft, CPU, fp32), checked against the
trained model loaded anew by peft and a log-softmax computed here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from tests.fixtures.testbase import TEST_BASE_PATH
from tests.unit.test_interactive_engine import SEQUENCE, fresh_model, sample_request, train
from workers.interactive.engine import InteractiveEngine
from workers.training.resident import ResidentBase

Rows = list[list[tuple[int, float]]]


@pytest.fixture
def engine() -> InteractiveEngine:
    return InteractiveEngine(ResidentBase.load(TEST_BASE_PATH, "fp32"))


def next_token_logprobs(model: PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    """The model's next-token log-softmax after each of `tokens`, (len(tokens), V): row i is
    the distribution of token i + 1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_topk(rows: Rows, reference: torch.Tensor, k: int, tolerance: float = 1e-4) -> None:
    """Each row is its reference row's top k: k tokens, most likely first, whose logprobs are
    the reference's k highest and each token's own in the reference, within `tolerance` (so
    that tokens tied within it may come in either order)."""
    assert len(rows) == len(reference)
    for row, logprobs in zip(rows, reference, strict=True):
        tokens, values = [token for token, _ in row], [lp for _, lp in row]
        assert len(set(tokens)) == len(tokens) == k
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(logprobs.topk(k).values.tolist(), abs=tolerance)
        assert values == pytest.approx(logprobs[tokens].tolist(), abs=tolerance)


def test_top_k_logprobs_are_the_models_most_likely_tokens_at_each_prompt_and_sampled_position(
    engine: InteractiveEngine, tmp_path: Path
) -> None:
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 3)
    engine.save_state("m", tmp_path / "state", base_name="testbase")
    model = fresh_model(tmp_path / "state")
    prompt = SEQUENCE[:9]
    request = {
        **sample_request(prompt, max_tokens=6, temperature=0.0, stop=[]),
        "prompt_logprobs": True,
        "topk_prompt_logprobs": 5,
        "topk_sample_logprobs": 3,
    }
    response = engine.sample("m", request)

    # Row p: the candidates for prompt token p, from the distribution after token p - 1.
    rows = response["topk_prompt_logprobs"]
    assert len(rows) == len(prompt) and rows[0] is None
    assert_topk(rows[1:], next_token_logprobs(model, prompt)[:-1], 5)
    # Where the prompt's own token is among them, its logprob is the one `prompt_logprobs` says.
    own = {p: lp for p in range(1, len(prompt)) for token, lp in rows[p] if token == prompt[p]}
    assert own and all(
        lp == pytest.approx(response["prompt_logprobs"][p], abs=1e-6) for p, lp in own.items()
    )

    # One row a generated token, from the distribution it was drawn from (greedy: its first).
    [sequence] = response["sequences"]
    tokens = sequence["tokens"]
    assert len(sequence["topk_logprobs"]) == len(tokens) == 6
    assert_topk(sequence["topk_logprobs"], next_token_logprobs(model, prompt + tokens)[-7:-1], 3)
    for i, row in enumerate(sequence["topk_logprobs"]):
        assert row[0][0] == tokens[i]
        assert row[0][1] == pytest.approx(sequence["logprobs"][i], abs=1e-6)

    # The last n positions only, the same rows; what was not asked is not answered.
    last = engine.sample("m", {**request, "prompt_logprobs_last_n": 3})
    assert last["topk_prompt_logprobs"][:-3] == [None] * (len(prompt) - 3)
    assert last["topk_prompt_logprobs"][-3:] == rows[-3:]
    unasked = sample_request(prompt, max_tokens=6, temperature=0.0, stop=[])
    plain = engine.sample("m", unasked)
    zero = engine.sample("m", {**unasked, "topk_prompt_logprobs": 0, "topk_sample_logprobs": 0})
    assert zero == plain
    assert set(plain) == {"type", "sequences", "prompt_logprobs"}
    assert set(plain["sequences"][0]) == {"tokens", "logprobs", "stop_reason"}
    assert plain["sequences"][0]["tokens"] == tokens


def test_a_sampled_tokens_top_k_is_of_the_models_own_distribution_not_the_narrowed_one(
    engine: InteractiveEngine,
) -> None:
    """Drawn at temperature 2 from the top 2 tokens only, a token's row still lists the base's
    own top 4 at temperature 1, as its `logprobs` entry is the base's own."""
    prompt = SEQUENCE[:5]
    request = sample_request(prompt, max_tokens=5, temperature=2.0, top_k=2, seed=3, stop=[])
    [sequence] = engine.sample(None, {**request, "topk_sample_logprobs": 4})["sequences"]
    expected = next_token_logprobs(fresh_model(), prompt + sequence["tokens"])[-6:-1]
    assert_topk(sequence["topk_logprobs"], expected, 4)
    for i, row in enumerate(sequence["topk_logprobs"]):
        assert (sequence["tokens"][i], pytest.approx(sequence["logprobs"][i], abs=1e-6)) in row[:2]
