"""Sample calls decoded together (`InteractiveEngine.sample_many`), of one model or of several
models and the base in one forward pass: the prompts padded beside each other answer exactly
what each request answers alone, each with its own model, parameters, seed, stops, top-k
logprobs, target logprobs and alternative prompt tokens (asked by some requests of a batch, not
by others); a bad request (or an unknown model) is refused alone; batches split at
SAMPLE_TOKENS. The tiny test base, real torch + peft, CPU, fp32."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from tests.fixtures.testbase import TEST_BASE_PATH
from tests.unit.test_interactive_engine import (
    OTHER,
    SEQUENCE,
    batch,
    datum,
    sample_request,
    train,
)
from workers.interactive import sample_batching, sample_run, sampling
from workers.interactive.engine import InteractiveEngine, InteractiveError
from workers.training.resident import ResidentBase


@pytest.fixture
def engine() -> InteractiveEngine:
    return InteractiveEngine(ResidentBase.load(TEST_BASE_PATH, "fp32"))


def _decoded_batches(monkeypatch: pytest.MonkeyPatch, budget: int) -> list[int]:
    """Set the batches' token budget; then how many requests each batch decoded held."""
    monkeypatch.setattr(sample_batching, "SAMPLE_TOKENS", budget)
    held: list[int] = []
    generate = sampling.generate  # the engine's own, unwrapped

    def counted(model: Any, requests: list[Any], *args: Any, **kwargs: Any) -> Any:
        held.append(len(requests))
        return generate(model, requests, *args, **kwargs)

    monkeypatch.setattr(sample_run, "generate", counted)
    return held


def _same(together: dict[str, Any], alone: dict[str, Any]) -> None:
    assert len(together["sequences"]) == len(alone["sequences"])
    for mine, theirs in zip(together["sequences"], alone["sequences"], strict=True):
        assert mine["tokens"] == theirs["tokens"]
        assert mine["stop_reason"] == theirs["stop_reason"]
        assert mine["logprobs"] == pytest.approx(theirs["logprobs"], abs=1e-4)
        _same_topk(mine.get("topk_logprobs"), theirs.get("topk_logprobs"))
    if alone["prompt_logprobs"] is None:
        assert together["prompt_logprobs"] is None
    else:
        assert together["prompt_logprobs"][0] is None
        assert together["prompt_logprobs"][1:] == pytest.approx(
            alone["prompt_logprobs"][1:], abs=1e-4
        )
    _same_topk(together.get("topk_prompt_logprobs"), alone.get("topk_prompt_logprobs"))
    _same_tensor(together.get("target_prompt_logprobs"), alone.get("target_prompt_logprobs"))
    if alone.get("prompt_alt_tokens") is None:
        assert together.get("prompt_alt_tokens") is None
    else:
        mine, theirs = together["prompt_alt_tokens"], alone["prompt_alt_tokens"]
        assert mine["tokens"] == theirs["tokens"]
        _same_tensor(mine["logprobs"], theirs["logprobs"])


def _same_tensor(together: Any, alone: Any) -> None:
    """TensorData JSON of the same layout and values (None where not asked)."""
    if alone is None:
        assert together is None
        return
    assert {k: v for k, v in together.items() if k != "data"} == {
        k: v for k, v in alone.items() if k != "data"
    }
    assert together["data"] == pytest.approx(alone["data"], abs=1e-4)


def _targets(prompt: list[int]) -> dict[str, Any]:
    """`target_prompt_logprobs` asking, at each position, for the prompt's token and token 3."""
    data = [token for own in prompt[1:] for token in (own, 3)]
    return {"data": data, "dtype": "int64", "shape": [len(prompt) - 1, 2]}


def _same_topk(together: Any, alone: Any) -> None:
    """Top-k rows (None where a position has none) with the same tokens and logprobs."""
    if alone is None:
        assert together is None
        return
    assert [row is None for row in together] == [row is None for row in alone]
    for mine, theirs in zip(together, alone, strict=True):
        if theirs is not None:
            assert [t for t, _ in mine] == [t for t, _ in theirs]
            assert [lp for _, lp in mine] == pytest.approx([lp for _, lp in theirs], abs=1e-4)


def _decoded_as_alone(
    engine: InteractiveEngine,
    monkeypatch: pytest.MonkeyPatch,
    asked: list[tuple[str | None, dict[str, Any]]],
    alone: list[dict[str, Any]],
    refusal: str,
    split: tuple[int, list[int]],
) -> None:
    """`asked` (its fifth request refused, saying `refusal`) decoded together answers `alone`,
    in one batch, and again in the batches `split` gives for a smaller token budget."""
    for budget, batches in ((sample_batching.SAMPLE_TOKENS, [len(alone)]), split):
        decoded = _decoded_batches(monkeypatch, budget)
        together = engine.sample_many(asked)
        assert decoded == batches
        refused = together.pop(4)
        assert isinstance(refused, InteractiveError) and refusal in str(refused)
        for mine, theirs in zip(together, alone, strict=True):
            assert not isinstance(mine, InteractiveError)
            _same(mine, theirs)


def test_sample_calls_decoded_together_answer_what_each_answers_alone(
    engine: InteractiveEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 3)
    greedy = sample_request(SEQUENCE[:6], max_tokens=7, temperature=0.0, stop=[])
    stop_at = engine.sample("m", greedy)["sequences"][0]["tokens"][3]
    requests = [
        {
            **greedy,
            "prompt_logprobs": True,
            "topk_prompt_logprobs": 4,
            "topk_sample_logprobs": 2,
            "target_prompt_logprobs": _targets(SEQUENCE[:6]),
        },
        {
            **sample_request(OTHER[:11], n=3, max_tokens=5, temperature=1.0, seed=7, stop=[]),
            "topk_sample_logprobs": 5,
            "prompt_alt_tokens_k": 3,
        },
        sample_request(
            SEQUENCE[3:5], n=2, max_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=3, stop=[]
        ),
        sample_request(SEQUENCE[:6], max_tokens=12, temperature=0.0, stop=[stop_at]),
        sample_request(SEQUENCE[:6], max_tokens=0),  # refused: max_tokens must be >= 1
        {
            **sample_request(OTHER[2:9], max_tokens=4, temperature=0.0),
            "prompt_logprobs": True,
            "prompt_logprobs_last_n": 2,
            "topk_prompt_logprobs": 3,
        },
    ]
    alone = [engine.sample("m", r) for i, r in enumerate(requests) if i != 4]
    assert alone[3]["sequences"][0]["stop_reason"] == "stop"  # it stops before the others

    # One batch; then, within 40 tokens (rows times the longest row), 1, 1, 1 and 2 requests.
    asked: list[tuple[str | None, dict[str, Any]]] = [("m", r) for r in requests]
    _decoded_as_alone(engine, monkeypatch, asked, alone, "max_tokens", (40, [1, 1, 1, 2]))


def test_the_bases_samples_batch_too_and_a_batch_of_only_refusals_runs_nothing(
    engine: InteractiveEngine,
) -> None:
    requests = [
        sample_request(SEQUENCE[:4], n=2, max_tokens=6, temperature=1.0, seed=1, stop=[]),
        sample_request(OTHER[:9], max_tokens=3, temperature=0.0, stop=[]),
    ]
    for mine, theirs in zip(
        engine.sample_many([(None, r) for r in requests]),
        [engine.sample(None, r) for r in requests],
        strict=True,
    ):
        assert not isinstance(mine, InteractiveError)
        _same(mine, theirs)
    [refused] = engine.sample_many([(None, sample_request([], max_tokens=3))])
    assert isinstance(refused, InteractiveError)


def test_several_models_and_the_base_share_a_batch_each_row_through_its_own_adapter(
    engine: InteractiveEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tenants' models on one base: one trained, one trained otherwise, a sampler loaded from
    an export, and the base alone, asked at once: each answers as it does alone."""
    engine.create("a", rank=8, seed=0)
    train(engine, "a", 3)
    engine.create("b", rank=4, seed=1)
    engine.forward_backward("b", batch(datum(OTHER)))
    engine.optim_step("b", {"learning_rate": 5e-2})
    engine.export_adapter("a", tmp_path / "a", base_name="testbase")
    engine.load_sampler("sampler-a", tmp_path / "a")
    prompt = SEQUENCE[:6]
    greedy = {"max_tokens": 6, "temperature": 0.0, "stop": []}
    asked = [
        ("a", {**sample_request(prompt, **greedy), "prompt_logprobs": True}),
        (
            None,
            {
                **sample_request(prompt, **greedy),
                "topk_prompt_logprobs": 2,
                "target_prompt_logprobs": _targets(prompt),
            },
        ),
        (
            "b",
            {
                **sample_request(OTHER[:9], n=2, max_tokens=5, temperature=1.0, seed=4, stop=[]),
                "prompt_alt_tokens_k": 4,
            },
        ),
        ("sampler-a", sample_request(prompt, **greedy)),
        ("nobody", sample_request(prompt, **greedy)),
        (
            "b",
            {
                **sample_request(prompt, **greedy),
                "prompt_logprobs": True,
                "topk_sample_logprobs": 3,
            },
        ),
    ]
    alone = [engine.sample(m, r) for m, r in asked if m != "nobody"]
    # The models differ from each other and from the base on the same prompt.
    assert len({str(alone[i]["sequences"][0]["logprobs"]) for i in (0, 1, 4)}) == 3
    assert alone[3]["sequences"][0]["tokens"] == alone[0]["sequences"][0]["tokens"]

    _decoded_as_alone(engine, monkeypatch, asked, alone, "nobody", (30, [2, 1, 2]))


def test_a_request_stopped_midway_ends_there_and_its_batch_mates_decode_as_alone(
    engine: InteractiveEngine, pass_sizes: list[int]
) -> None:
    """`generate`'s `on_step` stops a request (a streamed chat whose client left): its rows end
    after the tokens sampled so far, as at `max_tokens`; the other request's rows are as alone."""
    from workers.interactive.sample_requests import read_sample_request

    def read(request: dict[str, Any]) -> Any:
        return read_sample_request(request, 768, 1024, frozenset())

    first = read(sample_request(SEQUENCE[:5], 2, max_tokens=12, temperature=1.0, seed=3))
    second = read(sample_request(OTHER[:7], 1, max_tokens=12, temperature=1.0, seed=4))
    base = engine.base
    steps: list[int] = []

    def on_step(rows: sampling.Rows) -> set[int]:
        steps.append(len(rows[0][0]["tokens"]))
        assert len(rows[0][0]["logprobs"]) == len(rows[0][0]["tokens"])
        return {0} if len(rows[0][0]["tokens"]) >= 4 else set()

    with sampling.evaluating(base.model):
        stopped, other = sampling.generate(
            base.model, [first, second], base.tokenizer, base.device, on_step=on_step
        )
        passes = list(pass_sizes)
        [alone] = sampling.generate(base.model, [second], base.tokenizer, base.device)
    assert [len(s["tokens"]) for s in stopped["sequences"]] == [4, 4]
    assert {s["stop_reason"] for s in stopped["sequences"]} == {"length"}
    assert other["sequences"][0]["tokens"] == alone["sequences"][0]["tokens"]
    assert len(other["sequences"][0]["tokens"]) == 12 and steps[:4] == [1, 2, 3, 4]
    # the stopped request's rows left the batch after their fourth token
    assert passes == [3, 3, 3, 3] + [1] * 8


@pytest.fixture
def pass_sizes(engine: InteractiveEngine) -> Iterator[list[int]]:
    """The rows of each forward pass of the engine's model, as they run."""
    sizes: list[int] = []

    def count(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        sizes.append(kwargs["input_ids"].shape[0])

    handle = engine.base.model.register_forward_pre_hook(count, with_kwargs=True)
    yield sizes
    handle.remove()


def test_rows_that_have_finished_leave_the_batch_and_the_rest_decode_as_alone(
    engine: InteractiveEngine, pass_sizes: list[int]
) -> None:
    """A row that has stopped leaves the batch with its KV cache: the passes after it hold the
    rows still decoding (here three short rows of model a leave first, then the mid-length row
    of a, and the row of model b is decoded last), and each request still answers as alone,
    each row through its own adapter and with its own top-k once the batch has narrowed."""
    engine.create("a", rank=8, seed=0)
    train(engine, "a", 2)
    engine.create("b", rank=4, seed=1)
    engine.forward_backward("b", batch(datum(OTHER)))
    engine.optim_step("b", {"learning_rate": 5e-2})
    asked: list[tuple[str | None, dict[str, Any]]] = [
        ("a", sample_request(SEQUENCE[:5], n=3, max_tokens=3, temperature=1.0, seed=2, stop=[])),
        (
            "b",
            {
                **sample_request(OTHER[:7], max_tokens=10, temperature=0.0, stop=[]),
                "topk_sample_logprobs": 3,  # its row's place moves from 3 to 0, then stays
            },
        ),
        ("a", sample_request(SEQUENCE[:4], max_tokens=6, temperature=0.0, stop=[])),
    ]
    alone = [engine.sample(m, r) for m, r in asked]
    pass_sizes.clear()
    together = engine.sample_many(asked)
    # the prompts, then a pass a token: the three rows of 3 leave after their third, the row
    # of 6 after its sixth (before: every pass held all five rows)
    assert pass_sizes == [5, 5, 5, 2, 2, 2, 1, 1, 1, 1]
    for mine, theirs in zip(together, alone, strict=True):
        assert not isinstance(mine, InteractiveError)
        _same(mine, theirs)
    assert [len(s["tokens"]) for r in together for s in r["sequences"]] == [3, 3, 3, 10, 6]


def test_each_answer_is_handed_over_once_its_rows_are_done_while_the_longer_rows_go_on(
    engine: InteractiveEngine, pass_sizes: list[int]
) -> None:
    """`sample_many`'s `on_answer` is given each request's answer as soon as it has it, once
    each: a refusal before any pass, a SampleResponse after the pass that sampled its rows'
    last token, while a longer request's rows go on decoding; what it is given is what the
    batch returns, and what the request answers alone."""
    engine.create("a", rank=8, seed=0)
    train(engine, "a", 2)
    asked: list[tuple[str | None, dict[str, Any]]] = [
        ("a", sample_request(SEQUENCE[:5], max_tokens=9, temperature=0.0, stop=[])),
        ("a", sample_request(SEQUENCE[:5], max_tokens=0)),  # refused: max_tokens must be >= 1
        (None, sample_request(OTHER[:7], n=2, max_tokens=3, temperature=1.0, seed=4, stop=[])),
        ("a", sample_request(OTHER[:4], max_tokens=5, temperature=0.0, stop=[])),
    ]
    alone = {i: engine.sample(m, r) for i, (m, r) in enumerate(asked) if i != 1}
    pass_sizes.clear()
    given: list[tuple[int, int, Any]] = []  # (request, passes run by then, what it was given)
    together = engine.sample_many(
        asked, on_answer=lambda i, answer: given.append((i, len(pass_sizes), answer))
    )
    # the prompts' pass samples every row's first token, then a pass a token
    assert [(i, passes) for i, passes, _ in given] == [(1, 0), (2, 3), (3, 5), (0, 9)]
    assert pass_sizes == [4, 4, 4, 2, 2, 1, 1, 1, 1]
    for i, _, answer in given:
        assert answer is together[i]
    refused = together[1]
    assert isinstance(refused, InteractiveError) and "max_tokens" in str(refused)
    for i, theirs in alone.items():
        mine = together[i]
        assert not isinstance(mine, InteractiveError)
        _same(mine, theirs)


def test_a_seeded_requests_rows_that_stop_early_leave_and_it_answers_as_alone(
    engine: InteractiveEngine,
) -> None:
    """A request of several rows at temperature 1 whose rows stop at different steps (at a stop
    token) draws from then on for its rows still decoding only: behind another model's short
    request, which leaves first and moves every one of its rows up a place, it answers what it
    answers alone, row for row."""
    engine.create("a", rank=8, seed=0)
    train(engine, "a", 2)
    engine.create("b", rank=4, seed=1)
    seeded = sample_request(SEQUENCE[:6], n=4, max_tokens=12, temperature=1.0, seed=5, stop=[])
    first_row = engine.sample("a", seeded)["sequences"][0]["tokens"]
    stop = {**seeded, "sampling_params": {**seeded["sampling_params"], "stop": [first_row[1]]}}
    asked: list[tuple[str | None, dict[str, Any]]] = [
        ("b", sample_request(OTHER[:9], max_tokens=4, temperature=0.0, stop=[])),
        ("a", stop),
    ]
    alone = [engine.sample(m, r) for m, r in asked]
    rows = alone[1]["sequences"]
    assert rows[0]["tokens"] == first_row[:2], rows[0]  # its first row stops at its second
    assert len({len(row["tokens"]) for row in rows}) > 1, rows  # and the others elsewhere
    together = engine.sample_many(asked)
    for mine, theirs in zip(together, alone, strict=True):
        assert not isinstance(mine, InteractiveError)
        _same(mine, theirs)


def _lfm2(vocab_size: int) -> Any:
    from transformers import Lfm2Config, Lfm2ForCausalLM

    return Lfm2ForCausalLM(
        Lfm2Config(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            layer_types=["conv", "full_attention", "conv", "full_attention"],
            max_position_embeddings=256,
        )
    )


def _minimax(vocab_size: int) -> Any:
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    return MiniMaxForCausalLM(
        MiniMaxConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=2,
            num_experts_per_tok=1,
            layer_types=["linear_attention", "full_attention"],
            max_position_embeddings=256,
            block_size=16,
        )
    )


@pytest.mark.parametrize(
    ("build", "passes"),
    [
        pytest.param(_lfm2, [4, 4, 4] + [1] * 7, id="lfm2-rows-leave"),
        pytest.param(_minimax, [4] * 10, id="minimax-rows-run-along"),
    ],
)
def test_a_hybrid_bases_rows_leave_with_their_states_or_run_along(
    build: Any, passes: list[int]
) -> None:
    """A base whose layers keep more than keys and values: LFM2's short convolutions (a state a
    row, in its layers) leave with their rows; MiniMax's lightning attention keeps its state
    outside its cache's layers, which its cache cannot narrow, so its finished rows run along
    to the batch's end. Random tiny models, rows of 3 tokens beside a row of 10: each request
    answers what it answers alone."""
    from workers.interactive.sample_requests import read_sample_request

    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    torch.manual_seed(0)
    model = build(len(tokenizer)).eval()

    def read(request: dict[str, Any]) -> Any:
        return read_sample_request(request, len(tokenizer), 256, frozenset())

    requests = [  # prompts of one length: no padding tells the batch from the rows alone
        read(sample_request(SEQUENCE[:5], 3, max_tokens=3, temperature=1.0, seed=2, stop=[])),
        read(sample_request(OTHER[:5], 1, max_tokens=10, temperature=1.0, seed=4, stop=[])),
    ]
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    cpu = torch.device("cpu")
    together = sampling.generate(model, requests, tokenizer, cpu)
    handle.remove()
    assert sizes == passes
    for mine, request in zip(together, requests, strict=True):
        [theirs] = sampling.generate(model, [request], tokenizer, cpu)
        _same(mine, theirs)
    assert [len(s["tokens"]) for r in together for s in r["sequences"]] == [3, 3, 3, 10]
