"""A sample's `target_prompt_logprobs` and `prompt_alt_tokens_k` from the interactive engine on
the tiny test base (real torch + peft, CPU, fp32), checked against the trained model loaded
anew by peft and a log-softmax computed here: the asked ids' logprobs at each prompt position
(dense and sparse CSR, as the SDK builds them), and k tokens drawn at each position with the
model's logprobs of them, reproducible by the request's seed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tinker import types

from tests.fixtures.testbase import TEST_BASE_PATH
from tests.unit.test_interactive_engine import SEQUENCE, fresh_model, sample_request, train
from tests.unit.test_interactive_topk_logprobs import next_token_logprobs
from workers.interactive.engine import InteractiveEngine
from workers.training.resident import ResidentBase

VOCAB = 768  # the test base's


@pytest.fixture
def engine() -> InteractiveEngine:
    return InteractiveEngine(ResidentBase.load(TEST_BASE_PATH, "fp32"))


def wire(tensor: types.TensorData) -> dict[str, Any]:
    """A TensorData as the SDK sends it in a SampleRequest's JSON."""
    return {
        "data": tensor.data,
        "dtype": tensor.dtype,
        "shape": tensor.shape,
        "sparse_crow_indices": tensor.sparse_crow_indices,
        "sparse_col_indices": tensor.sparse_col_indices,
    }


def dense(answer: dict[str, Any]) -> torch.Tensor:
    """An answer's TensorData JSON as a dense tensor, read by the SDK's own TensorData."""
    return types.TensorData(
        data=answer["data"],
        dtype=answer["dtype"],
        shape=answer["shape"],
        sparse_crow_indices=answer.get("sparse_crow_indices"),
        sparse_col_indices=answer.get("sparse_col_indices"),
    ).to_torch()


def asked_ids(prompt: list[int]) -> torch.Tensor:
    """[len(prompt) - 1, 3] ids: each row's prompt token, then two others (token 0 among
    them, a real token), and -1 (nothing asked) in every third row's last two cells."""
    rows = len(prompt) - 1
    ids = torch.stack(
        [
            torch.tensor(prompt[1:]),
            torch.arange(rows) * 41 % VOCAB,  # row 0 asks token 0
            (torch.arange(rows) * 97 + 13) % VOCAB,
        ],
        dim=1,
    )
    ids[::3, 1:] = -1
    return ids


def test_target_logprobs_are_the_models_logprobs_of_the_asked_ids_at_each_prompt_position(
    engine: InteractiveEngine, tmp_path: Path
) -> None:
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 3)
    engine.save_state("m", tmp_path / "state", base_name="testbase")
    prompt = SEQUENCE[:11]
    ids = asked_ids(prompt)
    request = {
        **sample_request(prompt, max_tokens=2, temperature=0.0, stop=[]),
        "prompt_logprobs": True,
        "target_prompt_logprobs": wire(types.TensorData.from_torch(ids)),
    }
    answered = engine.sample("m", request)

    # Row i: the distribution after prompt token i, which scores prompt position i + 1.
    reference = next_token_logprobs(fresh_model(tmp_path / "state"), prompt)[:-1]
    expected = reference.gather(-1, ids.clamp(min=0)).masked_fill(ids == -1, 0.0)
    target = answered["target_prompt_logprobs"]
    assert target["dtype"] == "float32" and target["shape"] == [len(prompt) - 1, 3]
    assert target.get("sparse_crow_indices") is None
    assert dense(target) == pytest.approx(expected, abs=1e-5)
    assert (dense(target)[::3, 1:] == 0.0).all()
    # Column 0 asks each position's own token: its logprob is the one prompt_logprobs says.
    assert dense(target)[:, 0].tolist() == pytest.approx(answered["prompt_logprobs"][1:], abs=1e-6)

    # Sparse, as the SDK builds it where that is smaller (only the asked cells listed, token 0
    # among them): the values at those cells, 0.0 elsewhere, in the request's layout.
    few = torch.full((len(prompt) - 1, 4), -1)
    few[0, 2], few[3, 0], few[7, 3], few[9, 1] = 0, prompt[4], 500, 17
    sparse = types.TensorData.from_torch_sparse(few, pad_value=-1)
    assert sparse.sparse_crow_indices is not None and sparse.data == [0, prompt[4], 500, 17]
    as_csr = engine.sample("m", {**request, "target_prompt_logprobs": wire(sparse)})
    csr = as_csr["target_prompt_logprobs"]
    assert csr["sparse_crow_indices"] == sparse.sparse_crow_indices
    assert csr["sparse_col_indices"] == sparse.sparse_col_indices
    listed = reference[[0, 3, 7, 9], [0, prompt[4], 500, 17]]
    assert csr["data"] == pytest.approx(listed.tolist(), abs=1e-5)
    assert csr["data"][1] == pytest.approx(answered["prompt_logprobs"][4], abs=1e-6)
    assert dense(csr) == pytest.approx(
        reference.gather(-1, few.clamp(min=0)).masked_fill(few == -1, 0.0), abs=1e-5
    )

    # Every position, whatever prompt_logprobs_last_n bounds; unasked, unanswered.
    last = engine.sample("m", {**request, "prompt_logprobs_last_n": 2})
    assert dense(last["target_prompt_logprobs"]) == pytest.approx(expected, abs=1e-6)
    plain = engine.sample("m", sample_request(prompt, max_tokens=2, temperature=0.0, stop=[]))
    assert set(plain) == {"type", "sequences", "prompt_logprobs"}
    assert plain["sequences"] == answered["sequences"]


def alternatives(engine: InteractiveEngine, prompt: list[int], k: int, **params: Any) -> Any:
    """The base's `prompt_alt_tokens` for `prompt`, as tensors, and the sequence sampled."""
    request = {**sample_request(prompt, max_tokens=3, stop=[], **params), "prompt_alt_tokens_k": k}
    answered = engine.sample(None, request)
    drawn = answered["prompt_alt_tokens"]
    return dense(drawn["tokens"]), dense(drawn["logprobs"]), answered["sequences"]


def test_alternative_prompt_tokens_are_k_draws_a_position_with_the_models_own_logprobs(
    engine: InteractiveEngine,
) -> None:
    prompt = SEQUENCE
    reference = next_token_logprobs(fresh_model(), prompt)[:-1]
    tokens, logprobs, sequences = alternatives(engine, prompt, 5, temperature=1.0, seed=11)
    assert tokens.dtype == torch.int64 and tokens.shape == (len(prompt) - 1, 5)
    assert logprobs.shape == tokens.shape
    # Row i: candidates for prompt token i + 1, each with its logprob after token i.
    assert logprobs == pytest.approx(reference.gather(-1, tokens), abs=1e-5)
    # With replacement from a spread distribution: a row's draws differ, and rows differ.
    assert len(set(tokens.flatten().tolist())) > len(prompt)

    again, _, same_sequences = alternatives(engine, prompt, 5, temperature=1.0, seed=11)
    other, _, _ = alternatives(engine, prompt, 5, temperature=1.0, seed=12)
    assert torch.equal(again, tokens)
    assert not torch.equal(other, tokens)
    # The draws have their own generator: the request's samples are what they are without them.
    unasked = sample_request(prompt, max_tokens=3, stop=[], temperature=1.0, seed=11)
    assert engine.sample(None, unasked)["sequences"] == sequences == same_sequences


def test_alternatives_follow_the_temperature_alone_and_are_the_argmax_at_temperature_0(
    engine: InteractiveEngine,
) -> None:
    prompt = SEQUENCE[:12]
    reference = next_token_logprobs(fresh_model(), prompt)[:-1]
    best = reference.argmax(dim=-1)

    tokens, logprobs, _ = alternatives(engine, prompt, 4, temperature=0.0)
    assert torch.equal(tokens, best[:, None].expand(-1, 4))
    assert logprobs == pytest.approx(reference.max(dim=-1).values[:, None].expand(-1, 4), abs=1e-5)

    # Nearly greedy, the draws are the argmax; the logprobs stay the model's own (temperature 1).
    cold, cold_logprobs, _ = alternatives(engine, prompt, 4, temperature=1e-4, seed=1)
    assert torch.equal(cold, tokens) and cold_logprobs == pytest.approx(logprobs, abs=1e-6)
    # top_k and top_p narrow the sequences' draws, not these: top_k=1 still draws many tokens.
    wide, _, [sequence] = alternatives(
        engine, prompt, 4, temperature=1.0, top_k=1, top_p=0.5, seed=1
    )
    assert sequence["tokens"][0] == next_token_logprobs(fresh_model(), prompt)[-1].argmax()
    assert (wide != best[:, None]).float().mean() > 0.5
