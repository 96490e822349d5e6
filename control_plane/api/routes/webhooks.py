"""/v1/webhooks: a tenant's admins register the endpoints its events are posted to, and read
each endpoint's delivery log (`control_plane.webhooks` delivers them).

- `POST /v1/webhooks` `{"url", "event_types"?, "description"?}`: the endpoint and its signing
  secret (`whsec_...`, in this answer only); at most 20 live endpoints a tenant (409
  `too_many_webhooks`). A URL that is not http(s), or whose host is not a
  public address where the platform's operator has not allowed private ones, is refused (400
  `unsafe_webhook_url`).
- `GET /v1/webhooks`, `GET /v1/webhooks/{id}`, `DELETE /v1/webhooks/{id}` (no new event goes to
  it, what was pending is marked failed; its log stays readable).
- `GET /v1/webhooks/{id}/deliveries`: the log, newest first: each event's payload, attempts,
  last answer and status.
- `POST /v1/webhooks/{id}/test`: a `webhook.test` event, due now.
- `POST /v1/webhooks/{id}/rotate_secret`: a new secret (in that answer only); for 24 hours
  every delivery carries the old secret's signature beside the new one's.
- `POST /v1/webhooks/{id}/deliveries/{delivery_id}/retry`: a failed delivery due again now (409
  for one pending or delivered).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import Connection

from control_plane import webhooks
from control_plane.api.deps import Admin, ConnDep, ServicesDep
from control_plane.api.errors import ApiError, not_found
from control_plane.api.openapi import refusals
from control_plane.api.schemas import Page, page_of
from control_plane.api.webhook_schemas import DeliveryPublic, WebhookCreate, WebhookPublic
from control_plane.records import WebhookEndpointRecord
from control_plane.tenants import Principal

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _endpoint(conn: Connection, caller: Principal, endpoint_id: str) -> WebhookEndpointRecord:
    endpoint = webhooks.get_endpoint(conn, caller.tenant_id, endpoint_id)
    if endpoint is None:
        raise not_found("webhook", endpoint_id)
    return endpoint


def _live_endpoint(conn: Connection, caller: Principal, endpoint_id: str) -> WebhookEndpointRecord:
    """One of the tenant's endpoints that is not deleted (409 for a deleted one)."""
    endpoint = _endpoint(conn, caller, endpoint_id)
    if endpoint.disabled_at is not None:
        raise ApiError(409, "webhook_deleted", f"Webhook {endpoint_id!r} was deleted.")
    return endpoint


@router.post("", response_model=WebhookPublic, responses=refusals(409))
def create_webhook(
    body: WebhookCreate, conn: ConnDep, caller: Admin, services: ServicesDep
) -> WebhookPublic:
    try:
        webhooks.check_url(body.url, allow_private=services.settings.webhooks_may_post_privately)
    except webhooks.UnsafeUrl as exc:
        raise ApiError(400, "unsafe_webhook_url", str(exc), "url") from None
    try:
        record = webhooks.create_endpoint(
            conn,
            caller.tenant_id,
            body.url,
            event_types=body.event_types,
            description=body.description,
        )
    except webhooks.TooManyEndpoints as exc:
        raise ApiError(409, "too_many_webhooks", str(exc)) from None
    conn.commit()
    return WebhookPublic.of(record, with_secret=True)


@router.get("", response_model=Page[WebhookPublic])
def list_webhooks(conn: ConnDep, caller: Admin) -> Page[WebhookPublic]:
    return page_of([WebhookPublic.of(e) for e in webhooks.list_endpoints(conn, caller.tenant_id)])


@router.get("/{webhook_id}", response_model=WebhookPublic)
def get_webhook(webhook_id: str, conn: ConnDep, caller: Admin) -> WebhookPublic:
    return WebhookPublic.of(_endpoint(conn, caller, webhook_id))


@router.delete("/{webhook_id}", response_model=WebhookPublic)
def delete_webhook(webhook_id: str, conn: ConnDep, caller: Admin) -> WebhookPublic:
    record = webhooks.disable_endpoint(conn, caller.tenant_id, webhook_id)
    if record is None:
        raise not_found("webhook", webhook_id)
    conn.commit()
    return WebhookPublic.of(record)


@router.post("/{webhook_id}/rotate_secret", response_model=WebhookPublic)
def rotate_secret(webhook_id: str, conn: ConnDep, caller: Admin) -> WebhookPublic:
    """A new signing secret (in this answer only); for 24 hours each delivery is signed with the
    old one too, so the receiver can switch without dropping a delivery."""
    record = webhooks.rotate_secret(conn, caller.tenant_id, webhook_id)
    if record is None:
        raise not_found("webhook", webhook_id)
    conn.commit()
    return WebhookPublic.of(record, with_secret=True)


@router.get("/{webhook_id}/deliveries", response_model=Page[DeliveryPublic])
def list_deliveries(
    webhook_id: str,
    conn: ConnDep,
    caller: Admin,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Page[DeliveryPublic]:
    endpoint = _endpoint(conn, caller, webhook_id)
    try:
        found, more = webhooks.list_deliveries(conn, endpoint.id, after=after, limit=limit)
    except LookupError:
        raise not_found("webhook_delivery", after or "", "after") from None
    return page_of([DeliveryPublic.of(d) for d in found], has_more=more, cursor=lambda d: d.id)


@router.post("/{webhook_id}/test", response_model=DeliveryPublic, responses=refusals(409))
def test_webhook(webhook_id: str, conn: ConnDep, caller: Admin) -> DeliveryPublic:
    endpoint = _live_endpoint(conn, caller, webhook_id)
    delivery = webhooks.enqueue_test(conn, endpoint)
    conn.commit()
    return DeliveryPublic.of(delivery)


@router.post(
    "/{webhook_id}/deliveries/{delivery_id}/retry",
    response_model=DeliveryPublic,
    responses=refusals(409),
)
def retry_delivery(
    webhook_id: str, delivery_id: str, conn: ConnDep, caller: Admin
) -> DeliveryPublic:
    endpoint = _live_endpoint(conn, caller, webhook_id)
    retried = webhooks.redeliver(conn, endpoint.id, delivery_id)
    if retried is None:
        delivery = webhooks.get_delivery(conn, endpoint.id, delivery_id)
        if delivery is None:
            raise not_found("webhook_delivery", delivery_id)
        raise ApiError(
            409,
            "delivery_not_failed",
            f"Delivery {delivery_id!r} is {delivery.status}: only a failed one is retried.",
        )
    conn.commit()
    return DeliveryPublic.of(retried)
