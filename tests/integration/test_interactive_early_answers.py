"""A sample batch's calls are answered as their rows finish, not at the batch's end: a short
call decoded beside a long one is recorded (its future answers) while the long one still
decodes, and a batch that fails after answering some of its calls runs only the others again.
Real PostgreSQL, the real executor and engine on the tiny test base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from control_plane.services import Services
from tests.factories import interactive_model
from tests.integration.test_interactive_runner import (
    SEQUENCE,
    _answer,
    _ask_in_order,
    _drain,
    _runner,
    _tokens,
    services,
    world,
)
from workers.interactive.engine import InteractiveEngine, InteractiveError
from workers.interactive.sample_run import More, OnAnswer

__all__ = ["services", "world"]  # the executor tests' fixtures, used here by name


def _sample(tokens: list[int], max_tokens: int) -> dict[str, Any]:
    return {
        "prompt": _tokens(tokens),
        "num_samples": 1,
        "sampling_params": {"max_tokens": max_tokens, "temperature": 0.0, "stop": []},
    }


def _same(together: list[dict[str, Any]], alone: list[dict[str, Any]]) -> None:
    """The same sequences: tokens and stop reasons exactly, logprobs to batching's rounding."""
    assert [(s["tokens"], s["stop_reason"]) for s in together] == [
        (s["tokens"], s["stop_reason"]) for s in alone
    ]
    for mine, theirs in zip(together, alone, strict=True):
        assert mine["logprobs"] == pytest.approx(theirs["logprobs"], abs=1e-4)


def _finished(services: Services, ids: list[str]) -> list[tuple[str, Any, Any]]:
    """Each call's (status, started_at, finished_at)."""
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, status, started_at, finished_at FROM interactive_calls "
                "WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        ).all()
    by_id = {row.id: (row.status, row.started_at, row.finished_at) for row in rows}
    return [by_id[i] for i in ids]


def test_a_short_sample_is_answered_while_the_long_one_beside_it_still_decodes(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """Three sample calls of one model taken in one claim, the longest first: each is recorded
    as its rows finish, the shortest first, the longest last (before, every call of a batch
    was recorded at its end, in the order taken); each answers what it answers alone."""
    runner = _runner(services, world, "exec-early", tmp_path)
    model = interactive_model(
        services.engine, world["session"], world["tenant"], world["base"], "m"
    )
    asked = [
        _sample(SEQUENCE[:6], 40),
        _sample(SEQUENCE[2:9], 1),
        _sample(SEQUENCE[4:8], 12),
    ]
    calls = [("create_model", {})] + [("sample", request) for request in asked]
    ids = _ask_in_order(services, world, model, calls)[1:]
    assert runner.run_once()  # the model
    assert runner.run_once()  # the three in one claim, the longest taken first
    rows = _finished(services, ids)
    assert [status for status, _, _ in rows] == ["completed"] * 3
    assert len({started for _, started, _ in rows}) == 1  # one claim
    finished = [at for _, _, at in rows]
    assert finished[1] < finished[2] < finished[0]
    for call, request in zip(ids, asked, strict=True):
        alone = runner.engine.sample(model, request)
        _same(_answer(services, call)[1]["sequences"], alone["sequences"])
    assert [len(_answer(services, c)[1]["sequences"][0]["tokens"]) for c in ids] == [40, 1, 12]


class _OutOfMemoryOnceItAnswered(InteractiveEngine):
    """The real engine, but a batch of several calls runs out of memory once it has handed
    over its first answer (as a batch whose cache outgrows a GPU midway would); a call alone
    fits. `batches` records how many calls each batch held."""

    batches: list[int]

    def sample_many(
        self,
        asked: list[tuple[str | None, dict[str, Any]]],
        on_answer: OnAnswer | None = None,
        more: More | None = None,
    ) -> list[dict[str, Any] | InteractiveError]:
        self.batches = [*getattr(self, "batches", []), len(asked)]

        def then_fail(i: int, answer: dict[str, Any] | InteractiveError) -> None:
            if on_answer is not None:
                on_answer(i, answer)
            if len(asked) > 1:
                raise RuntimeError("CUDA out of memory (a test's stand-in)")

        return super().sample_many(asked, then_fail, more)


def test_a_batch_that_fails_after_answering_a_call_runs_only_the_others_again(
    services: Services, world: dict[str, str], tmp_path: Path
) -> None:
    """The short call answered before its batch failed keeps that answer and is not run
    again; the two calls not yet answered run again a call at a time and answer as alone."""
    runner = _runner(services, world, "exec-oom-late", tmp_path, _OutOfMemoryOnceItAnswered)
    model = interactive_model(
        services.engine, world["session"], world["tenant"], world["base"], "m"
    )
    asked = [_sample(SEQUENCE[:6], 20), _sample(SEQUENCE[2:9], 2), _sample(SEQUENCE[4:8], 9)]
    calls = [("create_model", {})] + [("sample", request) for request in asked]
    ids = _ask_in_order(services, world, model, calls)
    assert _drain(runner) == 4
    engine = runner.engine
    assert isinstance(engine, _OutOfMemoryOnceItAnswered)
    assert engine.batches == [3, 1, 1]  # the batch, then the two it had not answered
    rows = _finished(services, ids[1:])
    assert [status for status, _, _ in rows] == ["completed"] * 3
    assert rows[1][2] < rows[0][2] and rows[1][2] < rows[2][2]  # the short one, first
    for call, request in zip(ids[1:], asked, strict=True):
        alone = engine.sample(model, request)
        _same(_answer(services, call)[1]["sequences"], alone["sequences"])
