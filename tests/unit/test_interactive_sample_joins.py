"""Requests joining a batch that is already decoding (`sample_many`'s `more`, `generate`'s `join`):
their prompts are read in a pass of their own, their rows decode with the batch's from the next
pass, and each answers exactly what it answers alone; one that would sample longer than any row
of the batch still may, or whose rows would pass SAMPLE_TOKENS, is not taken; a refusal is
answered at once; only the last of a call's batches is offered requests; a cache that cannot
take rows (a hybrid base's) is never offered any; the positions no row still reads are dropped.
The tiny test base, real torch + peft, CPU, fp32."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from tests.fixtures.testbase import TEST_BASE_PATH
from tests.unit.test_interactive_engine import OTHER, SEQUENCE, batch, datum, sample_request, train
from tests.unit.test_interactive_sample_batches import (
    _lfm2,
    _minimax,
    _same,
    engine,
    pass_sizes,
)
from workers.interactive import sample_batching, sampling
from workers.interactive.engine import InteractiveEngine, InteractiveError
from workers.interactive.sample_requests import read_sample_request

__all__ = ["engine", "pass_sizes"]  # the batch tests' fixtures, used here by name

Asked = tuple[str | None, dict[str, Any]]


def _offers(schedule: dict[int, list[Asked]]) -> tuple[Callable[..., None], list[list[bool]]]:
    """A `more` offering, at its n-th call (from 1), the requests `schedule[n]` in order until
    one is not taken (each taken added at once, as the executor adds a call once its claim is
    committed); and whether each offered was taken, by call."""
    taken: list[list[bool]] = []

    def more(take: Callable[[Asked], Callable[[], None] | None]) -> None:
        answered: list[bool] = []
        taken.append(answered)
        for one in schedule.get(len(taken), []):
            add = take(one)
            answered.append(add is not None)
            if add is None:
                return
            add()

    return more, taken


def test_requests_that_join_a_running_batch_answer_as_alone(
    engine: InteractiveEngine, pass_sizes: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests of two models (one sampled at temperature 1, seeded, in two rows) decode;
    before their second token, the base's request with a longer prompt than the batch's (the
    batch's caches are padded to it) and its top-k and prompt logprobs joins, a bad
    request is refused and answered at once, and a request whose rows would take the batch past
    its token budget is not taken (the offer ends there); before a later pass a short request
    joins, and then one asking more tokens than any row of the batch has left is not taken
    (the batch would run longer for it). Every request answers what it answers alone; the
    passes hold the rows still decoding, the joiners' prompts each read in a pass of their
    own."""
    engine.create("a", rank=8, seed=0)
    train(engine, "a", 2)
    engine.create("b", rank=4, seed=1)
    engine.forward_backward("b", batch(datum(OTHER)))
    engine.optim_step("b", {"learning_rate": 5e-2})
    first: list[Asked] = [
        ("a", sample_request(SEQUENCE[:5], max_tokens=12, temperature=0.0, stop=[])),
        ("b", sample_request(OTHER[:4], n=2, max_tokens=6, temperature=1.0, seed=3, stop=[])),
    ]
    joining: Asked = (
        None,
        {
            **sample_request(SEQUENCE[2:12], max_tokens=5, temperature=0.0, stop=[]),
            "topk_sample_logprobs": 3,
            "prompt_logprobs": True,
        },
    )
    refused: Asked = ("a", sample_request(SEQUENCE[:5], max_tokens=0))
    too_big: Asked = ("b", sample_request(OTHER[:6], n=2, max_tokens=10, temperature=0.0, stop=[]))
    later: Asked = ("a", sample_request(OTHER[1:4], max_tokens=3, temperature=0.0, stop=[]))
    too_long: Asked = ("b", sample_request(OTHER[1:4], max_tokens=8, temperature=0.0, stop=[]))
    more, taken = _offers({1: [joining, refused, too_big], 4: [later], 5: [too_long]})
    # Rows times the longest row within 120 tokens: the first offer's batch holds 3 rows, 6
    # positions and 11 tokens to go; with the joiner, 4 rows of 10 + 11 (84); with the third
    # request too, 6 rows of 10 + 11 (126). At the fifth offer a's row has 7 tokens to go.
    monkeypatch.setattr(sample_batching, "SAMPLE_TOKENS", 120)
    alone = [engine.sample(m, r) for m, r in [*first, joining, later]]
    given: list[tuple[int, int]] = []  # (request, passes run by then)
    pass_sizes.clear()
    together = engine.sample_many(
        first, on_answer=lambda i, _: given.append((i, len(pass_sizes))), more=more
    )
    # Offered before each token but the first (the longest row has 12): the first offer took
    # two of three, the fourth the short one, the fifth not the long one; the rest offered
    # nothing.
    assert len(taken) == 11 and taken[0] == [True, True, False] and taken[3] == [True]
    assert taken[4] == [False]
    assert all(not offered for k, offered in enumerate(taken) if k not in (0, 3, 4))
    # The prompts (3 rows), a pass of 3; the joiner's prompt alone, 3 passes of 4; the later
    # one's prompt, a pass of 5; b's two rows (6 tokens) and the joiner (5) leave: a pass of 2;
    # the later one (3) leaves: a's row alone to its twelfth token.
    assert pass_sizes == [3, 3, 1, 4, 4, 4, 1, 5, 2, 1, 1, 1, 1, 1]
    # The refusal at once; b's and the joiner's after their last tokens' pass, the later
    # one's after its own, a's at the end.
    assert given == [(3, 2), (1, 8), (2, 8), (4, 9), (0, 14)]
    assert len(together) == 5
    assert isinstance(together[3], InteractiveError) and "max_tokens" in str(together[3])
    for mine, theirs in zip([*together[:3], together[4]], alone, strict=True):
        assert not isinstance(mine, InteractiveError)
        _same(mine, theirs)
    assert [len(s["tokens"]) for s in together[2]["sequences"]] == [5]  # type: ignore[index]


def test_a_joiner_that_would_pass_the_token_budget_is_not_taken(
    engine: InteractiveEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows times the batch's longest row (its cache's width and the tokens its longest row
    still has) stay within SAMPLE_TOKENS when requests join: one that would pass it is left for
    a batch of its own, and one that fits joins."""
    first: list[Asked] = [(None, sample_request(SEQUENCE[:4], max_tokens=10, stop=[]))]
    wide: Asked = (None, sample_request(SEQUENCE[:4], n=4, max_tokens=2, stop=[]))
    narrow: Asked = (None, sample_request(SEQUENCE[:4], n=1, max_tokens=2, stop=[]))
    # Before the second pass: 1 row, a cache 5 wide, 9 tokens left: (1 + 4) * 14 = 70 > 40,
    # (1 + 1) * 14 = 28 <= 40.
    monkeypatch.setattr(sample_batching, "SAMPLE_TOKENS", 40)
    more, taken = _offers({1: [wide], 2: [narrow]})
    together = engine.sample_many(first, more=more)
    assert taken[:2] == [[False], [True]]
    assert len(together) == 2


@pytest.mark.parametrize(
    ("build", "offered"),
    [
        pytest.param(None, 9, id="llama-takes-rows"),
        pytest.param(_lfm2, 0, id="lfm2-never-offered"),
        pytest.param(_minimax, 0, id="minimax-never-offered"),
    ],
)
def test_only_a_cache_of_plain_layers_is_offered_rows(build: Any, offered: int) -> None:
    """A cache whose layers are each one keys and one values tensor (the tiny test base's) is
    offered rows before each pass but the first; a hybrid base's (LFM2's convolution states,
    MiniMax's lightning attention) never is: its rows could not be padded to join."""
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)
    torch.manual_seed(0)
    if build is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH, dtype=torch.float32).eval()
    else:
        model = build(len(tokenizer)).eval()
    request = read_sample_request(
        sample_request(SEQUENCE[:5], 2, max_tokens=10, temperature=0.0, stop=[]),
        len(tokenizer),
        256,
        frozenset(),
    )
    rooms: list[sample_batching.Room] = []

    def join(room: sample_batching.Room) -> list[Any]:
        rooms.append(room)
        return []

    sampling.generate(model, [request], tokenizer, torch.device("cpu"), join=join)
    assert len(rooms) == offered
    if offered:  # 2 rows, a cache as wide as the prompt and the tokens so far, the rest left
        assert rooms[0] == sample_batching.Room(rows=2, width=6, tokens_left=9)
        assert rooms[-1] == sample_batching.Room(rows=2, width=14, tokens_left=1)


def test_only_the_last_of_a_calls_batches_is_offered_requests(
    engine: InteractiveEngine, monkeypatch: pytest.MonkeyPatch, pass_sizes: list[int]
) -> None:
    """Requests the executor has taken, split into batches by SAMPLE_TOKENS, wait for no
    request asked later: the first batch is decoded without offers, only the last takes
    joiners."""
    first: list[Asked] = [
        (None, sample_request(SEQUENCE[:4], n=2, max_tokens=6, stop=[])),
        (None, sample_request(OTHER[:4], n=2, max_tokens=6, stop=[])),
    ]
    monkeypatch.setattr(sample_batching, "SAMPLE_TOKENS", 30)  # 2 rows of 4 + 6 a batch
    offered_at: list[int] = []

    def more(take: Callable[[Asked], Callable[[], None] | None]) -> None:
        offered_at.append(len(pass_sizes))

    together = engine.sample_many(first, more=more)
    assert len(together) == 2
    assert pass_sizes == [2] * 6 + [2] * 6  # two batches of 6 passes
    assert offered_at == [8, 9, 10, 11, 12]  # the second's, before each token but its first


def test_positions_no_row_reads_are_dropped_once_their_rows_leave(
    engine: InteractiveEngine,
) -> None:
    """A long prompt's row leaves after 2 tokens: the cache then drops the positions that
    padded the short prompt to it (the width the offers see falls from 20 to 4 positions and
    the tokens since), and the short prompt's request still answers as alone."""
    tokenizer = AutoTokenizer.from_pretrained(TEST_BASE_PATH)

    def read(request: dict[str, Any]) -> Any:
        return read_sample_request(request, len(tokenizer), 1024, frozenset())

    requests = [
        read(sample_request(SEQUENCE[:20], max_tokens=2, temperature=0.0, stop=[])),
        read(sample_request(OTHER[:4], max_tokens=8, temperature=0.0, stop=[])),
    ]
    widths: list[int] = []

    def join(room: sample_batching.Room) -> list[Any]:
        widths.append(room.width)
        return []

    base = engine.base
    with sampling.evaluating(base.model):
        _, short = sampling.generate(base.model, requests, base.tokenizer, base.device, join=join)
        [alone] = sampling.generate(base.model, [requests[1]], base.tokenizer, base.device)
    # Before the long row leaves: 20 + 1; after: the short prompt's 4 and its tokens so far.
    assert widths == [21, 6, 7, 8, 9, 10, 11]
    _same(short, alone)
