"""Which calls an interactive executor runs together: a claim's first call and, the tenants in
turn, other models' calls of its kinds that can run, then each model's next ones (never past a
call of another kind, so each reads the weights it would read in order), within the batch's
bounds (calls, saved samplers, tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection

from control_plane import interactive_calls as calls

# The calls that run together: sample calls, and forward_backward and forward calls.
FORWARDS = ("forward_backward", "forward")
# The tokens a forward batch gathers on a CPU (`interactive_forward_batch_tokens`): calls past it
# already keep its cores busy alone, and a larger batch runs slower than its calls one by one.
CPU_FORWARD_BATCH_TOKENS = 256


def forward_input(call: calls.Call) -> dict[str, Any]:
    request = call.request
    data: dict[str, Any] = (
        request.get("forward_backward_input") or request.get("forward_input") or {}
    )
    return data


def call_tokens(call: calls.Call) -> int:
    """The tokens of a forward call's datums, as sent (the engine reads them strictly later)."""
    data = forward_input(call).get("data")
    inputs = (
        [d.get("model_input") for d in data if isinstance(d, dict)]
        if isinstance(data, list)
        else []
    )
    chunks = [c for i in inputs if isinstance(i, dict) for c in i.get("chunks") or []]
    return sum(len(c.get("tokens") or []) for c in chunks if isinstance(c, dict))


def gather(
    conn: Connection,
    executor_id: str,
    call: calls.Call,
    kinds: list[str],
    heads: Callable[[list[calls.Call]], bool],
    room: Callable[[list[calls.Call]], bool],
) -> list[calls.Call]:
    """`call` and, while `heads` allows, other models' calls of `kinds` that can run (the
    tenants in turn), then each model's next calls of `kinds`, a call a model a round, while
    `room` allows: each tenant waiting is served in each batch."""
    taken, last = [call], {call.model_id: call}
    while heads(taken):
        head = calls.claim_next(conn, executor_id, call.base_model_id, kinds=kinds)
        if head is None:
            break
        taken.append(head)
        last[head.model_id] = head
    while room(taken):
        before = len(taken)
        for model_id, previous in list(last.items()):
            if not room(taken):
                break
            more = calls.claim_more(conn, executor_id, previous, 1, kinds)
            taken += more
            last[model_id] = more[0] if more else previous
        if len(taken) == before:
            break
    return taken
