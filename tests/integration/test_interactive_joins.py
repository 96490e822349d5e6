"""Sample calls asked while a sample batch decodes join it (continuous batching): the executor
claims them between passes where they fit (no longer than the batch's longest row still has),
they decode in the batch's passes and are answered as they finish, each what it answers alone;
one that does not fit, or of another kind, waits for the batch's end. Real PostgreSQL, the real
executor and engine on the tiny test base (`test_tinker_sample_batches.py` has one join through
the `tinker` SDK and the executor's `serve`, woken by the API's NOTIFY)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def test_a_sample_asked_while_a_batch_decodes_joins_it_and_answers_as_alone(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """A long sample call decodes; before its fifth pass another model's sample call, a third
    model's that asks more tokens than the batch has left, and a fourth model's forward_backward
    are asked. The first joins (claimed between two passes, its prompt read in a pass of its
    own, then decoded beside the long one) and is answered before it; the claim stops at the
    second, which waits with the forward_backward for the next claim. Each answers as alone."""
    runner = _runner(services, world, "exec-join", tmp_path)
    names = ["long", "short", "longer", "trains"]
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
    long_request, short_request = _sample(SEQUENCE[:6], 30), _sample(SEQUENCE[3:12], 6)
    longer_request = _sample(SEQUENCE[5:9], 40)
    long_call = ask_call(
        services.engine, models["long"], world["tenant"], world["base"], "sample", 1, long_request
    )
    later: dict[str, str] = {}

    def ask_meanwhile() -> None:
        for name, kind, request in (
            ("short", "sample", short_request),
            ("longer", "sample", longer_request),
            ("trains", "forward_backward", FB),
        ):
            later[name] = ask_call(
                services.engine, models[name], world["tenant"], world["base"], kind, 1, request
            )

    with at_pass(runner, 5, ask_meanwhile) as sizes:
        assert runner.run_once()
    # The long call's prompt and 4 passes (the calls asked before the fourth); the short one's
    # prompt; 5 passes of 2 rows until the short one has its 6 tokens; the long one alone to
    # its 30th.
    assert sizes == [1] * 5 + [1] + [2] * 5 + [1] * 20
    assert runner.calls_run == 4 + 2
    long_row, short_row, longer_row, trains_row = _finished(
        services, [long_call, later["short"], later["longer"], later["trains"]]
    )
    assert long_row[0] == short_row[0] == "completed"
    assert long_row[1] < short_row[1] < short_row[2] < long_row[2]  # joined, answered first
    assert longer_row[0] == trains_row[0] == "pending"
    for call, name, request in (
        (long_call, "long", long_request),
        (later["short"], "short", short_request),
    ):
        _same(
            _answer(services, call)[1]["sequences"],
            runner.engine.sample(models[name], request)["sequences"],
        )
    while runner.run_once():
        pass
    assert _finished(services, [later["longer"]])[0][0] == "completed"
    assert _finished(services, [later["trains"]])[0][0] == "completed"


def test_calls_join_no_more_than_the_batch_holds(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """`LORAFORGE_INTERACTIVE_SAMPLE_BATCH_CALLS` bounds the calls a batch holds unanswered,
    those that joined included: with 2, one call joins a batch of one, the next only once a
    call of the batch is answered."""
    runner = _runner(services, world, "exec-room", tmp_path)
    runner.sample_batch = 2
    names = ["a", "b", "c"]
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
    first = ask_call(
        services.engine,
        models["a"],
        world["tenant"],
        world["base"],
        "sample",
        1,
        _sample(SEQUENCE[:6], 30),
    )
    asked: dict[str, str] = {}

    def ask_two() -> None:
        for name, tokens in (("b", 4), ("c", 4)):
            asked[name] = ask_call(
                services.engine,
                models[name],
                world["tenant"],
                world["base"],
                "sample",
                1,
                _sample(SEQUENCE[2:7], tokens),
            )

    with at_pass(runner, 3, ask_two) as sizes:
        assert runner.run_once()
    # a's prompt and 2 passes (b and c asked before the second); b's prompt (2 calls
    # unanswered: c waits); 3 passes of 2 until b's 4 tokens are in; a alone, b answered; c's
    # prompt; 3 passes of 2; a alone to its 30th.
    assert sizes == [1, 1, 1] + [1] + [2] * 3 + [1] + [1] + [2] * 3 + [1] * 20
    rows = _finished(services, [first, asked["b"], asked["c"]])
    assert [status for status, _, _ in rows] == ["completed"] * 3
    assert rows[1][2] <= rows[2][1]  # c claimed once b was answered
