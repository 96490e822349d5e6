"""What a session's models used, as its page shows it: per model, the training tokens
(forward and forward_backward), the prompt tokens (a sample's prefill) and sampled tokens of its
samples, and the checkpoints it saved, summed from its completed calls' `usage` (revision 0035,
written when an executor answers a call: `control_plane.usage.call_usage`), and the session's
total. The same counts the Tinker API's `GET /api/v1/billing/usage/events` reports by hour.

One statement, scoped to the tenant: the session's models (through
`ix_interactive_models_session`), each model's calls through its `(model_id, seq)` key, grouped
by model; a model that used nothing metered is left out. The total is a window over the groups,
so it counts every model even when only the first `limit` are listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import BigInteger, ColumnElement, Connection, Table, func, select

from control_plane.db.tables import BaseModelRow
from control_plane.interactive import CallStatus
from control_plane.interactive import calls as _calls
from control_plane.interactive import models as _models
from control_plane.pagination import trim
from control_plane.usage import METERED

_bases = cast(Table, BaseModelRow.__table__)


@dataclass(frozen=True)
class Used:
    """Metered usage: tokens trained on, prompt (prefill) and sampled tokens, checkpoints."""

    training_tokens: int = 0
    prefill_tokens: int = 0
    sampled_tokens: int = 0
    checkpoints: int = 0


@dataclass(frozen=True)
class ModelUsage:
    """A model of the session and what its completed calls used."""

    id: str
    kind: str
    base_model_name: str
    used: Used


@dataclass(frozen=True)
class SessionUsage:
    """The session's models that used something (oldest first, at most the limit asked; `more`:
    others are left out) and the session's total over all of them."""

    models: list[ModelUsage]
    total: Used
    more: bool


def _summed(key: str) -> ColumnElement[Any]:
    return func.coalesce(func.sum(_calls.c.usage[key].astext.cast(BigInteger)), 0)


def session_usage(conn: Connection, tenant_id: str, session_id: str, *, limit: int) -> SessionUsage:
    """What the tenant's session used, by model and in all (one statement)."""
    per_model = [_summed(key).label(key) for key in METERED]
    totals = [func.sum(_summed(key)).over().label(f"total_{key}") for key in METERED]
    rows = conn.execute(
        select(
            _models.c.id,
            _models.c.kind,
            _bases.c.name.label("base_model_name"),
            *per_model,
            *totals,
        )
        .select_from(
            _models.join(_bases, _bases.c.id == _models.c.base_model_id).join(
                _calls, _calls.c.model_id == _models.c.id
            )
        )
        .where(
            _models.c.session_id == session_id,
            _models.c.tenant_id == tenant_id,
            _calls.c.tenant_id == tenant_id,
            _calls.c.status == CallStatus.COMPLETED.value,
            _calls.c.usage.is_not(None),
        )
        .group_by(_models.c.id, _bases.c.name)
        .order_by(_models.c.created_at, _models.c.id)
        .limit(limit + 1)
    ).all()
    kept, more = trim(rows, limit)
    models = [
        ModelUsage(
            id=row.id,
            kind=row.kind,
            base_model_name=row.base_model_name,
            used=Used(**{key: int(row._mapping[key]) for key in METERED}),
        )
        for row in kept
    ]
    # Every row carries the totals over all the groups, those past the limit too.
    total = Used(**{k: int(rows[0]._mapping[f"total_{k}"]) for k in METERED}) if rows else Used()
    return SessionUsage(models, total, more)
