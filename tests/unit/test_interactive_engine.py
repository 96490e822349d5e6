"""The interactive engine on the tiny test base (real torch + peft, CPU, fp32): Tinker's calls
in their JSON wire shapes, checked against the model computed independently."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive.engine import InteractiveEngine, InteractiveError
from workers.training.resident import ResidentBase

# Two different token sequences of the test base's 768-token vocabulary.
SEQUENCE = [5 + (i * 37) % 700 for i in range(24)]
OTHER = [9 + (i * 53) % 650 for i in range(17)]
LR = {"learning_rate": 5e-3}


def tensor(values: list[Any], dtype: str) -> dict[str, Any]:
    return {"data": values, "dtype": dtype, "shape": [len(values)], "sparse_crow_indices": None}


def model_input(tokens: list[int]) -> dict[str, Any]:
    return {"chunks": [{"type": "encoded_text", "tokens": tokens}]}


def datum(sequence: list[int], weights: list[float] | None = None) -> dict[str, Any]:
    """A cross-entropy datum the way Tinker's docs build one: inputs are the sequence but its
    last token, targets the sequence but its first."""
    inputs = {"target_tokens": tensor(sequence[1:], "int64")}
    inputs["weights"] = tensor(weights or [1.0] * (len(sequence) - 1), "float32")
    return {"model_input": model_input(sequence[:-1]), "loss_fn_inputs": inputs}


def batch(*data: dict[str, Any], loss_fn: str = "cross_entropy") -> dict[str, Any]:
    return {"data": list(data), "loss_fn": loss_fn, "loss_fn_config": None}


def logprobs(output: dict[str, Any], index: int = 0) -> torch.Tensor:
    return torch.tensor(output["loss_fn_outputs"][index]["logprobs"]["data"])


def sample_request(tokens: list[int], n: int = 1, **params: Any) -> dict[str, Any]:
    return {"prompt": model_input(tokens), "num_samples": n, "sampling_params": params}


@pytest.fixture
def base() -> ResidentBase:
    return ResidentBase.load(TEST_BASE_PATH, "fp32")


@pytest.fixture
def engine(base: ResidentBase) -> InteractiveEngine:
    return InteractiveEngine(base)


def train(engine: InteractiveEngine, model_id: str, steps: int) -> None:
    for _ in range(steps):
        engine.forward_backward(model_id, batch(datum(SEQUENCE)))
        engine.optim_step(model_id, LR)


def fresh_model(adapter_dir: Path | None = None) -> PreTrainedModel:
    """The test base loaded anew, with the adapter in `adapter_dir` when given, by peft itself."""
    model = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


def reference_logprobs(model: PreTrainedModel, sequence: list[int]) -> torch.Tensor:
    """log p(next token) at every input position, from the full log-softmax of the logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence[:-1]])).logits[0]
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]


# -- training ------------------------------------------------------------------------------------


def test_training_on_a_datum_lowers_its_loss_several_times_over(engine):
    engine.create("m", rank=16, seed=0)
    losses = []
    for _ in range(20):
        losses.append(engine.forward_backward("m", batch(datum(SEQUENCE)))["metrics"]["loss:sum"])
        engine.optim_step("m", LR)
    assert losses[-1] < losses[0] / 3, losses
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses


def test_forward_gives_the_loss_of_forward_backward_and_leaves_nothing_to_apply(engine):
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 2)
    before = engine.forward("m", batch(datum(SEQUENCE)))
    # forward leaves no gradient behind: the optimizer step after it has nothing to apply
    engine.optim_step("m", LR)
    after = engine.forward("m", batch(datum(SEQUENCE)))
    with_gradients = engine.forward_backward("m", batch(datum(SEQUENCE)))

    assert after["metrics"] == before["metrics"]
    assert torch.equal(logprobs(after), logprobs(before))
    assert with_gradients["metrics"]["loss:sum"] == pytest.approx(
        before["metrics"]["loss:sum"], rel=1e-6
    )
    assert before["loss_fn_outputs"][0]["logprobs"]["shape"] == [len(SEQUENCE) - 1]


def test_gradients_accumulate_across_forward_backward_calls_until_optim_step(engine):
    engine.create("halves", rank=8, seed=0)
    engine.create("whole", rank=8, seed=0)
    first = engine.forward_backward("halves", batch(datum(SEQUENCE)))["metrics"]["loss:sum"]
    second = engine.forward_backward("halves", batch(datum(OTHER)))["metrics"]["loss:sum"]
    both = engine.forward_backward("whole", batch(datum(SEQUENCE), datum(OTHER)))
    engine.optim_step("halves", LR)
    engine.optim_step("whole", LR)

    assert first + second == pytest.approx(both["metrics"]["loss:sum"], rel=1e-6)
    probe = batch(datum(SEQUENCE), datum(OTHER))
    halves, whole = engine.forward("halves", probe), engine.forward("whole", probe)
    for i in (0, 1):
        torch.testing.assert_close(logprobs(halves, i), logprobs(whole, i), atol=1e-4, rtol=0)


def test_target_logprobs_are_the_models_log_softmax_and_zero_weights_add_no_loss(engine, tmp_path):
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 3)
    engine.save_state("m", tmp_path / "state", base_name="testbase")  # fp32: exact weights
    expected = reference_logprobs(fresh_model(tmp_path / "state"), SEQUENCE)

    weights = [0.0] * 10 + [1.0] * (len(SEQUENCE) - 11)
    output = engine.forward("m", batch(datum(SEQUENCE, weights)))
    elementwise = torch.tensor(output["loss_fn_outputs"][0]["elementwise_loss"]["data"])

    torch.testing.assert_close(logprobs(output), expected, atol=1e-5, rtol=1e-5)
    assert torch.all(elementwise[:10] == 0)
    assert output["metrics"]["loss:sum"] == pytest.approx(-expected[10:].sum().item(), rel=1e-5)


def test_targets_of_shape_n_by_k_score_k_candidates_per_position(engine):
    engine.create("m", rank=4, seed=0)
    candidates = [[t, (t + 1) % 768] for t in SEQUENCE[1:]]
    flat = [c for pair in candidates for c in pair]
    shape = [len(candidates), 2]
    # weights 1 on the first candidate only, sparse CSR as the SDK sends a 2-D weights tensor
    rows = len(candidates)
    sparse = {"sparse_crow_indices": list(range(rows + 1)), "sparse_col_indices": [0] * rows}
    inputs = {
        "target_tokens": {"data": flat, "dtype": "int64", "shape": shape},
        "weights": {"data": [1.0] * rows, "dtype": "float32", "shape": shape, **sparse},
    }
    pairwise = {"model_input": model_input(SEQUENCE[:-1]), "loss_fn_inputs": inputs}
    output = engine.forward("m", batch(pairwise))
    scores = logprobs(output).reshape(shape)

    single = logprobs(engine.forward("m", batch(datum(SEQUENCE))))
    assert output["loss_fn_outputs"][0]["logprobs"]["shape"] == shape
    torch.testing.assert_close(scores[:, 0], single)
    assert output["metrics"]["loss:sum"] == pytest.approx(-single.sum().item(), rel=1e-6)


def test_importance_sampling_weighs_each_advantage_by_the_probability_ratio(engine):
    engine.create("m", rank=4, seed=0)
    current = logprobs(engine.forward("m", batch(datum(SEQUENCE))))
    n = len(current)
    sampler = current - torch.linspace(0, 1, n)  # it found later tokens less likely
    advantages = torch.linspace(-0.5, 1, n)
    rl = {
        "model_input": model_input(SEQUENCE[:-1]),
        "loss_fn_inputs": {
            "target_tokens": tensor(SEQUENCE[1:], "int64"),
            "logprobs": tensor(sampler.tolist(), "float32"),
            "advantages": tensor(advantages.tolist(), "float32"),
        },
    }
    output = engine.forward_backward("m", batch(rl, loss_fn="importance_sampling"))

    expected = -(torch.exp(current - sampler) * advantages).sum().item()
    assert output["metrics"]["loss:sum"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    torch.testing.assert_close(logprobs(output), current)


def test_two_models_are_isolated_and_dropping_them_all_restores_the_base(engine, base):
    untouched = base.state_fingerprint()
    engine.create("a", rank=8, seed=0)
    engine.create("b", rank=4, seed=1, train_mlp=False, train_unembed=False)
    b_before = logprobs(engine.forward("b", batch(datum(OTHER))))
    # b's pending gradients must not be applied by a's steps
    engine.forward_backward("b", batch(datum(OTHER)))
    train(engine, "a", 3)

    assert torch.equal(logprobs(engine.forward("b", batch(datum(OTHER)))), b_before)
    engine.drop("a")
    assert not engine.has("a") and engine.has("b")
    assert torch.equal(logprobs(engine.forward("b", batch(datum(OTHER)))), b_before)
    engine.optim_step("b", LR)  # b's own gradients, from before a was dropped
    assert not torch.equal(logprobs(engine.forward("b", batch(datum(OTHER)))), b_before)
    engine.drop("b")
    assert base.state_fingerprint() == untouched


# -- files ---------------------------------------------------------------------------------------


def test_an_exported_adapter_loads_in_peft_and_gives_the_engines_logits(engine, tmp_path):
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 5)
    engine.export_adapter("m", tmp_path / "export", base_name="org/testbase")

    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/testbase"
    assert config["r"] == 8 and config["inference_mode"] is True
    with safe_open(tmp_path / "export" / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
        assert {weights.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # no embeddings
    served = reference_logprobs(fresh_model(tmp_path / "export"), SEQUENCE)
    engines = logprobs(engine.forward("m", batch(datum(SEQUENCE))))
    base_alone = reference_logprobs(fresh_model(), SEQUENCE)
    torch.testing.assert_close(served, engines, atol=3e-2, rtol=0)
    assert (base_alone - engines).abs().max() > 0.5  # the adapter is what makes them agree


def test_a_loaded_state_with_its_optimizer_takes_the_originals_next_step(engine, tmp_path):
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 3)
    engine.save_state("m", tmp_path / "state", base_name="testbase")
    engine.load_state("resumed", tmp_path / "state", with_optimizer=True)
    engine.load_state("fresh", tmp_path / "state", with_optimizer=False)
    for model_id in ("m", "resumed", "fresh"):
        train(engine, model_id, 1)

    probe = batch(datum(SEQUENCE), datum(OTHER))
    original = engine.forward("m", probe)
    assert engine.forward("resumed", probe) == original
    assert engine.forward("fresh", probe) != original  # Adam's moments were what it needed


def test_a_sampler_loaded_from_an_export_samples_like_its_model(engine, tmp_path):
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 5)
    engine.export_adapter("m", tmp_path / "export", base_name="testbase")
    engine.load_sampler("sampler", tmp_path / "export")
    request = sample_request(SEQUENCE[:6], max_tokens=8, temperature=0.0, stop=[])

    assert engine.has("sampler")
    assert (
        engine.sample("sampler", request)["sequences"][0]["tokens"]
        == (engine.sample("m", request)["sequences"][0]["tokens"])
    )
    with pytest.raises(InteractiveError, match="for sampling only"):
        engine.forward_backward("sampler", batch(datum(SEQUENCE)))


# -- sampling ------------------------------------------------------------------------------------


def test_greedy_sampling_is_the_argmax_decode_with_the_models_logprobs(engine, tmp_path):
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 5)
    engine.save_state("m", tmp_path / "state", base_name="testbase")
    prompt = SEQUENCE[:6]
    request = sample_request(prompt, max_tokens=7, temperature=0.0, stop=[])
    response = engine.sample("m", {**request, "prompt_logprobs": True})

    model, tokens, expected = fresh_model(tmp_path / "state"), list(prompt), []
    with torch.no_grad():
        for _ in range(7):
            step = torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0, -1], -1)
            tokens.append(int(step.argmax()))
            expected.append(step[tokens[-1]].item())
    sequence = response["sequences"][0]
    assert response["type"] == "sample"
    assert sequence["tokens"] == tokens[len(prompt) :]
    assert sequence["stop_reason"] == "length"
    assert sequence["logprobs"] == pytest.approx(expected, abs=1e-4)
    assert response["prompt_logprobs"][0] is None
    assert response["prompt_logprobs"][1:] == pytest.approx(
        reference_logprobs(model, prompt).tolist(), abs=1e-4
    )


def test_a_seed_makes_sampling_reproducible_and_max_tokens_bounds_it(engine):
    request = sample_request(SEQUENCE[:4], n=3, max_tokens=9, temperature=1.0, seed=7, stop=[])
    first = engine.sample(None, request)
    again = engine.sample(None, request)
    other = engine.sample(
        None, {**request, "sampling_params": {**request["sampling_params"], "seed": 8}}
    )

    assert first == again
    assert first != other
    assert len(first["sequences"]) == 3
    for sequence in first["sequences"]:
        assert len(sequence["tokens"]) == len(sequence["logprobs"]) == 9
        assert sequence["stop_reason"] == "length"
    assert first["prompt_logprobs"] is None


def test_sampling_stops_at_a_stop_token_or_string_and_keeps_it(engine, base):
    prompt = SEQUENCE[:4]
    greedy = engine.sample(None, sample_request(prompt, max_tokens=12, temperature=0, stop=[]))
    tokens = greedy["sequences"][0]["tokens"]
    stop = tokens[4]
    by_token = engine.sample(
        None, sample_request(prompt, max_tokens=12, temperature=0, stop=[stop])
    )
    text = base.tokenizer.decode(tokens[3:5])
    by_string = engine.sample(None, sample_request(prompt, max_tokens=12, temperature=0, stop=text))

    assert by_token["sequences"][0]["tokens"] == tokens[: tokens.index(stop) + 1]
    assert by_token["sequences"][0]["stop_reason"] == "stop"
    ended = by_string["sequences"][0]
    assert ended["stop_reason"] == "stop"
    assert text in base.tokenizer.decode(ended["tokens"])
    assert text not in base.tokenizer.decode(ended["tokens"][:-1])


# -- refusals ------------------------------------------------------------------------------------


def _image_datum() -> dict[str, Any]:
    bad = datum(SEQUENCE)
    bad["model_input"]["chunks"].append({"type": "image", "data": "", "format": "png"})
    return bad


def rl_datum(
    sampler: list[float] | None = None, advantages: list[float] | None = None
) -> dict[str, Any]:
    """An RL datum of SEQUENCE: the sampler's logprobs of its tokens and their advantages."""
    n = len(SEQUENCE) - 1
    return {
        "model_input": model_input(SEQUENCE[:-1]),
        "loss_fn_inputs": {
            "target_tokens": tensor(SEQUENCE[1:], "int64"),
            "logprobs": tensor(sampler or [-3.0] * n, "float32"),
            "advantages": tensor(advantages or [1.0] * n, "float32"),
        },
    }


def _short_targets() -> dict[str, Any]:
    bad = datum(SEQUENCE)
    bad["loss_fn_inputs"]["target_tokens"] = tensor(SEQUENCE[1:-2], "int64")
    return bad


def target_ids(rows: int, width: int, values: list[int] | None = None) -> dict[str, Any]:
    """`target_prompt_logprobs` of the shape (rows, width), holding `values` (else token 1s)."""
    data = [1] * rows * width if values is None else values
    return {"data": data, "dtype": "int64", "shape": [rows, width]}


REFUSALS = {
    "unknown model": (
        lambda e: e.forward("nobody", batch(datum(SEQUENCE))),
        "unknown model 'nobody'",
    ),
    "unknown loss": (
        lambda e: e.forward("m", batch(datum(SEQUENCE), loss_fn="stable_reinforce")),
        "loss_fn 'stable_reinforce' is not supported here; use one of ['cispo', 'cross_entropy', "
        "'dro', 'gspo', 'importance_sampling', 'ppo'] (or forward_backward_custom",
    ),
    "a setting the loss does not read": (
        lambda e: e.forward("m", {**batch(datum(SEQUENCE)), "loss_fn_config": {"beta": 0.1}}),
        "cross_entropy's loss_fn_config reads nothing, not ['beta']",
    ),
    "dro without its beta": (
        lambda e: e.forward("m", batch(rl_datum(), loss_fn="dro")),
        "dro needs loss_fn_config {'beta': a number}",
    ),
    "gspo without its clip": (
        lambda e: e.forward("m", batch(rl_datum(), loss_fn="gspo")),
        "gspo needs loss_fn_config {'clip_low_threshold': a number}",
    ),
    "gspo with half its clip": (
        lambda e: e.forward(
            "m", {**batch(rl_datum(), loss_fn="gspo"), "loss_fn_config": {"clip_low_threshold": 1}}
        ),
        "gspo needs loss_fn_config {'clip_high_threshold': a number}",
    ),
    "a negative setting": (
        lambda e: e.forward(
            "m", {**batch(rl_datum(), loss_fn="dro"), "loss_fn_config": {"beta": -1}}
        ),
        "dro's loss_fn_config beta must be a finite number >= 0, got -1",
    ),
    "clip thresholds crossed": (
        lambda e: e.forward(
            "m",
            {
                **batch(rl_datum(), loss_fn="ppo"),
                "loss_fn_config": {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2},
            },
        ),
        "ppo's clip_low_threshold must not exceed its clip_high_threshold",
    ),
    "targets shorter than the input": (
        lambda e: e.forward("m", batch(_short_targets())),
        "target_tokens must be int64 of shape (23,) or (23, K)",
    ),
    "image chunk": (lambda e: e.forward("m", batch(_image_datum())), "has a chunk of type 'image'"),
    "rank 0": (lambda e: e.create("other", rank=0), "rank must be a positive integer"),
    "negative rank": (lambda e: e.create("other", rank=-4), "rank must be a positive integer"),
    "rank above a layer's size": (lambda e: e.create("other", rank=64), "at most 32"),
    "existing model": (lambda e: e.create("m", rank=4), "model 'm' exists already"),
    "missing loss input": (
        lambda e: e.forward("m", batch(datum(SEQUENCE), loss_fn="importance_sampling")),
        "importance_sampling lacks ['advantages', 'logprobs']",
    ),
    "other optimizer": (
        lambda e: e.optim_step("m", {"learning_rate": 1e-3, "momentum": 0.9}),
        "only Adam is offered",
    ),
    "top-k prompt logprobs past vLLM's 20": (
        lambda e: e.sample("m", {**sample_request([1, 2]), "topk_prompt_logprobs": 21}),
        "topk_prompt_logprobs must be at most 20, got 21",
    ),
    "negative top-k sample logprobs": (
        lambda e: e.sample("m", {**sample_request([1, 2]), "topk_sample_logprobs": -1}),
        "topk_sample_logprobs must be an integer >= 0, got -1",
    ),
    "a seed past a torch generator's": (
        lambda e: e.sample("m", sample_request([1, 2], max_tokens=1, seed=2**64)),
        "seed must be below 2**64 (a torch generator's), got 18446744073709551616",
    ),
    "alternative prompt tokens past 20": (
        lambda e: e.sample("m", {**sample_request([1, 2]), "prompt_alt_tokens_k": 21}),
        "prompt_alt_tokens_k must be at most 20, got 21",
    ),
    "target logprobs not one row per prompt token after the first": (
        lambda e: e.sample(
            "m", {**sample_request([1, 2, 3]), "target_prompt_logprobs": target_ids(3, 1)}
        ),
        "target_prompt_logprobs must have the shape [len(prompt) - 1, K] = [2, K] with K from 1 "
        "to 20, got [3, 1]",
    ),
    "target logprobs more than 20 a position": (
        lambda e: e.sample(
            "m", {**sample_request([1, 2]), "target_prompt_logprobs": target_ids(1, 21)}
        ),
        "target_prompt_logprobs must have the shape [len(prompt) - 1, K] = [1, K] with K from 1 "
        "to 20, got [1, 21]",
    ),
    "a target token past the vocabulary": (
        lambda e: e.sample(
            "m", {**sample_request([1, 2]), "target_prompt_logprobs": target_ids(1, 2, [5, 768])}
        ),
        "target_prompt_logprobs holds 768: each cell is one of the base's token ids below 768, "
        "or -1 for none",
    ),
    "sparse targets whose rows do not add up": (
        lambda e: e.sample(
            "m",
            {
                **sample_request([1, 2, 3]),
                "target_prompt_logprobs": {
                    **target_ids(2, 2, [5]),
                    "sparse_crow_indices": [0, 1, 2],
                    "sparse_col_indices": [0],
                },
            },
        ),
        "target_prompt_logprobs has sparse_crow_indices that are not 3 row pointers rising",
    ),
    "beyond the context": (
        lambda e: e.sample("m", sample_request([1, 2], max_tokens=5000)),
        "lower max_tokens to at most 1022",
    ),
}


@pytest.mark.parametrize(("call", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_a_bad_request_is_refused_with_what_to_change(engine, call, message):
    engine.create("m", rank=4, seed=0)
    with pytest.raises(InteractiveError, match=re.escape(message)):
        call(engine)


def test_ignore_eos_samples_past_the_bases_end_of_sequence_as_many_tokens_as_asked(
    base: ResidentBase,
) -> None:
    """vLLM's `ignore_eos` (load generators ask it for replies of a known length): a chat or a
    completion that would end at the base's end of sequence samples every token it may."""
    greedy = {"max_tokens": 6, "temperature": 0.0}
    completion = {
        "completion": {"text": "The sky is", "echo": False, "logprobs": None, "max_tokens": 6},
        "num_samples": 1,
        "sampling_params": greedy,
    }
    chat = {
        "messages": [{"role": "user", "content": "Hi"}],
        "num_samples": 1,
        "sampling_params": greedy,
    }
    plain = InteractiveEngine(base)
    assert plain.sample(None, completion)["completion_tokens"] == 6  # nothing ends it sooner
    # A base whose end of sequence is the token each of them samples first.
    prompt = {
        "prompt": model_input(base.tokenizer.encode("The sky is")),
        "num_samples": 1,
        "sampling_params": greedy,
    }
    firsts = [plain.sample(None, asked)["sequences"][0]["tokens"][0] for asked in (prompt, chat)]
    base.model.generation_config.eos_token_id = firsts
    engine = InteractiveEngine(base)
    ended = engine.sample(None, completion)
    assert ended["completion_tokens"] == 1 and ended["sequences"][0]["finish_reason"] == "stop"
    assert len(engine.sample(None, chat)["sequences"][0]["tokens"]) == 1
    past = engine.sample(None, {**completion, "ignore_eos": True})
    assert past["completion_tokens"] == 6 and past["sequences"][0]["finish_reason"] == "length"
    chatted = engine.sample(None, {**chat, "ignore_eos": True})["sequences"][0]
    assert len(chatted["tokens"]) == 6 and chatted["stop_reason"] == "length"
    # Stop strings still end it.
    text = past["sequences"][0]["text"]
    assert text.strip()
    stop = next(text[k : k + 2] for k in range(len(text) // 2, len(text)) if text[k].strip())
    stopped = engine.sample(
        None, {**completion, "ignore_eos": True, "sampling_params": {**greedy, "stop": [stop]}}
    )
    assert stopped["sequences"][0]["finish_reason"] == "stop"
    assert stopped["sequences"][0]["text"] == text[: text.index(stop)]
