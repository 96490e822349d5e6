"""A base whose rope scaling reads the batch's largest position (dynamic NTK, longrope): a
sample request whose positions reach past where that couples rows decodes alone, in a batch of
its own, and neither joins a running batch nor lets one join it, so every request still
answers what it answers alone; requests within the bound still decode together. The tiny test
base with longrope scaling past 16 positions, real torch + peft, CPU, fp32."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import Gemma3TextConfig, LlamaConfig, Phi3Config

from tests.fixtures.testbase import TEST_BASE_PATH
from tests.unit.test_interactive_engine import (
    OTHER,
    SEQUENCE,
    batch,
    datum,
    logprobs,
    sample_request,
    train,
)
from tests.unit.test_interactive_sample_batches import _decoded_batches, _same
from tests.unit.test_interactive_sample_joins import _offers
from workers.interactive import forwarding, sampling
from workers.interactive.engine import InteractiveEngine, InteractiveError
from workers.interactive.sample_batching import SAMPLE_TOKENS, rope_couples_past, sample_batches
from workers.interactive.sample_requests import read_sample_request
from workers.training.resident import ResidentBase

BOUND = 16  # the longrope base's original context: its rows couple past it

Asked = tuple[str | None, dict[str, Any]]


@pytest.fixture(scope="module")
def longrope_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny test base (a context of 1,024 positions), its rotary embedding scaled by longrope
    past its original 16 positions, as Phi-3's 128k bases past their original 4,096."""
    path = tmp_path_factory.mktemp("longrope-base")
    for file in TEST_BASE_PATH.iterdir():
        shutil.copy(file, path / file.name)
    config = json.loads((path / "config.json").read_text())
    half = config["head_dim"] // 2
    config["rope_parameters"] = {
        "rope_type": "longrope",
        "short_factor": [1.0] * half,
        "long_factor": [4.0 * (k + 1) for k in range(half)],
        "original_max_position_embeddings": BOUND,
        "rope_theta": 10000.0,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def engine(longrope_base: Path) -> InteractiveEngine:
    return InteractiveEngine(ResidentBase.load(longrope_base, "fp32"))


def _request(tokens: list[int], max_tokens: int, n: int = 1) -> dict[str, Any]:
    return sample_request(tokens, n=n, max_tokens=max_tokens, temperature=0.0, stop=[])


def test_rows_beside_one_that_reaches_past_the_bound_would_read_differently(
    engine: InteractiveEngine,
) -> None:
    """Why the bound matters: decoded in one batch (as the executor did before), a short
    request beside one that reaches past 16 positions does not answer what it answers alone."""
    base = engine.base

    def read(request: dict[str, Any]) -> Any:
        return read_sample_request(request, len(base.tokenizer), 1024, frozenset())

    # The long row passes 16 positions at its fifth token, the short row's fifth of 13.
    short, long = read(_request(SEQUENCE[:3], 13)), read(_request(OTHER[:12], 12))
    with sampling.evaluating(base.model):
        together, _ = sampling.generate(base.model, [short, long], base.tokenizer, base.device)
        [alone] = sampling.generate(base.model, [short], base.tokenizer, base.device)
    with pytest.raises(AssertionError):
        _same(together, alone)


def test_a_request_that_reaches_past_the_bound_decodes_in_a_batch_of_its_own(
    engine: InteractiveEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of six requests (of a trained model and the base), the two that reach past 16 positions
    (14 + 8, and 12 + 6 in two rows) each decode alone; those within it (3 + 13, still
    decoding when a long row would pass 16, and 5 + 12, whose last token sampled is never read:
    it reads 16) decode together around them; every request answers what it answers alone."""
    engine.create("m", rank=8, seed=0)
    train(engine, "m", 2)
    asked: list[Asked] = [
        ("m", _request(SEQUENCE[:3], 13)),
        (None, _request(OTHER[:5], 12, n=2)),  # reads 16 positions: the bound, not past it
        ("m", _request(OTHER[:14], 8)),
        (None, _request(SEQUENCE[:12], 6, n=2)),
        ("m", _request(SEQUENCE[3:5], 12)),
        (None, _request(OTHER[2:6], 10)),
    ]
    alone = [engine.sample(model, request) for model, request in asked]
    decoded = _decoded_batches(monkeypatch, SAMPLE_TOKENS)
    together = engine.sample_many(asked)
    assert decoded == [2, 1, 1, 2]
    for mine, theirs in zip(together, alone, strict=True):
        assert not isinstance(mine, InteractiveError)
        _same(mine, theirs)


def test_no_request_joins_across_the_bound(engine: InteractiveEngine) -> None:
    """A batch within the bound takes a joiner within it and not one that reaches past it (the
    offer ends there); a batch that reaches past it takes no joiner, however short."""
    short: list[Asked] = [(None, _request(SEQUENCE[:4], 10))]
    within: Asked = (None, _request(OTHER[:3], 4))
    past: Asked = (None, _request(OTHER[:12], 6))
    more, taken = _offers({1: [within], 2: [past, within]})
    answers = engine.sample_many(short, more=more)
    assert taken[:2] == [[True], [False]]
    alone = [engine.sample(*short[0]), engine.sample(*within)]
    for mine, theirs in zip(answers, alone, strict=True):
        assert not isinstance(mine, InteractiveError)
        _same(mine, theirs)

    long: list[Asked] = [(None, _request(SEQUENCE[:8], 12))]
    more, taken = _offers({1: [within], 2: [within]})
    [answer] = engine.sample_many(long, more=more)
    assert taken[:2] == [[False], [False]]
    assert not isinstance(answer, InteractiveError)
    _same(answer, engine.sample(*long[0]))


def _head_dim_factors(config: Any, factor: float) -> list[float]:
    return [factor] * (config.hidden_size // config.num_attention_heads // 2)


def test_the_bound_is_where_the_bases_rope_reads_the_batchs_positions() -> None:
    """Dynamic NTK couples rows past the context the base was trained on, longrope past its
    original context; default, linear, YaRN and llama3 scaling never do; a base with a set of
    rope parameters a layer type couples where its first coupling set does."""
    small = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64}
    theta = {"rope_theta": 10000.0}
    assert rope_couples_past(None) is None
    assert rope_couples_past(LlamaConfig(**small)) is None
    for fixed in (
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
        {
            "rope_type": "llama3",
            "factor": 2.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ):
        assert rope_couples_past(LlamaConfig(**small, rope_parameters={**fixed, **theta})) is None
    dynamic = LlamaConfig(**small, rope_parameters={"rope_type": "dynamic", "factor": 2.0, **theta})
    assert rope_couples_past(dynamic) == 64
    phi = Phi3Config(**small, original_max_position_embeddings=32)
    phi.rope_parameters = {
        "rope_type": "longrope",
        "short_factor": _head_dim_factors(phi, 1.0),
        "long_factor": _head_dim_factors(phi, 2.0),
        "original_max_position_embeddings": 32,
        **theta,
    }
    assert rope_couples_past(phi) == 32
    gemma = Gemma3TextConfig(**small, head_dim=16)
    gemma.rope_parameters = {
        "full_attention": {"rope_type": "dynamic", "factor": 2.0, **theta},
        "sliding_attention": {"rope_type": "default", **theta},
    }
    assert rope_couples_past(gemma) == 64


def test_the_bound_counts_the_positions_a_row_reads() -> None:
    """A row's last sampled token is never read: a prompt and its tokens 17 long read 16
    positions (at the bound, together), 18 long read 17 (past it, alone)."""
    sizes = {0: (1, 10), 1: (2, 17), 2: (1, 18), 3: (1, 5), 4: (1, 17)}
    assert list(sample_batches(sizes, BOUND)) == [[0, 1], [2], [3, 4]]
    assert list(sample_batches(sizes, None)) == [[0, 1, 2, 3, 4]]


def test_datums_longer_than_the_bound_run_in_passes_apart_and_score_as_alone(
    engine: InteractiveEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward's datums of 20 tokens and of 11 (their padding within MAX_PADDING: one pass
    where rows do not couple) run in two passes on this base, each scored as alone; in one
    pass, the short one would not be."""
    engine.create("m", rank=4, seed=0)
    long, short = datum(SEQUENCE[:21]), datum(OTHER[:12])
    alone = [logprobs(engine.forward("m", batch(one))).tolist() for one in (long, short)]
    groups: list[int] = []
    own = forwarding.micro_batches

    def counted(*args: Any) -> Any:
        for group in own(*args):
            groups.append(len(group))
            yield group

    monkeypatch.setattr(forwarding, "micro_batches", counted)
    together = engine.forward("m", batch(long, short))
    assert groups == [1, 1]
    for k in range(2):
        assert logprobs(together, k).tolist() == pytest.approx(alone[k], abs=1e-5)

    monkeypatch.setattr(forwarding, "rope_couples_past", lambda config: None)  # as before
    groups.clear()
    coupled = engine.forward("m", batch(long, short))
    assert groups == [2]
    assert logprobs(coupled, 1).tolist() != pytest.approx(alone[1], abs=1e-4)
