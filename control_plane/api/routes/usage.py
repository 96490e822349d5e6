"""/v1/usage: what every tenant used in a window, for the platform's operators (an admin of a
tenant that `platform_operator_tenants` names), by tenant name; tenants that used nothing are
left out. Its interactive sessions: training tokens, prompt and sampled tokens and checkpoints
saved, summed from the calls metered as they were answered (`control_plane.usage`). Its
fine-tuning jobs: the time they held a trainer, clipped to the window, and the jobs that
succeeded there with the tokens they trained on (`control_plane.job_usage`); both merged by
`control_plane.platform_usage`. A month's chargeback is one request (a window of at most 93 days, on hour boundaries). A
tenant reads its own, hour by hour, with the Tinker SDK's `AdminClient.get_billing_usage`.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from control_plane import usage
from control_plane.api.deps import ConnDep, PlatformOperator
from control_plane.api.errors import ApiError
from control_plane.platform_usage import platform_totals

router = APIRouter(prefix="/v1/usage", tags=["tenants"])


class TenantUsagePublic(BaseModel):
    tenant: str = Field(description="the tenant's name")
    training_tokens: int = Field(description="tokens its forward and forward_backward calls ran")
    prefill_tokens: int = Field(description="its samples' prompt tokens, once a request")
    sampled_tokens: int = Field(description="tokens its samples generated")
    checkpoints: int = Field(description="weights it saved")
    trainer_seconds: float = Field(
        description="seconds its fine-tuning jobs held a trainer in the window, whatever they "
        "ended in (each run clipped to the window; a run still going, up to now)"
    )
    fine_tuning_jobs: int = Field(description="its fine-tuning jobs that succeeded in the window")
    fine_tuning_trained_tokens: int = Field(description="the tokens those jobs trained on")


class PlatformUsage(BaseModel):
    starting_on: datetime
    ending_before: datetime
    data: list[TenantUsagePublic]


@router.get("", response_model=PlatformUsage)
def platform_usage(
    starting_on: datetime, ending_before: datetime, conn: ConnDep, _: PlatformOperator
) -> PlatformUsage:
    """Every tenant's usage in `[starting_on, ending_before)`, by name."""
    try:
        usage.check_window(starting_on, ending_before, datetime.now(UTC), usage.MAX_PLATFORM_WINDOW)
    except usage.BadWindow as exc:
        raise ApiError(400, "invalid_request", str(exc), "starting_on") from None
    return PlatformUsage(
        starting_on=starting_on,
        ending_before=ending_before,
        data=[
            TenantUsagePublic(**asdict(row))
            for row in platform_totals(conn, starting_on, ending_before)
        ],
    )
