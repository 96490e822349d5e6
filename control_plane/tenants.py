"""Tenants and their API keys. Keys are shown once and stored only as a keyed hash."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Row, Select, Table, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from control_plane.db.errors import breaks_unique_key
from control_plane.db.tables import ROLES, ApiKey, Tenant, TenantQueueStats
from control_plane.ids import new_id
from control_plane.pagination import trim
from control_plane.records import ApiKeyRecord, TenantRecord

tenants = cast(Table, Tenant.__table__)
api_keys = cast(Table, ApiKey.__table__)

KEY_PREFIX = "lf-"
# A tenant's own limits (None: the platform's default for each).
LIMITS = ("max_running_jobs", "max_priority", "max_interactive_models", "max_checkpoint_bytes")
# The largest cap on a tenant's checkpoint bytes taken: an exabyte, past any store and inside
# the column's bigint.
MAX_CHECKPOINT_BYTES = 10**18


class TenantExistsError(Exception):
    pass


# The unique key on tenants' names, as revision 0001 names it (`NAMING`'s `uq_` convention).
_NAME_KEY = "uq_tenants_name"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a tenant, through one key, with one role."""

    tenant_id: str
    key_id: str
    role: str

    def can_write(self) -> bool:
        return self.role in ("admin", "member")

    def is_admin(self) -> bool:
        return self.role == "admin"


def is_operator_tenant(conn: Connection, tenant_id: str, operator_tenants: Collection[str]) -> bool:
    """Whether the tenant is named in `operator_tenants` (the setting
    `platform_operator_tenants`): the platform's own tenant, whose admins are platform operators
    (they register what all tenants share: base models) and whose keys see the server-side
    details of those."""
    name = conn.execute(
        select(tenants.c.name).where(tenants.c.id == tenant_id)
    ).scalar_one_or_none()
    return name is not None and name in operator_tenants


def hash_key(secret_key: str, api_key: str) -> str:
    return hmac.new(secret_key.encode(), api_key.encode(), hashlib.sha256).hexdigest()


def create_tenant(
    conn: Connection,
    name: str,
    *,
    max_running_jobs: int | None = None,
    max_priority: int | None = None,
    max_interactive_models: int | None = None,
    max_checkpoint_bytes: int | None = None,
) -> TenantRecord:
    """A new tenant with its limits (None: the platform's default); TenantExistsError when the
    name is taken. Any other integrity error (a limit out of a check constraint's range, which
    the REST body and the CLI refuse before they call this) is raised as it is: it is not a
    name taken, and saying so would send its caller to pick another name for nothing."""
    try:
        with conn.begin_nested():
            row = conn.execute(
                insert(tenants)
                .values(
                    id=new_id("tenant"),
                    name=name,
                    max_running_jobs=max_running_jobs,
                    max_priority=max_priority,
                    max_interactive_models=max_interactive_models,
                    max_checkpoint_bytes=max_checkpoint_bytes,
                )
                .returning(*tenants.c)
            ).one()
    except IntegrityError as exc:
        if not breaks_unique_key(exc, _NAME_KEY):
            raise
        raise TenantExistsError(f"a tenant named {name!r} already exists") from exc
    return TenantRecord.from_row(row)


def set_limits(
    conn: Connection, name: str, default_running: int, **limits: int | None
) -> TenantRecord | None:
    """Set a tenant's `max_running_jobs`, `max_priority`, `max_interactive_models` and/or
    `max_checkpoint_bytes` (None: the platform's default, `default_running` for the first); the
    tenant as it now is, or None when no tenant has that name. A new running limit re-flags the
    tenant's queue lines (revision 0013's trigger), and one that leaves room for more of its
    queued jobs wakes idle trainers for them: a trainer asleep would otherwise find them only at
    its next poll."""
    unknown = set(limits) - set(LIMITS)
    if unknown:
        raise TypeError(f"not a tenant limit: {sorted(unknown)}")
    before = conn.execute(
        select(tenants.c.max_running_jobs).where(tenants.c.name == name).with_for_update()
    ).one_or_none()
    if before is None:
        return None
    row = conn.execute(
        update(tenants).where(tenants.c.name == name).values(**limits).returning(*tenants.c)
    ).one()
    old_limit = _or(before.max_running_jobs, default_running)
    if _or(row.max_running_jobs, default_running) > old_limit:
        conn.execute(_WAKE_FOR_ROOM, {"tenant": row.id, "default": default_running})
    return TenantRecord.from_row(row)


def _or(own: int | None, default: int) -> int:
    return default if own is None else own


# One wake-up (revision 0017's `queue_wake`) for each queued job of the tenant that its running
# limit now leaves room for, on that job's line's base: at most WAKE_FOR_ROOM_MAX a line, more
# than a platform has idle trainers to wake (with none asleep, each is one notification on the
# jobs channel, folded into one at commit).
WAKE_FOR_ROOM_MAX = 64
_WAKE_FOR_ROOM = text(
    f"""
    SELECT count(queue_wake(h.base_model_id))
    FROM tenant_queue_stats s
    JOIN tenants t ON t.id = s.tenant_id
    JOIN queue_heads h ON h.tenant_id = s.tenant_id AND h.queued > 0
    CROSS JOIN LATERAL generate_series(
        1, least(h.queued, coalesce(t.max_running_jobs, :default) - s.running, {WAKE_FOR_ROOM_MAX})
    )
    WHERE s.tenant_id = :tenant
    """
)


def priority_refusal(
    conn: Connection, tenant_id: str, priority: int, default_cap: int | None
) -> str | None:
    """Why the tenant's jobs may not ask for `priority` (above the tenant's `max_priority`, else
    the platform's `default_cap`, both set by the platform's operator), or None when they may."""
    own = conn.execute(
        select(tenants.c.max_priority).where(tenants.c.id == tenant_id)
    ).scalar_one_or_none()
    cap = own if own is not None else default_cap
    if cap is None or priority <= cap:
        return None
    return (
        f"priority: {priority} is above {cap}, the highest this tenant's jobs may ask for (the "
        f"platform's operator sets it); ask for {cap} or lower"
    )


@dataclass(frozen=True)
class TenantOverview:
    """A tenant as the platform's operator sees it: its own limits, its jobs counted off its
    queue bookkeeping row (kept exact by revision 0006's triggers: nothing counts jobs, so a
    page of tenants costs the same beside any backlog), when the queue last served it, and how
    many of its keys are live."""

    tenant: TenantRecord
    queued: int
    running: int
    cancelling: int
    succeeded: int
    failed: int
    cancelled: int
    last_served_at: datetime | None
    live_keys: int


_COUNTED = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")


def _overviews() -> Select[Any]:
    stats = cast(Table, TenantQueueStats.__table__)
    live_keys = (
        select(func.count())
        .where(api_keys.c.tenant_id == tenants.c.id, api_keys.c.revoked_at.is_(None))
        .scalar_subquery()
    )
    return select(
        tenants,
        *(func.coalesce(stats.c[name], 0).label(name) for name in _COUNTED),
        stats.c.last_served_at,
        live_keys.label("live_keys"),
    ).select_from(tenants.outerjoin(stats, stats.c.tenant_id == tenants.c.id))


def _overview(row: Row[Any]) -> TenantOverview:
    counts = {name: int(row._mapping[name]) for name in _COUNTED}
    return TenantOverview(
        TenantRecord.from_row(row),
        **counts,
        last_served_at=row.last_served_at,
        live_keys=int(row.live_keys),
    )


def list_tenants(
    conn: Connection, *, after: str | None, limit: int
) -> tuple[list[TenantOverview], bool]:
    """A page of tenants by name (`after`: the last name of the previous page; it need not be a
    tenant's), and whether another follows: a seek on the names' unique index."""
    rows, more = trim(conn.execute(page_query(after, limit)).all(), limit)
    return [_overview(row) for row in rows], more


def page_query(after: str | None, limit: int) -> Select[Any]:
    """`list_tenants`' statement: `limit + 1` tenants by name after `after`."""
    query = _overviews().order_by(tenants.c.name).limit(limit + 1)
    return query if after is None else query.where(tenants.c.name > after)


def tenant_overview(conn: Connection, name: str) -> TenantOverview | None:
    row = conn.execute(_overviews().where(tenants.c.name == name)).one_or_none()
    return _overview(row) if row is not None else None


def get_tenant(conn: Connection, tenant_id: str) -> TenantRecord | None:
    row = conn.execute(select(tenants).where(tenants.c.id == tenant_id)).one_or_none()
    return TenantRecord.from_row(row) if row else None


def get_tenant_by_name(conn: Connection, name: str) -> TenantRecord | None:
    row = conn.execute(select(tenants).where(tenants.c.name == name)).one_or_none()
    return TenantRecord.from_row(row) if row else None


def create_api_key(
    conn: Connection, secret_key: str, tenant_id: str, *, role: str, name: str = "default"
) -> tuple[ApiKeyRecord, str]:
    """Create a key; returns its record and the plaintext, which is never stored."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = conn.execute(
        insert(api_keys)
        .values(
            id=new_id("key"),
            tenant_id=tenant_id,
            name=name,
            prefix=plaintext[:10],
            key_hash=hash_key(secret_key, plaintext),
            role=role,
        )
        .returning(*api_keys.c)
    ).one()
    return ApiKeyRecord.from_row(row), plaintext


def authenticate(conn: Connection, secret_key: str, api_key: str) -> Principal | None:
    row = conn.execute(
        select(api_keys.c.id, api_keys.c.tenant_id, api_keys.c.role).where(
            api_keys.c.key_hash == hash_key(secret_key, api_key), api_keys.c.revoked_at.is_(None)
        )
    ).one_or_none()
    if row is None:
        return None
    return Principal(tenant_id=row.tenant_id, key_id=row.id, role=row.role)


def live_key_principal(conn: Connection, tenant_id: str, key_id: str) -> Principal | None:
    """The principal of the tenant's key `key_id` while it is not revoked, else None."""
    row = conn.execute(
        select(api_keys.c.id, api_keys.c.tenant_id, api_keys.c.role).where(
            api_keys.c.id == key_id,
            api_keys.c.tenant_id == tenant_id,
            api_keys.c.revoked_at.is_(None),
        )
    ).one_or_none()
    return Principal(tenant_id=row.tenant_id, key_id=row.id, role=row.role) if row else None


def list_api_keys(conn: Connection, tenant_id: str) -> list[ApiKeyRecord]:
    rows = conn.execute(
        select(api_keys).where(api_keys.c.tenant_id == tenant_id).order_by(api_keys.c.created_at)
    ).all()
    return [ApiKeyRecord.from_row(row) for row in rows]


def revoke_api_key(conn: Connection, tenant_id: str, key_id: str) -> bool:
    result = conn.execute(
        update(api_keys)
        .where(
            api_keys.c.id == key_id,
            api_keys.c.tenant_id == tenant_id,
            api_keys.c.revoked_at.is_(None),
        )
        .values(revoked_at=func.now())
    )
    return result.rowcount == 1
