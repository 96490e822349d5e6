"""/api/v1, the futures the `tinker` SDK waits on: one call's (`retrieve_future`), a sampling
client's completions (`retrieve_futures`), and a cancel (`cancel_future`).

- `retrieve_future` holds the poll up to `tinker_retrieve_wait_seconds`, then answers try-again
  (`{"type": "try_again"}` with why it waits: `interactive_health`; a call whose model's weights
  are gone is failed here instead), the result (protobuf for a forward or a sample, as the SDK
  reads them; JSON otherwise), or a failure (`{"error", "category": "user" | "server"}`, status
  200).
- `retrieve_futures` (the client config's `sample_use_retrieve_futures`): each sampling client
  runs one long poll for its whole sampling session instead of one poll a sample, so an RL loop
  with a thousand samples in flight holds one request here, not a thousand. It answers the
  completions of the clone's calls since its cursor (`control_plane.interactive_polls`) as soon
  as there are any, else once the hold ends; the SDK then fetches each answer with one
  `retrieve_future`, and reports the ones it fetched, whose payloads are let go at once rather
  than an hour later. A hold that ends with calls still waiting settles those whose weights are
  gone, as a poll of one call does; the next poll, which the SDK makes at once, reports them.
- `cancel_future` fails a call no executor took yet.

No connection is held between looks: each look is a short read on its own connection. A call
that finishes wakes the polls waiting on it (`control_plane.api.call_wakeups`), which look at
once rather than at their next look's time (50 ms to 1 s apart).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from control_plane import custom_losses, interactive, interactive_health, interactive_polls
from control_plane.api.call_wakeups import CallWakeups
from control_plane.api.deps import ConnDep, ServicesDep, Writer
from control_plane.api.routes.tinker import domain_errors
from control_plane.api.tinker_answers import PROTOBUF, answer
from control_plane.api.tinker_schemas import FutureCancel, FutureRef, Id, _Body
from control_plane.services import Services

router = APIRouter(prefix="/api/v1", tags=["tinker"], include_in_schema=False)


class SamplingSessionTarget(_Body):
    type: Literal["sampling_session"] = "sampling_session"
    sampling_session_id: Id
    cloned_sampler_id: int = Field(default=0, ge=0, lt=10**9)


class FuturesRetrieve(_Body):
    """`retrieve_futures`: a sampling client's poll for its completions after `prev_cursor`."""

    target: SamplingSessionTarget
    prev_cursor: int = Field(default=0, ge=0, lt=2**62)
    timeout: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    retrieved_request_ids: list[Id] = Field(default_factory=list, max_length=10_000)


class FutureCompletion(BaseModel):
    state: Literal["finished", "failed"]
    request_id: str


class FuturesRetrieved(BaseModel):
    completions: list[FutureCompletion]
    cursor: int

    @classmethod
    def of(cls, found: interactive_polls.Completions) -> FuturesRetrieved:
        return cls(
            completions=[
                FutureCompletion(
                    state="failed" if c.failed else "finished", request_id=c.request_id
                )
                for c in found.completions
            ],
            cursor=found.cursor,
        )


T = TypeVar("T")

# Between two looks a poll holds: short at first, so a quick call is answered at once, then
# longer, so thousands of waiting samples (or one poller's hold) cost little.
FIRST_LOOK_AFTER_SECONDS = 0.05
LOOK_AT_LEAST_EVERY_SECONDS = 1.0


def _look(services: Services, tenant_id: str, future_id: str) -> interactive.CallRecord:
    with services.engine.connect() as conn, domain_errors():
        return interactive.retrieve(conn, tenant_id, future_id)


async def hold_until(
    hold_s: float,
    look: Callable[[], T],
    done: Callable[[T], bool],
    wake: AbstractContextManager[asyncio.Event | None],
) -> T:
    """`look` (run in a worker thread, on a connection of its own) again and again until what
    it finds is `done` or `hold_s` seconds have passed; what it found last. Between two looks
    it waits for the next look's time or for `wake`'s event, set when a call it waits on
    finishes (`call_wakeups`), whichever comes first; the event is cleared before each look,
    so a call finished during a look is looked at again at once."""
    deadline = time.monotonic() + hold_s
    pause = FIRST_LOOK_AFTER_SECONDS
    with wake as woken:
        while True:
            if woken is not None:
                woken.clear()
            found = await run_in_threadpool(look)
            left = deadline - time.monotonic()
            if done(found) or left <= 0:
                return found
            if woken is None:
                await asyncio.sleep(min(pause, left))
            else:
                with suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(pause, left))
            pause = min(pause * 2, LOOK_AT_LEAST_EVERY_SECONDS)


def call_wakeup(request: Request, *keys: str) -> AbstractContextManager[asyncio.Event | None]:
    """The wake-up for a poll waiting on `keys` (a call's id, a sampler's model id): none where
    this process runs no listener (`tinker_wake_on_finish` off)."""
    wakeups: CallWakeups | None = request.app.state.call_wakeups
    return nullcontext() if wakeups is None else wakeups.waiting(*keys)


@router.post("/retrieve_future")
async def retrieve_future(
    body: FutureRef, request: Request, caller: Writer, services: ServicesDep
) -> Response:
    """The call's answer once it is finished, else try-again after holding the poll a while
    (the SDK polls again at once), saying why it waits. A custom loss's creation is answered at
    once (`routes/tinker_losses.py`)."""
    if custom_losses.is_loss_future(body.request_id):
        created = await run_in_threadpool(
            _loss_created, services, caller.tenant_id, body.request_id
        )
        return JSONResponse(created)
    call = await hold_until(
        services.settings.tinker_retrieve_wait_seconds,
        lambda: _look(services, caller.tenant_id, body.request_id),
        lambda found: found.finished,
        call_wakeup(request, body.request_id),
    )
    if not call.finished:
        call, waiting = await run_in_threadpool(_why_waiting, services, caller.tenant_id, call)
        if waiting is not None and not call.finished:
            again = {"type": "try_again", "request_id": call.id, "queue_state": waiting.queue_state}
            if waiting.reason is not None:
                again["queue_state_reason"] = waiting.reason
            return JSONResponse(again)
    return answer(call, PROTOBUF in request.headers.get("accept", ""))


def _loss_created(services: Services, tenant_id: str, loss_id: str) -> dict[str, str]:
    with services.engine.connect() as conn, domain_errors():
        loss = custom_losses.get(conn, tenant_id, loss_id)
    return {"type": "create_custom_loss", "loss_id": loss.id}


def _why_waiting(
    services: Services, tenant_id: str, call: interactive.CallRecord
) -> tuple[interactive.CallRecord, interactive_health.Waiting | None]:
    """Why `call` still waits, or the call as settled now (its model's weights are gone, or the
    lost executor of its sampler was running it)."""
    with services.engine.begin() as conn, domain_errors():
        waiting = interactive_health.explain(conn, call.model_id, services.settings.lease_seconds)
        call = interactive.retrieve(conn, tenant_id, call.id)
    return call, waiting


@router.post("/retrieve_futures")
async def retrieve_futures(
    body: FuturesRetrieve, request: Request, caller: Writer, services: ServicesDep
) -> FuturesRetrieved:
    """What finished of the sampling client's calls since its cursor, held until something has
    (up to `tinker_retrieve_wait_seconds`, or the body's `timeout` where shorter; 0: one look)."""
    hold = services.settings.tinker_retrieve_wait_seconds
    if body.timeout is not None:
        hold = min(hold, body.timeout)
    fetched = iter([body.retrieved_request_ids])  # let go with the first look only

    def look() -> interactive_polls.Completions:
        return _completions(services, caller.tenant_id, body, next(fetched, []))

    def done(found: interactive_polls.Completions) -> bool:
        return found.new or not found.waiting

    found = await hold_until(
        hold, look, done, call_wakeup(request, body.target.sampling_session_id)
    )
    # Calls that will never run (their weights are gone) are failed now, and reported by the
    # next poll, which the SDK makes at once; with none, one last look.
    if not done(found) and not await run_in_threadpool(
        _settle, services, body.target.sampling_session_id
    ):
        found = await run_in_threadpool(look)
    return FuturesRetrieved.of(found)


def _completions(
    services: Services, tenant_id: str, body: FuturesRetrieve, forgotten: list[str]
) -> interactive_polls.Completions:
    target = body.target
    with services.engine.begin() as conn, domain_errors():
        interactive_polls.forget(conn, tenant_id, target.sampling_session_id, forgotten)
        return interactive_polls.read(
            conn, tenant_id, target.sampling_session_id, target.cloned_sampler_id, body.prev_cursor
        )


def _settle(services: Services, model_id: str) -> bool:
    """True when the model's waiting calls were failed here (its weights are gone)."""
    with services.engine.begin() as conn:
        return interactive_health.explain(conn, model_id, services.settings.lease_seconds) is None


class SamplingSessionJoin(_Body):
    type: Literal["join_sampling_session"] = "join_sampling_session"
    sampling_session_id: Id


@router.post("/join_sampling_session")
def join_sampling_session(
    body: SamplingSessionJoin, conn: ConnDep, caller: Writer
) -> dict[str, Any]:
    """A clone number for a sampling client opened from another's handle (the client config's
    `sample_join_sampling_session`): its requests' block, whose completions its poll reads;
    never one another clone of the session has."""
    with domain_errors():
        clone = interactive_polls.join(conn, caller.tenant_id, body.sampling_session_id)
    conn.commit()
    return {"type": "join_sampling_session", "client_counter": clone}


@router.post("/cancel_future")
def cancel_future(body: FutureCancel, conn: ConnDep, caller: Writer) -> dict[str, bool]:
    with domain_errors():
        cancelled = interactive.cancel(conn, caller.tenant_id, body.request_id)
    conn.commit()
    return {"cancelled": cancelled}
