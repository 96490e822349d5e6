"""The reads the dashboard's Sessions pages make: a page of the tenant's interactive sessions
with their models and calls counted, a session's models with their calls, its saved
checkpoints with the adapter version each was published as, and a training model's curves,
downsampled past a chart's points as a job's are.

Every read is scoped to the tenant, and each is a few statements whatever a session holds: the
sessions page counts the calls of its fifty sessions in one grouped statement (through
`ix_interactive_models_session` and each model's `(model_id, seq)` key), never every call of
the tenant nor one statement per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Connection, Select, Table, and_, func, select, true

from control_plane.dashboard.queries import (
    MAX_CHART_POINTS,
    Series,
    downsample,
    json_number,
    series_of,
)
from control_plane.db.tables import Adapter, AdapterVersion, BaseModelRow
from control_plane.interactive import CallKind, CallStatus
from control_plane.interactive import calls as _calls
from control_plane.interactive import checkpoints as _checkpoints
from control_plane.interactive import models as _models
from control_plane.interactive import sessions as _sessions
from control_plane.interactive_saves import encrypted
from control_plane.pagination import newest_first, trim
from control_plane.records import _FromRow

_bases = cast(Table, BaseModelRow.__table__)
_versions = cast(Table, AdapterVersion.__table__)
_adapters = cast(Table, Adapter.__table__)

ACTIVE_WITHIN = timedelta(minutes=2)
"""A session heard from within this is active (unless its client finished it): the tinker SDK
heartbeats every 10 seconds and warns its user once two minutes pass without one answered, so
past that the session's process is gone or cut off. Compared with the database's clock, which
stamped the heartbeat."""


@dataclass(frozen=True)
class CallCounts:
    """Calls by status (`CallStatus`)."""

    pending: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0


def _counted(calls: Table) -> list[ColumnElement[Any]]:
    """One column per status, named after it: `count(*) FILTER (WHERE status = ...)`."""
    return [
        func.count(calls.c.id).filter(calls.c.status == status.value).label(status.value)
        for status in CallStatus
    ]


def _counts(row: Any) -> CallCounts:
    return CallCounts(**{status.value: int(row._mapping[status.value]) for status in CallStatus})


def _active() -> ColumnElement[bool]:
    """Heard from within `ACTIVE_WITHIN` and not finished by its client: what a search for
    `active` matches with `ACTIVE_WITHIN` as its timeout (`interactive_sessions.search`)."""
    heard = _sessions.c.last_heartbeat_at > func.now() - ACTIVE_WITHIN
    return and_(_sessions.c.finished_at.is_(None), heard).label("active")


@dataclass(frozen=True)
class SessionLine:
    """A session as the pages show it: its name and times, its status, its counts."""

    id: str
    display_name: str | None
    created_at: datetime
    last_heartbeat_at: datetime
    active: bool
    finished_at: datetime | None
    finish_reason: str | None
    finish_detail: str | None
    sdk_version: str | None
    tags: list[Any]
    models: int
    calls: CallCounts

    @property
    def status(self) -> str:
        """`finished` once its client closed it (`finish_reason` says how), else `active`
        while it heartbeats, else `ended`: it went silent."""
        if self.finished_at is not None:
            return "finished"
        return "active" if self.active else "ended"


def sessions_page(
    conn: Connection, tenant_id: str, *, after: str | None, limit: int
) -> tuple[list[SessionLine], bool]:
    """The tenant's sessions, newest first (keyset on `(created_at, id)` through
    `ix_interactive_sessions_tenant_created`), each with its models and its calls by status;
    `after` is the last session id of the page before (`LookupError` when it is not one of the
    tenant's sessions)."""
    rows, more = newest_first(
        conn, _sessions, scope=_sessions.c.tenant_id == tenant_id, after=after, limit=limit
    )
    counted = _session_counts(conn, [r.id for r in rows])
    # A session deleted (with its tenant) between the two reads is left out, not an error.
    return [_session_line(r, counted[r.id]) for r in rows if r.id in counted], more


def _session_counts(conn: Connection, session_ids: Sequence[str]) -> dict[str, Any]:
    """Per session: active, its models, its calls by status; one grouped statement."""
    if not session_ids:
        return {}
    rows = conn.execute(
        select(
            _sessions.c.id,
            _active(),
            func.count(func.distinct(_models.c.id)).label("models"),
            *_counted(_calls),
        )
        .select_from(
            _sessions.outerjoin(_models, _models.c.session_id == _sessions.c.id).outerjoin(
                _calls, _calls.c.model_id == _models.c.id
            )
        )
        .where(_sessions.c.id.in_(list(session_ids)))
        .group_by(_sessions.c.id)
    ).all()
    return {row.id: row for row in rows}


def _session_line(session: Any, counted: Any) -> SessionLine:
    return SessionLine(
        id=session.id,
        display_name=session.display_name,
        created_at=session.created_at,
        last_heartbeat_at=session.last_heartbeat_at,
        active=bool(counted.active),
        finished_at=session.finished_at,
        finish_reason=session.finish_reason,
        finish_detail=session.finish_detail,
        sdk_version=session.sdk_version,
        tags=list(session.tags),
        models=int(counted.models),
        calls=_counts(counted),
    )


def session_lines(
    conn: Connection, tenant_id: str, session_ids: Sequence[str]
) -> list[SessionLine]:
    """The tenant's sessions among `session_ids`, in that order, with their counts (a search's
    page drawn as the list's rows); another tenant's id, or one deleted since, is left out."""
    found = conn.execute(
        select(_sessions).where(
            _sessions.c.id.in_(list(session_ids)), _sessions.c.tenant_id == tenant_id
        )
    ).all()
    counted = _session_counts(conn, [r.id for r in found])
    by_id = {r.id: _session_line(r, counted[r.id]) for r in found if r.id in counted}
    return [by_id[i] for i in session_ids if i in by_id]


def session_line(conn: Connection, tenant_id: str, session_id: str) -> SessionLine | None:
    """One of the tenant's sessions with its counts; None when it is not the tenant's."""
    return next(iter(session_lines(conn, tenant_id, [session_id])), None)


@dataclass(frozen=True)
class ModelLine:
    """A model of a session: who holds its weights (`held_by`, or none: not loaded yet, or
    `unloaded_at` set), its calls by status, its last call, and its last failure's message."""

    id: str
    kind: str
    base_model_name: str
    rank: int | None
    held_by: str | None
    created_at: datetime
    unloaded_at: datetime | None
    calls: CallCounts
    last_call_kind: str | None
    last_call_status: str | None
    last_call_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    has_metrics: bool


def _last_call(columns: Sequence[ColumnElement[Any]], *where: ColumnElement[bool]) -> Any:
    """The model's newest call (by `seq`, walked backwards on its `(model_id, seq)` key)
    meeting `where`, as a lateral subquery."""
    return (
        select(*columns)
        .where(_calls.c.model_id == _models.c.id, *where)
        .order_by(_calls.c.seq.desc())
        .limit(1)
        .lateral()
    )


def session_models(
    conn: Connection, tenant_id: str, session_id: str, *, limit: int
) -> tuple[list[ModelLine], bool]:
    """The session's models, oldest first, at most `limit` (and whether there are more): one
    statement, each model's calls read through its `(model_id, seq)` key."""
    counts = (
        select(*_counted(_calls), func.count(_calls.c.metrics).label("metric_calls"))
        .where(_calls.c.model_id == _models.c.id)
        .lateral("counts")
    )
    last = _last_call([_calls.c.kind, _calls.c.status, _calls.c.created_at])
    failed = _last_call(
        [_calls.c.error["error"].astext.label("error"), _calls.c.finished_at],
        _calls.c.status == CallStatus.FAILED.value,
    )
    rows = conn.execute(
        select(
            _models.c.id,
            _models.c.kind,
            _bases.c.name.label("base_model_name"),
            _models.c.lora_config,
            _models.c.held_by,
            _models.c.created_at,
            _models.c.unloaded_at,
            *(counts.c[status.value] for status in CallStatus),
            counts.c.metric_calls,
            last.c.kind.label("last_call_kind"),
            last.c.status.label("last_call_status"),
            last.c.created_at.label("last_call_at"),
            failed.c.error.label("last_error"),
            failed.c.finished_at.label("last_error_at"),
        )
        .select_from(_models.join(_bases, _bases.c.id == _models.c.base_model_id))
        .join(counts, true())
        .outerjoin(last, true())
        .outerjoin(failed, true())
        .where(_models.c.session_id == session_id, _models.c.tenant_id == tenant_id)
        .order_by(_models.c.created_at, _models.c.id)
        .limit(limit + 1)
    ).all()
    kept, more = trim(rows, limit)
    return [_model_line(r) for r in kept], more


def _model_line(row: Any) -> ModelLine:
    rank = row.lora_config.get("rank")
    return ModelLine(
        id=row.id,
        kind=row.kind,
        base_model_name=row.base_model_name,
        # What the SDK sent: shown only when it is a whole number.
        rank=rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        held_by=row.held_by,
        created_at=row.created_at,
        unloaded_at=row.unloaded_at,
        calls=_counts(row),
        last_call_kind=row.last_call_kind,
        last_call_status=row.last_call_status,
        last_call_at=row.last_call_at,
        last_error=row.last_error,
        last_error_at=row.last_error_at,
        has_metrics=row.metric_calls > 0,
    )


@dataclass(frozen=True)
class ModelCurves:
    """A training model's history by step, each series in step order: `train`, the step's
    forward_backward losses (`loss:sum`) summed; `eval`, its forward calls' (forward only: an
    evaluation) summed; `grad_norm`, the `grad_norm:mean` of the optim_step that ends it.
    `downsampled`: the series were bucketed to a chart's points (`queries.downsample`)."""

    train: Series
    eval: Series
    grad_norm: Series
    downsampled: bool


# What each series sums, in `ModelCurves`' order: of which calls, which metric.
_METRICS = (
    (CallKind.FORWARD_BACKWARD, "loss:sum"),
    (CallKind.FORWARD, "loss:sum"),
    (CallKind.OPTIM_STEP, "grad_norm:mean"),
)


def model_curves(
    conn: Connection,
    tenant_id: str,
    session_id: str,
    model_id: str,
    max_points: int = MAX_CHART_POINTS,
) -> ModelCurves | None:
    """The curves of a model of the tenant's session (None when it is not one), from its
    completed calls' `metrics`, which outlive their answers. A call's step is the number of the
    model's optim_steps completed before it (0 until the first), so the step's forward_backward
    and forward calls and the optim_step that applies them share one. The model is looked up by
    its key, then its calls read off its `(model_id, seq)` key in order, none of another's.

    Each series holds at most `max_points` points: past that, all three are bucketed by the job
    chart's rule (`queries.downsample`: the narrowest of its widths that fits, each bucket its
    points' mean step and mean value), so a model trained 100,000 steps sends a page a chart's
    worth of points. The buckets are made here from the steps read, one row a step: a model's
    steps are counted from its calls, which no trigger sums as it does a job's events."""
    owned = conn.execute(
        select(_models.c.id).where(
            _models.c.id == model_id,
            _models.c.session_id == session_id,
            _models.c.tenant_id == tenant_id,
        )
    ).one_or_none()
    if owned is None:
        return None
    optim_step = _calls.c.kind == CallKind.OPTIM_STEP.value
    history = (
        select(
            _calls.c.kind,
            _calls.c.metrics,
            func.count()
            .filter(optim_step)
            .over(order_by=_calls.c.seq, rows=(None, -1))
            .label("step"),
        )
        .where(
            _calls.c.model_id == model_id,
            _calls.c.status == CallStatus.COMPLETED.value,
            _calls.c.kind.in_([kind.value for kind, _ in _METRICS]),
        )
        .subquery("history")
    )

    def summed(kind: CallKind, key: str) -> ColumnElement[Any]:
        """The step's calls of `kind`: their metric `key` summed where it is a JSON number."""
        return func.sum(json_number(history.c.metrics[key])).filter(history.c.kind == kind.value)

    rows = conn.execute(
        select(history.c.step, *(summed(kind, key) for kind, key in _METRICS))
        .group_by(history.c.step)
        .order_by(history.c.step)
    ).all()
    (train, evaluation, grad_norm), downsampled = downsample(
        [series_of(rows, 0, column) for column in (1, 2, 3)], max_points
    )
    return ModelCurves(train, evaluation, grad_norm, downsampled)


@dataclass(frozen=True)
class CheckpointLine(_FromRow):
    """Weights a model of the session saved, and the version they were published as (the
    adapter's name and number, None while unpublished or once that version is deleted)."""

    id: str
    model_id: str
    kind: str
    name: str
    path: str
    created_at: datetime
    size_bytes: int | None
    expires_at: datetime | None
    adapter_name: str | None
    version: int | None
    files: dict[str, Any] | None

    @property
    def published_as(self) -> str | None:
        return f"{self.adapter_name}@{self.version}" if self.adapter_name else None

    @property
    def encrypted(self) -> bool:
        """An export encrypted to its owner's age keys: the platform cannot publish it."""
        return encrypted(self.files)


def _checkpoints_of(tenant_id: str, session_id: str) -> Select[Any]:
    """The session's checkpoints (through its models, then each model's
    `uq_interactive_checkpoints_name` key) with their published versions."""
    return (
        select(
            _checkpoints.c.id,
            _checkpoints.c.model_id,
            _checkpoints.c.kind,
            _checkpoints.c.name,
            _checkpoints.c.path,
            _checkpoints.c.created_at,
            _checkpoints.c.size_bytes,
            _checkpoints.c.expires_at,
            _adapters.c.name.label("adapter_name"),
            _versions.c.number.label("version"),
            _checkpoints.c.files,
        )
        .select_from(
            _checkpoints.join(_models, _models.c.id == _checkpoints.c.model_id)
            .outerjoin(_versions, _versions.c.id == _checkpoints.c.published_version_id)
            .outerjoin(_adapters, _adapters.c.id == _versions.c.adapter_id)
        )
        .where(_models.c.session_id == session_id, _checkpoints.c.tenant_id == tenant_id)
    )


def session_checkpoints(
    conn: Connection, tenant_id: str, session_id: str, *, limit: int
) -> tuple[list[CheckpointLine], bool]:
    """The session's saved checkpoints, newest first, at most `limit` (and whether there are
    more)."""
    rows = conn.execute(
        _checkpoints_of(tenant_id, session_id)
        .order_by(_checkpoints.c.created_at.desc(), _checkpoints.c.id.desc())
        .limit(limit + 1)
    ).all()
    kept, more = trim(rows, limit)
    return [CheckpointLine.from_row(r) for r in kept], more


def session_checkpoint(
    conn: Connection, tenant_id: str, session_id: str, path: str
) -> CheckpointLine | None:
    """The session's checkpoint at `path` (its `uq_interactive_checkpoints_path` key); None
    when no model of this session saved one there."""
    row = conn.execute(
        _checkpoints_of(tenant_id, session_id).where(_checkpoints.c.path == path)
    ).one_or_none()
    return CheckpointLine.from_row(row) if row is not None else None
