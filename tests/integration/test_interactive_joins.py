"""Sample calls asked while a sample batch decodes join it (continuous batching): the executor
claims them between passes, in the claim's order, while the next is a sample that fits; they
decode in the batch's passes and are answered as they finish, each what it answers alone; the
offer ends at a call of another kind, a saved sampler not in memory, or the batch's call limit,
and those wait for the next claim. Real PostgreSQL, the real
executor and engine on the tiny test base (`test_tinker_sample_batches.py` has one join through
the `tinker` SDK and the executor's `serve`, woken by the API's NOTIFY)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from control_plane import interactive_calls as calls
from control_plane.services import Services
from tests.factories import ask_call, interactive_model
from tests.integration.test_interactive_early_answers import _finished, _same, _sample
from tests.integration.test_interactive_runner import (
    FB,
    SEQUENCE,
    _answer,
    _ask_in_order,
    _runner,
    services,
    world,
)
from workers.interactive.runner import InteractiveRunner

__all__ = ["services", "world"]  # the executor tests' fixtures, used here by name


@contextmanager
def at_pass(runner: InteractiveRunner, at: int, then: Callable[[], None]) -> Iterator[list[int]]:
    """`then` run once, before the base's `at`-th forward pass from here (counted from 1); the
    rows of each pass, as they run."""
    sizes: list[int] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        sizes.append(kwargs["input_ids"].shape[0])
        if len(sizes) == at:
            then()

    handle = runner.engine.base.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield sizes
    finally:
        handle.remove()


def _models(
    services: Services, world: dict[str, str], runner: InteractiveRunner, names: list[str]
) -> dict[str, str]:
    """Models of the tenant by name, created on `runner`."""
    models = {
        name: interactive_model(
            services.engine, world["session"], world["tenant"], world["base"], name
        )
        for name in names
    }
    for name in names:
        _ask_in_order(services, world, models[name], [("create_model", {})])
    while runner.run_once():
        pass
    return models


def _ask(
    services: Services, world: dict[str, str], model: str, seq: int, kind: str, request: Any
) -> str:
    return ask_call(services.engine, model, world["tenant"], world["base"], kind, seq, request)


def test_a_sample_asked_while_a_batch_decodes_joins_it_and_answers_as_alone(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A long sample call decodes; before its fifth forward pass another model's sample call, a
    third model's forward_backward and a fourth model's sample are asked. The first joins
    (claimed between two passes, its prompt read in a pass of its own, then decoded beside the
    long one) and is answered before it; the offer stops at the forward_backward, next in the
    claim's order (a batch never overtakes a call of another kind), so the sample behind it
    waits for the next claims too. Each answers as alone."""
    runner = _runner(services, world, "exec-join", tmp_path)
    models = _models(services, world, runner, ["long", "short", "trains", "behind"])
    long_request, short_request = _sample(SEQUENCE[:6], 30), _sample(SEQUENCE[3:12], 6)
    long_call = _ask(services, world, models["long"], 1, "sample", long_request)
    later: dict[str, str] = {}

    def ask_meanwhile() -> None:
        for name, kind, request in (
            ("short", "sample", short_request),
            ("trains", "forward_backward", FB),
            ("behind", "sample", _sample(SEQUENCE[5:9], 4)),
        ):
            later[name] = _ask(services, world, models[name], 1, kind, request)

    with at_pass(runner, 5, ask_meanwhile) as sizes:
        assert runner.run_once()
    # The long call's prompt and 4 passes (the calls asked before the fifth); the short one's
    # prompt; 5 passes of 2 rows until the short one has its 6 tokens; the long one alone to
    # its 30th.
    assert sizes == [1] * 5 + [1] + [2] * 5 + [1] * 20
    assert runner.calls_run == 4 + 2
    long_row, short_row, trains_row, behind_row = _finished(
        services, [long_call, later["short"], later["trains"], later["behind"]]
    )
    assert long_row[0] == short_row[0] == "completed"
    assert long_row[1] < short_row[1] < short_row[2] < long_row[2]  # joined, answered first
    assert trains_row[0] == behind_row[0] == "pending"
    for call, name, request in (
        (long_call, "long", long_request),
        (later["short"], "short", short_request),
    ):
        alone = runner.engine.sample(models[name], request)["sequences"]
        _same(_answer(services, call)[1]["sequences"], alone)
    while runner.run_once():
        pass
    assert [row[0] for row in _finished(services, [later["trains"], later["behind"]])] == [
        "completed",
        "completed",
    ]


def test_calls_join_no_more_than_the_batch_holds(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """`LORAFORGE_INTERACTIVE_SAMPLE_BATCH_CALLS` bounds the calls a batch holds unanswered,
    those that joined included: with 2, one call joins a batch of one, the next only once a
    call of the batch is answered."""
    runner = _runner(services, world, "exec-room", tmp_path)
    runner.sample_batch = 2
    models = _models(services, world, runner, ["a", "b", "c"])
    first = _ask(services, world, models["a"], 1, "sample", _sample(SEQUENCE[:6], 30))
    asked: dict[str, str] = {}

    def ask_two() -> None:
        for name in ("b", "c"):
            asked[name] = _ask(
                services, world, models[name], 1, "sample", _sample(SEQUENCE[2:7], 4)
            )

    with at_pass(runner, 3, ask_two) as sizes:
        assert runner.run_once()
    # a's prompt and 2 passes (b and c asked before the third); b's prompt (2 calls
    # unanswered: c waits); 3 passes of 2 until b's 4 tokens are in; a alone, b answered; c's
    # prompt; 3 passes of 2; a alone to its 30th.
    assert sizes == [1, 1, 1] + [1] + [2] * 3 + [1] + [1] + [2] * 3 + [1] * 20
    rows = _finished(services, [first, asked["b"], asked["c"]])
    assert [status for status, _, _ in rows] == ["completed"] * 3
    assert rows[1][2] <= rows[2][1]  # c claimed once b was answered


def test_a_bad_sample_asked_meanwhile_fails_and_its_models_next_call_joins(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A sample call that cannot be sampled (max_tokens 0), asked while a batch decodes, is
    claimed, refused and answered with the reason (the user's), its claim committed before its
    answer; its model's next call, which could not run before it, joins the same batch once it
    is answered, and answers as alone."""
    runner = _runner(services, world, "exec-bad", tmp_path)
    models = _models(services, world, runner, ["long", "b"])
    long_call = _ask(services, world, models["long"], 1, "sample", _sample(SEQUENCE[:6], 30))
    good = _sample(SEQUENCE[1:8], 5)
    asked: list[str] = []

    def ask_two() -> None:
        asked.append(_ask(services, world, models["b"], 1, "sample", _sample(SEQUENCE[:4], 0)))
        asked.append(_ask(services, world, models["b"], 2, "sample", good))

    with at_pass(runner, 4, ask_two):
        assert runner.run_once()
    status, error = _answer(services, asked[0])
    assert status == "failed" and error["category"] == "user" and "max_tokens" in error["error"]
    long_row, bad_row, good_row = _finished(services, [long_call, *asked])
    assert good_row[0] == "completed"
    assert bad_row[2] <= good_row[1] and good_row[2] < long_row[2]  # joined once b's first ended
    alone = runner.engine.sample(models["b"], good)["sequences"]
    _same(_answer(services, asked[1])[1]["sequences"], alone)


@pytest.mark.parametrize(
    ("woken", "answered_meanwhile", "joins"),
    [
        pytest.param(lambda base: [], False, False, id="nothing-asked"),
        pytest.param(lambda base: [(calls.CHANNEL, "another-base")], False, False, id="elsewhere"),
        pytest.param(lambda base: [(calls.CHANNEL, base)], False, True, id="asked-on-its-base"),
        pytest.param(lambda base: [], True, True, id="a-call-answered"),
    ],
)
def test_a_serving_batch_looks_for_calls_only_once_woken(
    services: Services,
    world: dict[str, str],
    tmp_path: Path,
    woken: Callable[[str], list[tuple[str, str]]],
    answered_meanwhile: bool,
    joins: bool,
) -> None:
    """In `serve` a batch looks for calls to take only once a NOTIFY on its base came (the API
    sends one as a call is asked) or it answered a call (that model's next call may run now):
    a call asked meanwhile joins then, and otherwise waits for the next claim, no query made at
    the passes between."""
    runner = _runner(services, world, "exec-woken", tmp_path)
    models = _models(services, world, runner, ["long", "short", "late"])
    long_call = _ask(services, world, models["long"], 1, "sample", _sample(SEQUENCE[:6], 30))
    if answered_meanwhile:  # answered after the late call is asked
        _ask(services, world, models["short"], 1, "sample", _sample(SEQUENCE[2:6], 8))
    late: list[str] = []

    def ask_late() -> None:
        late.append(_ask(services, world, models["late"], 1, "sample", _sample(SEQUENCE[3:9], 4)))

    with at_pass(runner, 3, ask_late):
        assert runner.run_once(lambda: woken(world["base"]))
    long_row, late_row = _finished(services, [long_call, late[0]])
    if joins:
        assert late_row[0] == "completed" and late_row[2] < long_row[2]
    else:
        assert late_row[0] == "pending"
        assert runner.run_once(lambda: woken(world["base"]))
        assert _finished(services, late)[0][0] == "completed"


def test_a_saved_sampler_joins_only_while_in_memory(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A saved sampler's sample asked while a batch decodes joins it where the executor holds
    the sampler's weights; another sampler's, whose weights are in the object store, is not
    loaded meanwhile (with one sampler kept, loading it would drop one the batch may be reading):
    the offer ends at it, and it is taken by the next claim."""
    runner = _runner(services, world, "exec-samplers", tmp_path)
    runner.samplers_kept = 1
    tenant, base, session = world["tenant"], world["base"], world["session"]
    model = interactive_model(services.engine, session, tenant, base, "m")
    saves = [("save_weights_for_sampler", {"path": f"step-{step}"}) for step in range(2)]
    _ask_in_order(services, world, model, [("create_model", {}), ("forward_backward", FB), *saves])
    while runner.run_once():
        pass
    samplers = [
        interactive_model(
            services.engine,
            session,
            tenant,
            base,
            f"s{step}",
            kind="sampler",
            model_path=f"tinker://{model}/sampler_weights/step-{step}",
        )
        for step in range(2)
    ]
    _ask(services, world, samplers[0], 0, "sample", _sample(SEQUENCE[:4], 2))
    assert runner.run_once() and runner.engine.has(samplers[0])  # s0's weights loaded
    long_call = _ask(services, world, model, 4, "sample", _sample(SEQUENCE[:6], 30))
    asked: list[str] = []

    def ask_both() -> None:
        for sampler in samplers:
            asked.append(_ask(services, world, sampler, 1, "sample", _sample(SEQUENCE[2:8], 5)))

    with at_pass(runner, 3, ask_both):
        assert runner.run_once()
    long_row, loaded_row, stored_row = _finished(services, [long_call, *asked])
    assert loaded_row[0] == "completed" and loaded_row[2] < long_row[2]  # joined
    assert stored_row[0] == "pending"
    assert runner.engine.has(samplers[0]) and not runner.engine.has(samplers[1])
    assert runner.run_once()
    assert _finished(services, asked[1:])[0][0] == "completed"
