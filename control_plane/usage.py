"""What a tenant's interactive sessions used, hour by hour: the tokens its models trained on
(forward and forward_backward), the prompt tokens and sampled tokens of its samples, and the
checkpoints it saved. The SDK's `AdminClient.get_billing_usage` reads it
(`GET /api/v1/billing/usage/events`); an operator charging tenants back reads the same.

Each call is metered once, when its executor answers it (`call_usage`, written by
`interactive_calls.finish` into `interactive_calls.usage`, kept when the call's payload is let
go). A failed call is not metered. A sample's prompt counts once a request, however many
samples it asks for; loraforge keeps no prefix cache, so no prompt token is a cached one. The
report groups the calls of a window by UTC hour, base and session off a partial index of the
metered calls by tenant and finish time. loraforge prices nothing: the costs and rates Tinker
reports are left out (null). Storage over time is not reported (a deleted checkpoint leaves no
row to count it by); what the tenant stores now is `billing/usage/checkpoints/current`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, text

# The longest window one report covers, as Tinker's: two weeks of hourly buckets. The
# platform's report of every tenant's totals covers a quarter (a month's chargeback, and more).
MAX_WINDOW = timedelta(days=14)
MAX_PLATFORM_WINDOW = timedelta(days=93)
HOUR = timedelta(hours=1)

_SAVES = frozenset({"save_weights", "save_weights_for_sampler", "save_weights_external"})

# What a call's `usage` may hold (`call_usage`), in the reports' order.
METERED = ("training_tokens", "prefill_tokens", "sampled_tokens", "checkpoints")

# Each of them summed over a group of calls `c` (0 where none holds it), as a bigint.
_SUMS = ",\n".join(
    f"coalesce(sum((c.usage ->> '{key}')::bigint), 0)::bigint AS {key}" for key in METERED
)


def call_usage(
    kind: str, request: Mapping[str, Any], result: Mapping[str, Any]
) -> dict[str, int] | None:
    """What a completed call used, or None for a call that uses nothing metered."""
    if kind in ("forward_backward", "forward"):
        data = (request.get("forward_backward_input") or {}).get("data") or []
        return {"training_tokens": sum(_tokens(datum.get("model_input")) for datum in data)}
    if kind == "sample":
        sequences = result.get("sequences") or []
        # A chat's prompt is rendered, and a completion's tokenized, by the executor, which
        # answers its length; a completion answers its tokens sampled too (its sequences
        # hold text), those left out of a prompt scored (`max_tokens` 0) not among them.
        text = "messages" in request or "completion" in request
        prompt = result.get("prompt_tokens") if text else None
        sampled = result.get("completion_tokens") if "completion" in request else None
        return {
            "prefill_tokens": prompt if isinstance(prompt, int) else _tokens(request.get("prompt")),
            "sampled_tokens": sampled
            if isinstance(sampled, int)
            else sum(len(seq.get("tokens") or []) for seq in sequences),
        }
    if kind in _SAVES:
        return {"checkpoints": 1}
    return None


def _tokens(model_input: Any) -> int:
    if not isinstance(model_input, Mapping):
        return 0
    return sum(len(chunk.get("tokens") or []) for chunk in model_input.get("chunks") or [])


class BadWindow(ValueError):
    """A window the report does not cover: the message says why and what to ask."""


def check_window(
    starting_on: datetime,
    ending_before: datetime,
    now: datetime,
    longest: timedelta = MAX_WINDOW,
) -> None:
    for name, when in (("starting_on", starting_on), ("ending_before", ending_before)):
        if when.tzinfo is None:
            raise BadWindow(f"{name} must say its time zone (e.g. 2026-07-13T00:00:00Z)")
        if (when.minute, when.second, when.microsecond) != (0, 0, 0):
            raise BadWindow(f"{name} must be on a UTC hour boundary, got {when.isoformat()}")
    if starting_on > now:
        raise BadWindow(f"starting_on {starting_on.isoformat()} is in the future")
    if ending_before <= starting_on:
        raise BadWindow("ending_before must be after starting_on")
    if ending_before - starting_on > longest:
        raise BadWindow(f"a report covers at most {longest.days} days: ask for the window in parts")


@dataclass(frozen=True)
class Bucket:
    """One hour's usage of one base by one session."""

    start: datetime
    base_model: str | None
    session_id: str
    training_tokens: int
    prefill_tokens: int
    sampled_tokens: int
    checkpoints: int


_BUCKETS = text(
    f"""
    SELECT date_trunc('hour', c.finished_at, 'UTC') AS start, b.name AS base_model,
           m.session_id, {_SUMS}
    FROM interactive_calls c
    JOIN interactive_models m ON m.id = c.model_id
    LEFT JOIN base_models b ON b.id = c.base_model_id
    WHERE c.tenant_id = :tenant AND c.usage IS NOT NULL
      AND c.finished_at >= :start AND c.finished_at < :end
    GROUP BY 1, 2, 3
    ORDER BY 1, 3, 2
    """
)


def buckets(
    conn: Connection, tenant_id: str, starting_on: datetime, ending_before: datetime
) -> list[Bucket]:
    rows = conn.execute(_BUCKETS, {"tenant": tenant_id, "start": starting_on, "end": ending_before})
    return [Bucket(**row._mapping) for row in rows]


def session_metadata(conn: Connection, session_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = conn.execute(
        text("SELECT id, user_metadata FROM interactive_sessions WHERE id = ANY(:ids)"),
        {"ids": session_ids},
    )
    return {row.id: row.user_metadata for row in rows}


@dataclass(frozen=True)
class TenantUsage:
    """What one tenant's sessions used in a window, summed."""

    tenant_id: str
    tenant_name: str
    training_tokens: int
    prefill_tokens: int
    sampled_tokens: int
    checkpoints: int


# Each tenant's calls of the window read off its own range of the partial index (tenant, finish
# time), not the whole table's metered calls; tenants that used nothing are left out.
_TENANTS = text(
    f"""
    SELECT t.id AS tenant_id, t.name AS tenant_name, u.*
    FROM tenants t
    CROSS JOIN LATERAL (
        SELECT {_SUMS}, count(*) AS calls
        FROM interactive_calls c
        WHERE c.tenant_id = t.id AND c.usage IS NOT NULL
          AND c.finished_at >= :start AND c.finished_at < :end
    ) u
    WHERE u.calls > 0
    ORDER BY t.name
    """
)


def tenant_totals(
    conn: Connection, starting_on: datetime, ending_before: datetime
) -> list[TenantUsage]:
    """Every tenant's usage in the window, by tenant name (the platform's operators')."""
    rows = conn.execute(_TENANTS, {"start": starting_on, "end": ending_before})
    return [TenantUsage(**{k: v for k, v in row._mapping.items() if k != "calls"}) for row in rows]
