"""The webhooks' bodies (`/v1/webhooks`), built from `control_plane.webhooks`' records."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from control_plane.api.schemas import _ts
from control_plane.records import WebhookDeliveryRecord, WebhookEndpointRecord

EventType = Literal[
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "adapter.version.created",
    "adapter.version.deleted",
    "adapter.alias.updated",
]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048, description="an absolute http(s) URL")
    event_types: list[EventType] | None = Field(
        default=None, min_length=1, description="the events it takes; left out: every one"
    )
    description: str = Field(default="", max_length=256)


class WebhookPublic(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    event_types: list[str] | None
    description: str
    created_at: int
    deleted: bool
    previous_secret_valid_until: int | None = Field(
        default=None,
        description="after a rotation: until when deliveries are signed with the old secret too",
    )
    secret: str | None = Field(
        default=None,
        description="the Standard Webhooks signing secret (`whsec_...`), only in the answer that "
        "created the endpoint or rotated its secret",
    )

    @classmethod
    def of(cls, record: WebhookEndpointRecord, *, with_secret: bool = False) -> Self:
        return cls(
            id=record.id,
            url=record.url,
            event_types=record.event_types,
            description=record.description,
            created_at=int(record.created_at.timestamp()),
            deleted=record.disabled_at is not None,
            previous_secret_valid_until=_ts(record.previous_secret_until),
            secret=record.secret if with_secret else None,
        )


class DeliveryPublic(BaseModel):
    id: str = Field(description="the `webhook-id` header, the same on every attempt")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event_id: str
    event_type: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: int
    delivered_at: int | None
    next_attempt_at: int | None = Field(description="while pending: when it is tried next")
    payload: dict[str, Any] = Field(description="the body posted (signed as sent)")

    @classmethod
    def of(cls, d: WebhookDeliveryRecord) -> Self:
        return cls(
            id=d.id,
            event_id=d.event_id,
            event_type=d.event_type,
            status=d.status,
            attempts=d.attempts,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            created_at=int(d.created_at.timestamp()),
            delivered_at=_ts(d.delivered_at),
            next_attempt_at=_ts(d.next_attempt_at) if d.status == "pending" else None,
            payload=d.payload,
        )
