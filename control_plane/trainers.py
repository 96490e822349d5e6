"""The trainer registry: each trainer process upserts its row on every heartbeat, idle or busy,
so that readiness, the dashboard and `/metrics` can say which trainers are alive, what each
holds resident and what it is training. A trainer silent for longer than a lease is gone; its
row stays (until `forget_gone`) so that a page can show when it was last heard from.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import ColumnElement, Connection, Table, delete, func, select
from sqlalchemy.dialects.postgresql import insert

from control_plane.db.tables import Trainer

trainers = cast(Table, Trainer.__table__)


@dataclass(frozen=True)
class TrainerReport:
    """What a trainer says about itself on a heartbeat."""

    id: str
    host: str
    pid: int
    device: str
    resident_base: str | None = None
    current_job_id: str | None = None
    # "trainer" (takes jobs) or "interactive" (an executor of interactive sessions' calls).
    kind: str = "trainer"
    tokens_per_second: float | None = None
    step_seconds: float | None = None
    peak_memory_bytes: int | None = None
    claims: int = 0
    succeeded: int = 0
    failed: int = 0
    let_go: int = 0
    tokens_trained: int = 0


@dataclass(frozen=True)
class TrainerRecord:
    id: str
    kind: str
    host: str
    pid: int
    device: str
    resident_base: str | None
    current_job_id: str | None
    tokens_per_second: float | None
    step_seconds: float | None
    peak_memory_bytes: int | None
    claims: int
    succeeded: int
    failed: int
    let_go: int
    tokens_trained: int
    started_at: datetime
    last_heartbeat_at: datetime
    alive: bool


def report(conn: Connection, trainer: TrainerReport) -> None:
    """Upsert the trainer's row with the database's clock as its heartbeat (not committed)."""
    values = {
        "id": trainer.id,
        "kind": trainer.kind,
        "host": trainer.host,
        "pid": trainer.pid,
        "device": trainer.device,
        "resident_base": trainer.resident_base,
        "current_job_id": trainer.current_job_id,
        "tokens_per_second": trainer.tokens_per_second,
        "step_seconds": trainer.step_seconds,
        "peak_memory_bytes": trainer.peak_memory_bytes,
        "claims": trainer.claims,
        "succeeded": trainer.succeeded,
        "failed": trainer.failed,
        "let_go": trainer.let_go,
        "tokens_trained": trainer.tokens_trained,
    }
    statement = insert(trainers).values(**values, last_heartbeat_at=func.now())
    updated = {k: statement.excluded[k] for k in values if k != "id"}
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=[trainers.c.id], set_={**updated, "last_heartbeat_at": func.now()}
        )
    )


def remove(conn: Connection, trainer_id: str) -> None:
    """A trainer that stops cleanly takes its row with it (not committed)."""
    conn.execute(delete(trainers).where(trainers.c.id == trainer_id))


def list_trainers(
    conn: Connection, lease_seconds: float, *, include_gone: bool = True, kind: str = "trainer"
) -> list[TrainerRecord]:
    """Every known trainer of `kind` (only the live ones without `include_gone`), alive first
    then by id; `alive` means heard from within a lease."""
    alive = _alive(lease_seconds)
    query = (
        select(trainers, alive.label("alive"))
        .where(trainers.c.kind == kind)
        .order_by(alive.desc(), trainers.c.id)
    )
    if not include_gone:
        query = query.where(alive)
    return [TrainerRecord(**row._mapping) for row in conn.execute(query)]


def count_alive(conn: Connection, lease_seconds: float) -> int:
    """Trainers (not interactive executors) heard from within a lease."""
    query = select(func.count()).where(_alive(lease_seconds), trainers.c.kind == "trainer")
    return int(conn.execute(query).scalar_one())


def served_bases(conn: Connection, lease_seconds: float) -> set[str]:
    """The names of the bases that a live interactive executor holds resident."""
    query = select(trainers.c.resident_base).where(
        _alive(lease_seconds), trainers.c.kind == "interactive"
    )
    return {name for name in conn.execute(query).scalars() if name is not None}


def _alive(lease_seconds: float) -> ColumnElement[bool]:
    """Heard from within a lease, by the database's clock (the one heartbeats are written by)."""
    return trainers.c.last_heartbeat_at > func.now() - timedelta(seconds=lease_seconds)


def alive_sql(alias: str) -> str:
    """`_alive` for statements written as text: the `trainers` row `alias` was heard from
    within the interval bound as `:lease`."""
    return f"{alias}.last_heartbeat_at > now() - :lease"


def forget_gone(conn: Connection, older_than_seconds: float) -> int:
    """Delete the rows of trainers silent for longer than `older_than_seconds` (not committed)."""
    cutoff = func.now() - timedelta(seconds=older_than_seconds)
    return conn.execute(delete(trainers).where(trainers.c.last_heartbeat_at < cutoff)).rowcount
