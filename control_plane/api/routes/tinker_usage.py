"""/api/v1/billing/usage/events: what the tenant's interactive sessions used, hour by hour
(`control_plane.usage`), as the SDK's `AdminClient.get_billing_usage` reads it: for each UTC
hour, base and session, the training tokens, the prompt (prefill) and sampled tokens, and the
checkpoints saved, each an event of its kind; the sessions' `user_metadata` beside them.

Any live key of the tenant reads it (a reader's too). loraforge prices nothing, so the costs and
rates are null; it has no users or projects, so those are null too. A window not on hour
boundaries, starting in the future or longer than 14 days is a 400 that says so.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from pydantic import BaseModel

from control_plane import usage
from control_plane.api.deps import Caller, ConnDep
from control_plane.api.errors import ApiError

router = APIRouter(prefix="/api/v1/billing/usage", tags=["tinker"], include_in_schema=False)


class UsageEvent(BaseModel):
    bucket_start: datetime
    bucket_end: datetime
    base_model: str | None
    user_id: None = None
    user_name: None = None
    session_id: str
    project_id: None = None
    estimated_cost_usd: None = None
    effective_rate_usd_per_million_tokens: None = None
    effective_rate_usd_per_gigabyte_month: None = None
    event_info: dict[str, object]


class UsageSession(BaseModel):
    user_metadata: dict[str, str] | None


class UsageEvents(BaseModel):
    data: list[UsageEvent]
    sessions: dict[str, UsageSession]
    cost_data_through: None = None


def _infos(bucket: usage.Bucket) -> list[tuple[int, dict[str, object]]]:
    """The bucket's events, each with the tokens it orders by (a checkpoint's: none)."""
    infos: list[tuple[int, dict[str, object]]] = []
    if bucket.training_tokens:
        info = {"type": "training", "token_count": bucket.training_tokens}
        infos.append((bucket.training_tokens, info))
    if bucket.prefill_tokens:
        info = {"type": "sampling_prefill", "cached": False, "token_count": bucket.prefill_tokens}
        infos.append((bucket.prefill_tokens, info))
    if bucket.sampled_tokens:
        info = {"type": "sampling_sample", "token_count": bucket.sampled_tokens}
        infos.append((bucket.sampled_tokens, info))
    if bucket.checkpoints:
        infos.append((0, {"type": "checkpoint", "count": bucket.checkpoints}))
    return infos


@router.get("/events")
def usage_events(
    starting_on: datetime, ending_before: datetime, conn: ConnDep, caller: Caller
) -> UsageEvents:
    try:
        usage.check_window(starting_on, ending_before, datetime.now(UTC))
    except usage.BadWindow as exc:
        raise ApiError(400, "invalid_request", str(exc), "starting_on") from None
    found = usage.buckets(conn, caller.tenant_id, starting_on, ending_before)
    events = [
        (
            bucket.start,
            -tokens,
            UsageEvent(
                bucket_start=bucket.start,
                bucket_end=bucket.start + usage.HOUR,
                base_model=bucket.base_model,
                session_id=bucket.session_id,
                event_info=info,
            ),
        )
        for bucket in found
        for tokens, info in _infos(bucket)
    ]
    # By bucket, then the most tokens first (as Tinker orders them).
    events.sort(key=lambda event: (event[0], event[1]))
    metadata = usage.session_metadata(conn, sorted({bucket.session_id for bucket in found}))
    sessions = {
        session_id: UsageSession(
            user_metadata={key: str(value) for key, value in meta.items()} or None
        )
        for session_id, meta in metadata.items()
    }
    return UsageEvents(data=[event for _, _, event in events], sessions=sessions)
