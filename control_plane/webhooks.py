"""Webhooks: a tenant's endpoints, and its events delivered to them at least once, signed.

An event's delivery rows are written by revision 0022's triggers in the statement that makes
the event (a job finishing, a version published): the outbox commits with the change or not at
all. `deliver_due` (celery's beat runs it every WEBHOOK_PASS_INTERVAL_S) takes the deliveries
due, posts each to its endpoint signed per the Standard Webhooks spec (`webhook-id`,
`webhook-timestamp`, `webhook-signature` over `id.timestamp.body` with the endpoint's
`whsec_` secret: the headers OpenAI's own webhooks carry, so `openai`'s `webhooks.unwrap`
verifies them), and records the outcome: a 2xx delivers it; anything else (an error status, a
timeout, a refused connection) is tried again after the next delay of
`webhook_retry_schedule_seconds`, then marked failed, each attempt in the delivery log.

Taking a delivery moves its next attempt a lease ahead (LEASE_S) in the statement that takes
it, so a deliverer that dies mid-post leaves it to be taken again once the lease is over (at
least once; the `webhook-id` header is the same on every attempt, for a receiver to drop a
repeat), and two deliverers never post the same attempt. No transaction is held open across a
post.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import httpx
from sqlalchemy import Connection, Engine, Table, func, insert, select, text, update
from standardwebhooks.webhooks import Webhook

from control_plane.db.tables import WebhookDelivery, WebhookEndpoint
from control_plane.ids import new_id
from control_plane.pagination import newest_first
from control_plane.records import WebhookDeliveryRecord, WebhookEndpointRecord

log = logging.getLogger(__name__)

endpoints: Table = WebhookEndpoint.__table__  # type: ignore[assignment]
deliveries: Table = WebhookDelivery.__table__  # type: ignore[assignment]

# What an endpoint may subscribe to (revision 0022's triggers write them); `webhook.test` is
# sent when asked for (`enqueue_test`), to every endpoint whatever it takes.
EVENT_TYPES = (
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "adapter.version.created",
    "adapter.version.deleted",
    "adapter.alias.updated",
)
TEST_EVENT = "webhook.test"
# Live endpoints a tenant may hold: each finished job writes one row per endpoint that takes it.
MAX_ENDPOINTS_PER_TENANT = 20
WEBHOOK_PASS_INTERVAL_S = 2.0
LEASE_S = 120.0  # longer than any attempt can take (WEBHOOK_TIMEOUT_SECONDS is at most 60)
PASS_LIMIT = 100
MAX_ERROR_CHARS = 500


class UnsafeUrl(ValueError):
    """A URL the platform will not post to."""


class TooManyEndpoints(Exception):
    """The tenant holds MAX_ENDPOINTS_PER_TENANT live endpoints already."""


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse what is not an absolute http(s) URL with a host, or (unless `allow_private`) one
    whose host resolves to a private, loopback, link-local or otherwise non-public address: the
    platform posts from inside its cluster's network."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrl("url must be an absolute http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise UnsafeUrl("url must not carry credentials; the signature authenticates deliveries")
    if allow_private:
        return
    try:
        found = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        raise UnsafeUrl(f"url's host {parts.hostname!r} does not resolve") from None
    for *_, address in found:
        ip = ipaddress.ip_address(address[0])
        if not ip.is_global:
            raise UnsafeUrl(
                f"url's host {parts.hostname!r} resolves to {ip}, not a public address; "
                "the platform's operator allows such endpoints with "
                "LORAFORGE_WEBHOOK_ALLOW_PRIVATE_URLS"
            )


def new_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def create_endpoint(
    conn: Connection,
    tenant_id: str,
    url: str,
    *,
    event_types: Sequence[str] | None = None,
    description: str = "",
) -> WebhookEndpointRecord:
    """A live endpoint of the tenant's, unless it holds MAX_ENDPOINTS_PER_TENANT already (its
    row locked first, so two creates at once cannot both pass the count)."""
    conn.execute(text("SELECT 1 FROM tenants WHERE id = :t FOR UPDATE"), {"t": tenant_id})
    live = conn.execute(
        select(func.count())
        .select_from(endpoints)
        .where(endpoints.c.tenant_id == tenant_id, endpoints.c.disabled_at.is_(None))
    ).scalar_one()
    if live >= MAX_ENDPOINTS_PER_TENANT:
        raise TooManyEndpoints(
            f"this tenant holds {live} webhook endpoints, the most it may; delete one first"
        )
    row = conn.execute(
        insert(endpoints)
        .values(
            id=new_id("webhook"),
            tenant_id=tenant_id,
            url=url,
            secret=new_secret(),
            event_types=list(event_types) if event_types is not None else None,
            description=description,
        )
        .returning(*endpoints.c)
    ).one()
    return WebhookEndpointRecord.from_row(row)


def list_endpoints(conn: Connection, tenant_id: str) -> list[WebhookEndpointRecord]:
    """The tenant's live endpoints, oldest first."""
    rows = conn.execute(
        select(endpoints)
        .where(endpoints.c.tenant_id == tenant_id, endpoints.c.disabled_at.is_(None))
        .order_by(endpoints.c.created_at, endpoints.c.id)
    ).all()
    return [WebhookEndpointRecord.from_row(r) for r in rows]


def get_endpoint(
    conn: Connection, tenant_id: str, endpoint_id: str
) -> WebhookEndpointRecord | None:
    """One of the tenant's endpoints, deleted ones included (their log stays readable)."""
    row = conn.execute(
        select(endpoints).where(endpoints.c.id == endpoint_id, endpoints.c.tenant_id == tenant_id)
    ).one_or_none()
    return WebhookEndpointRecord.from_row(row) if row else None


def disable_endpoint(
    conn: Connection, tenant_id: str, endpoint_id: str
) -> WebhookEndpointRecord | None:
    """Stop posting to the endpoint (None: no live endpoint of the tenant's by that id): no new
    event goes to it, and what was pending is marked failed."""
    row = conn.execute(
        update(endpoints)
        .where(
            endpoints.c.id == endpoint_id,
            endpoints.c.tenant_id == tenant_id,
            endpoints.c.disabled_at.is_(None),
        )
        .values(disabled_at=datetime.now(UTC))
        .returning(*endpoints.c)
    ).one_or_none()
    if row is None:
        return None
    conn.execute(
        update(deliveries)
        .where(deliveries.c.endpoint_id == endpoint_id, deliveries.c.status == "pending")
        .values(status="failed", last_error="the endpoint was deleted")
    )
    return WebhookEndpointRecord.from_row(row)


ROTATION_OVERLAP_S = 24 * 3600.0


def rotate_secret(
    conn: Connection, tenant_id: str, endpoint_id: str, *, overlap_s: float = ROTATION_OVERLAP_S
) -> WebhookEndpointRecord | None:
    """A new signing secret for a live endpoint of the tenant's (None: none by that id). For
    `overlap_s` each delivery is signed with the old secret too (Standard Webhooks puts both
    signatures in `webhook-signature`; a receiver accepts either), so a receiver can switch
    without dropping one; a rotation during an overlap ends it."""
    row = conn.execute(
        update(endpoints)
        .where(
            endpoints.c.id == endpoint_id,
            endpoints.c.tenant_id == tenant_id,
            endpoints.c.disabled_at.is_(None),
        )
        .values(
            previous_secret=endpoints.c.secret,
            previous_secret_until=func.now() + func.make_interval(0, 0, 0, 0, 0, 0, overlap_s),
            secret=new_secret(),
        )
        .returning(*endpoints.c)
    ).one_or_none()
    return WebhookEndpointRecord.from_row(row) if row else None


def list_deliveries(
    conn: Connection, endpoint_id: str, *, after: str | None, limit: int
) -> tuple[list[WebhookDeliveryRecord], bool]:
    """The endpoint's delivery log, newest first (`after`: a delivery id of the previous page)."""
    rows, more = newest_first(
        conn, deliveries, scope=deliveries.c.endpoint_id == endpoint_id, after=after, limit=limit
    )
    return [WebhookDeliveryRecord.from_row(r) for r in rows], more


def get_delivery(
    conn: Connection, endpoint_id: str, delivery_id: str
) -> WebhookDeliveryRecord | None:
    row = conn.execute(
        select(deliveries).where(
            deliveries.c.id == delivery_id, deliveries.c.endpoint_id == endpoint_id
        )
    ).one_or_none()
    return WebhookDeliveryRecord.from_row(row) if row else None


def enqueue_test(conn: Connection, endpoint: WebhookEndpointRecord) -> WebhookDeliveryRecord:
    """A `webhook.test` event for this endpoint alone, due now."""
    event_id = "evt_" + secrets.token_hex(16)
    payload = {
        "id": event_id,
        "object": "event",
        "created_at": int(datetime.now(UTC).timestamp()),
        "type": TEST_EVENT,
        "data": {"id": endpoint.id, "object": "webhook_endpoint", "url": endpoint.url},
    }
    row = conn.execute(
        insert(deliveries)
        .values(
            id="msg_" + secrets.token_hex(16),
            endpoint_id=endpoint.id,
            event_id=event_id,
            event_type=TEST_EVENT,
            payload=payload,
        )
        .returning(*deliveries.c)
    ).one()
    return WebhookDeliveryRecord.from_row(row)


def redeliver(conn: Connection, endpoint_id: str, delivery_id: str) -> WebhookDeliveryRecord | None:
    """A failed delivery due again now, its attempts counted on (None: it is not failed)."""
    row = conn.execute(
        update(deliveries)
        .where(
            deliveries.c.id == delivery_id,
            deliveries.c.endpoint_id == endpoint_id,
            deliveries.c.status == "failed",
        )
        .values(status="pending", next_attempt_at=datetime.now(UTC))
        .returning(*deliveries.c)
    ).one_or_none()
    return WebhookDeliveryRecord.from_row(row) if row else None


# -- delivering ---------------------------------------------------------------------------------

# Deliveries due, taken: each one's next attempt moved a lease ahead and counted, in one
# statement (SKIP LOCKED: two deliverers take different ones).
_TAKE = text(
    """
    UPDATE webhook_deliveries d
    SET attempts = d.attempts + 1, next_attempt_at = now() + make_interval(secs => :lease)
    FROM (
        SELECT id FROM webhook_deliveries
        WHERE status = 'pending' AND next_attempt_at <= now()
        ORDER BY next_attempt_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ) due, webhook_endpoints e
    WHERE d.id = due.id AND e.id = d.endpoint_id
    RETURNING d.id, d.payload, d.attempts, e.url, e.secret, e.disabled_at IS NOT NULL AS disabled,
              CASE WHEN e.previous_secret_until > now() THEN e.previous_secret END AS previous
    """
)

# An attempt's outcome, written only if no later attempt was taken meanwhile (a deliverer past
# its lease finds its attempt counted over and writes nothing).
_RECORD = text(
    """
    UPDATE webhook_deliveries
    SET status = CAST(:status AS varchar), last_status_code = :code, last_error = :error,
        delivered_at = CASE WHEN CAST(:status AS varchar) = 'delivered' THEN now() END,
        next_attempt_at = now() + make_interval(secs => :retry_in)
    WHERE id = :id AND attempts = :attempts AND status = 'pending'
    """
)


@dataclass(frozen=True)
class Attempt:
    """What one post answered: a status code, or why there was none."""

    code: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.code is not None and 200 <= self.code < 300


def sign(secrets_: Sequence[str], msg_id: str, body: str, at: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one delivery: a signature by each secret (the current
    one, and the one a rotation replaced while its overlap lasts), space-separated."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": " ".join(Webhook(s).sign(msg_id, at, body) for s in secrets_),
    }


def post(
    http: httpx.Client,
    url: str,
    secrets_: Sequence[str],
    msg_id: str,
    payload: object,
    allow_private: bool,
) -> Attempt:
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True)
    try:
        check_url(url, allow_private=allow_private)
        headers = {
            **sign(secrets_, msg_id, body, datetime.now(UTC)),
            "content-type": "application/json",
            "user-agent": "loraforge-webhooks",
        }
        response = http.post(url, content=body, headers=headers, follow_redirects=False)
    except (httpx.HTTPError, UnsafeUrl) as exc:
        return Attempt(None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
    if 200 <= response.status_code < 300:
        return Attempt(response.status_code, None)
    said = response.text[:200] if response.content else response.reason_phrase
    return Attempt(response.status_code, f"HTTP {response.status_code}: {said}"[:MAX_ERROR_CHARS])


def deliver_due(
    engine: Engine,
    *,
    retry_schedule: Sequence[float],
    timeout: float,
    allow_private: bool,
    limit: int = PASS_LIMIT,
) -> int:
    """One pass: post every delivery due (at most `limit`) and record each outcome; how many
    were delivered."""
    with engine.begin() as conn:
        taken = conn.execute(_TAKE, {"lease": LEASE_S, "limit": limit}).all()
    delivered = 0
    with httpx.Client(timeout=timeout) as http:
        for row in taken:
            if row.disabled:
                attempt = Attempt(None, "the endpoint was deleted")
            else:
                signers = [row.secret, *([row.previous] if row.previous else [])]
                attempt = post(http, row.url, signers, row.id, row.payload, allow_private)
            if attempt.ok:
                status, retry_in = "delivered", 0.0
                delivered += 1
            elif row.attempts <= len(retry_schedule) and not row.disabled:
                status, retry_in = "pending", retry_schedule[row.attempts - 1]
            else:
                status, retry_in = "failed", 0.0
            with engine.begin() as conn:
                conn.execute(
                    _RECORD,
                    {
                        "id": row.id,
                        "attempts": row.attempts,
                        "status": status,
                        "code": attempt.code,
                        "error": attempt.error,
                        "retry_in": retry_in,
                    },
                )
            if not attempt.ok:
                log.info("webhook %s attempt %d: %s", row.id, row.attempts, attempt.error)
    return delivered


# -- the platform's view ------------------------------------------------------------------------


@dataclass(frozen=True)
class Backlog:
    """Deliveries not yet delivered (their retries included), and how long the most overdue of
    them has been due: a deliverer that stopped shows as an age that grows past a few passes."""

    pending: int
    oldest_due_seconds: float


def backlog(conn: Connection) -> Backlog:
    """Read off the pending deliveries' partial index: what a scrape costs follows what is
    pending, not the log's history."""
    row = conn.execute(
        text(
            "SELECT count(*) AS pending, coalesce(extract(epoch FROM now() - min(next_attempt_at) "
            "FILTER (WHERE next_attempt_at <= now())), 0) AS overdue "
            "FROM webhook_deliveries WHERE status = 'pending'"
        )
    ).one()
    return Backlog(int(row.pending), max(0.0, float(row.overdue)))


def forget_old_deliveries(engine: Engine, older_than_days: float) -> int:
    """Delete the delivery log's delivered and failed entries older than `older_than_days`
    (pending ones stay whatever their age: they are still to be delivered), one endpoint at a
    time along its log's index; how many went."""
    with engine.connect() as conn:
        ids = list(conn.execute(select(endpoints.c.id)).scalars())
    gone = 0
    for endpoint_id in ids:
        with engine.begin() as conn:
            gone += conn.execute(
                text(
                    "DELETE FROM webhook_deliveries WHERE endpoint_id = :e AND status <> 'pending' "
                    "AND created_at < now() - CAST(:days AS float8) * interval '1 day'"
                ),
                {"e": endpoint_id, "days": older_than_days},
            ).rowcount
    return gone
