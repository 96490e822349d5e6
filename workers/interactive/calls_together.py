"""Calls run together in one batch (a sample batch, a forward batch), and what each came to.

A call that cannot be prepared fails alone; a batch that fails is run again a call at a time;
and a batch that hands its answers over as it has them (a sample batch: a short request's rows
are done before the longest's) has each call answered then, not at the batch's end.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from control_plane import interactive_calls as calls
from control_plane.interactive_saves import Saved
from workers.interactive.losses import InteractiveError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A call that failed: its reason, `user` (the request) or `server` (the platform)."""

    message: str
    category: str


# What running a call came to: (result, checkpoint written, whether the model is let go).
Outcome = tuple[dict[str, Any], Saved | None, bool] | Failure


# A call as the engine's batch takes it: (model, request) to sample, (model, input, backward).
Asked = TypeVar("Asked")


# An answer handed over while the batch runs: the call's place in it, its answer or refusal.
OnAnswer = Callable[[int, dict[str, Any] | InteractiveError], None]
# While the batch runs, offers more of what it runs, each to a function answering None where the
# batch has no room for it, else the function that adds it to the batch (once it is the batch's).
Offer = Callable[[Callable[[Asked], Callable[[], None] | None]], None]
# The batch: (what is asked, answers handed over as they come, more offered meanwhile) in, an
# answer or refusal for each asked (those that joined after the others) out.
Run = Callable[
    [list[Asked], OnAnswer | None, Offer | None], list[dict[str, Any] | InteractiveError]
]


def _alone(run: Run[Asked], asked: Asked) -> dict[str, Any] | Exception:
    try:
        return run([asked], None, None)[0]
    except Exception as exc:
        return exc


def _outcome(answer: dict[str, Any] | Exception, call: calls.Call) -> Outcome:
    """A batch's answer to a call as what running it came to: its result, or its failure."""
    if isinstance(answer, Exception):
        return failure(answer, [call])
    return (answer, None, False)


def failure(exc: Exception, taken: list[calls.Call]) -> Failure:
    """What an exception running calls comes to: a refusal of the request is the user's, any
    other the platform's (logged with its traceback)."""
    if isinstance(exc, InteractiveError):
        return Failure(str(exc), "user")
    ids = ", ".join(c.id for c in taken)
    log.error("interactive call %s (%s) failed", ids, taken[0].kind, exc_info=exc)
    return Failure(f"{type(exc).__name__}: {exc}", "server")


def run_calls_together(
    taken: list[calls.Call],
    prepare: Callable[[calls.Call], Asked],
    run: Run[Asked],
    *,
    answer: Callable[[calls.Call, Outcome], None] | None = None,
    joining: tuple[Callable[[Callable[[calls.Call], Callable[[], None] | None]], None], int]
    | None = None,
) -> list[Outcome | None]:
    """Calls run together by `run` (the engine's `sample_many` or `forward_many`), each
    prepared first (`prepare`: its model's weights had, its request read); a call that
    cannot be prepared, or whose request is refused, fails alone. A batch that fails is run
    again a call at a time, so that a failure is its own call's (a batch out of memory may
    fit alone; a forward batch leaves the gradients as they were). With `answer`, `run`
    hands each answer over as soon as it has it, and the call is answered then (`answer`)
    while the others run (its outcome None here): a short sample does not wait for the batch's
    longest. Where the database refuses such an answer, it and those after it wait for the
    batch's end, as every answer did. With `joining` (a function offering calls, and the most
    calls the batch holds unanswered), `run` may be offered more calls while it runs: each one
    prepared joins `taken` (and is answered as the others) when `run` has room for it: the offer
    gets a function that adds it, to call once its claim is committed."""
    outcomes: list[Outcome | None] = []
    asked: list[Asked] = []
    places: list[int] = []  # each asked call's place in `taken`
    for i, call in enumerate(taken):
        try:
            asked.append(prepare(call))
            places.append(i)
            outcomes.append(None)
        except Exception as exc:
            outcomes.append(failure(exc, [call]))
    answered: set[int] = set()  # by place in `taken`
    deferred: list[Exception] = []

    def early(k: int, given: dict[str, Any] | InteractiveError) -> None:
        i = places[k]
        outcome = outcomes[i] = _outcome(given, taken[i])
        if answer is None or deferred:
            return
        try:
            answer(taken[i], outcome)
        except Exception as exc:  # the database away past its patience: at the end
            log.warning("interactive call %s: answered at the batch's end (%s)", taken[i].id, exc)
            deferred.append(exc)
        else:
            answered.add(i)

    def full() -> bool:  # the batch holds as many calls unanswered as it may
        assert joining is not None
        return sum(i not in answered for i in places) >= joining[1]

    def offer(take: Callable[[Asked], Callable[[], None] | None]) -> None:
        def join(call: calls.Call) -> Callable[[], None] | None:
            if full():
                return None
            try:
                one = prepare(call)
            except Exception:
                return None  # it fails, or waits, where it runs alone
            add = take(one)
            if add is None:
                return None

            def added() -> None:  # its place is `run`'s next: `add` may answer it by it
                taken.append(call)
                asked.append(one)
                places.append(len(taken) - 1)
                outcomes.append(None)
                add()

            return added

        assert joining is not None
        if not full():  # nothing is claimed to be handed back
            joining[0](join)

    results: list[dict[str, Any] | Exception] = []
    try:
        on_answer = None if answer is None else early
        results = list(run(asked, on_answer, None if joining is None else offer)) if asked else []
    except Exception as exc:
        if len(asked) == 1:
            results = [exc]
        else:
            log.warning(
                "a batch of %d %s calls failed (%s): one at a time", len(asked), taken[0].kind, exc
            )
            results = [
                {} if places[k] in answered else _alone(run, one) for k, one in enumerate(asked)
            ]
    for k, result in enumerate(results):
        if places[k] not in answered:
            outcomes[places[k]] = _outcome(result, taken[places[k]])
    return [None if i in answered else outcome for i, outcome in enumerate(outcomes)]
