"""/v1/usage: what every tenant's interactive sessions used in a window, for the platform's
operators (an admin of a tenant that `platform_operator_tenants` names): each tenant's training
tokens, prompt and sampled tokens and checkpoints saved, summed from the calls metered as they
were answered (`control_plane.usage`), by tenant name; tenants that used nothing are left out.
A month's chargeback is one request (a window of at most 93 days, on hour boundaries). A
tenant reads its own, hour by hour, with the Tinker SDK's `AdminClient.get_billing_usage`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter
from pydantic import BaseModel, Field

from control_plane import usage
from control_plane.api.deps import ConnDep, PlatformOperator
from control_plane.api.errors import ApiError

router = APIRouter(prefix="/v1/usage", tags=["tenants"])


class TenantUsagePublic(BaseModel):
    tenant: str = Field(description="the tenant's name")
    training_tokens: int = Field(description="tokens its forward and forward_backward calls ran")
    prefill_tokens: int = Field(description="its samples' prompt tokens, once a request")
    sampled_tokens: int = Field(description="tokens its samples generated")
    checkpoints: int = Field(description="weights it saved")


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
    totals = usage.tenant_totals(conn, starting_on, ending_before)
    return PlatformUsage(
        starting_on=starting_on,
        ending_before=ending_before,
        data=[
            TenantUsagePublic(
                tenant=t.tenant_name,
                training_tokens=t.training_tokens,
                prefill_tokens=t.prefill_tokens,
                sampled_tokens=t.sampled_tokens,
                checkpoints=t.checkpoints,
            )
            for t in totals
        ],
    )
