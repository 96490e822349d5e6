"""SQLAlchemy table models. The schema changes only through alembic revisions in `migrations/`.

Rows never leave the storage layer as ORM objects: repositories turn them into frozen records
(`control_plane.records`) first.

Longer than the house's ~450 lines on purpose: every table of the schema is declared here, in
one metadata, beside the reason for each index, so that the schema a revision must reach reads
in one place (and `tests/migration` compares it with the migrations' as one).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Computed,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from control_plane.job_status import TERMINAL, JobStatus

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The check constraint's list, in `JobStatus`'s order (as revision 0001 wrote it).
JOB_STATUSES = tuple(status.value for status in JobStatus)
# The finished statuses as revision 0010's partial index names them.
FINISHED = tuple(sorted((status.value for status in TERMINAL), reverse=True))
# An event that records a change of its job's status.
STATUS_CHANGE = "(data -> 'status') IS NOT NULL"
EVALUATION = "(data -> 'eval_loss') IS NOT NULL"
ROLES = ("admin", "member", "reader")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONB, datetime: DateTime(timezone=True)}


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Tenant(Base):
    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("max_priority BETWEEN -100 AND 100", name="max_priority"),
        CheckConstraint(
            "max_interactive_models BETWEEN 1 AND 10000", name="max_interactive_models"
        ),
        CheckConstraint("max_checkpoint_bytes > 0", name="max_checkpoint_bytes"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now()
    # The highest priority its jobs may ask for (revision 0021); none: no cap.
    max_priority: Mapped[int | None] = mapped_column(Integer)
    # The loaded interactive training models it may hold (revision 0027); none: the platform's
    # `max_interactive_models_per_tenant`.
    max_interactive_models: Mapped[int | None] = mapped_column(Integer)
    # The bytes its interactive checkpoints may hold before a save is refused (revision 0028);
    # none: the platform's `max_checkpoint_bytes_per_tenant`.
    max_checkpoint_bytes: Mapped[int | None] = mapped_column(BigInteger)


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint(f"role IN {ROLES!r}", name="role"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = _now()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class File(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    purpose: Mapped[str] = mapped_column(String(32), nullable=False)
    bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    object_key: Mapped[str] = mapped_column(Text, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="uploaded")
    format: Mapped[str | None] = mapped_column(String(32))
    examples: Mapped[int | None] = mapped_column(Integer)
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    status_details: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_files_tenant_created", "tenant_id", "created_at"),)


class BaseModelRow(Base):
    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    source: Mapped[str] = mapped_column(Text, nullable=False)
    source_kind: Mapped[str] = mapped_column(String(16), nullable=False)
    revision: Mapped[str | None] = mapped_column(String(200))
    sha256: Mapped[str | None] = mapped_column(String(64))
    architecture: Mapped[str | None] = mapped_column(String(100))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    has_chat_template: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="ready")
    # Why an import (status `failed`) did not give a usable checkpoint.
    error_message: Mapped[str | None] = mapped_column(Text)
    # When the running import (status `registering`) was asked for.
    import_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()


class Job(Base):
    """A fine-tuning job. Jobs *are* the queue: the claim columns live here."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN {JOB_STATUSES!r}", name="status"),
        UniqueConstraint("tenant_id", "idempotency_key"),
        # Each base's queued jobs, oldest first: the age of its oldest in one probe (revision 0009).
        Index(
            "ix_jobs_queued_base",
            "base_model_id",
            "created_at",
            postgresql_where=text(f"status = '{JobStatus.QUEUED}'"),
        ),
        # The queued jobs with an attempt used, by when they may run (revision 0018): the jobs
        # that backed off, which `queue_wake_due` announces once they are due.
        Index(
            "ix_jobs_backing_off",
            "run_after",
            postgresql_where=text(f"status = '{JobStatus.QUEUED}' AND attempt > 0"),
        ),
        # By status alone (revision 0012): nothing a heartbeat writes is indexed (a HOT update).
        Index("ix_jobs_status", "status"),
        # A tenant's line of queued jobs for one base, in the claim's order (revision 0006).
        Index(
            "ix_jobs_queue_front",
            "tenant_id",
            "base_model_id",
            text("priority DESC"),
            "created_at",
            "id",
            postgresql_where=text(f"status = '{JobStatus.QUEUED}'"),
        ),
        # Keyset pages of a tenant's jobs, newest first by (created_at, id), read off the index.
        Index("ix_jobs_tenant_created_id", "tenant_id", "created_at", "id"),
        # The same pages of one finished status: each job enters once, as it ends (revision 0010).
        Index(
            "ix_jobs_tenant_finished",
            "tenant_id",
            "status",
            "created_at",
            "id",
            postgresql_where=text(f"status IN {FINISHED!r}"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    base_model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"), nullable=False)
    training_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"), nullable=False)
    validation_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    suffix: Mapped[str | None] = mapped_column(String(64))
    adapter_name: Mapped[str | None] = mapped_column(String(128))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    # Queue columns.
    priority: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="3")
    # Leases lost with their trainer (killed, node gone): the platform's faults, which give the
    # attempt back; bounded apart (a job that kills every trainer it runs on must end).
    interruptions: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    run_after: Mapped[datetime] = _now()
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    # Asked to pause while running: its trainer checkpoints it and leaves it `paused`.
    pause_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # Outcome and progress.
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_param: Mapped[str | None] = mapped_column(String(128))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    progress: Mapped[float | None] = mapped_column(Float)
    eta_seconds: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Continue-from: the adapter version whose weights this job starts from (None: fresh LoRA).
    parent_version_id: Mapped[str | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    # OpenAI's `metadata` (revision 0019): up to 16 string pairs the submitter attaches, returned
    # with the job and matched by `GET /v1/fine_tuning/jobs?metadata[k]=v` (JSONB `@>`, within
    # the tenant's pages). `metadata` itself is SQLAlchemy's name for a model's tables.
    user_metadata: Mapped[dict[str, str] | None] = mapped_column(JSONB(none_as_null=True))


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (
        Index("ix_job_events_job_id_id", "job_id", "id"),
        # A job's status changes (its timeline), not its metrics and log lines (revision 0011).
        Index(
            "ix_job_events_status_changes",
            "job_id",
            "id",
            postgresql_where=text(STATUS_CHANGE),
        ),
        # Every event by time (revision 0036), a BRIN index: the fine-tuning usage report reads a
        # window's status changes (`control_plane.job_usage`). Events are only appended, so the
        # time follows the table's order and a few pages summarize it; a B-tree would take an
        # entry at every claim and every finish.
        Index("ix_job_events_created_brin", "created_at", postgresql_using="brin"),
        # A job's evaluations (revision 0040): a comparison of jobs reads each one's lowest.
        Index("ix_job_events_evaluations", "job_id", postgresql_where=text(EVALUATION)),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    created_at: Mapped[datetime] = _now()
    level: Mapped[str] = mapped_column(String(8), nullable=False, server_default="info")
    type: Mapped[str] = mapped_column(String(16), nullable=False, server_default="message")
    message: Mapped[str] = mapped_column(Text, nullable=False)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class JobMetricRollup(Base):
    """A job's train and eval points summed per bucket of `width` steps (2 .. 65,536), kept by
    revision 0015's trigger on metric events: a loss chart reads a thousand of these, not
    every event of a long run."""

    __tablename__ = "job_metric_rollups"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    width: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    first_step: Mapped[float] = mapped_column(Float, nullable=False)
    last_step: Mapped[float] = mapped_column(Float, nullable=False)
    train_points: Mapped[int] = mapped_column(Integer, nullable=False)
    train_steps: Mapped[float] = mapped_column(Float, nullable=False)
    train_losses: Mapped[float] = mapped_column(Float, nullable=False)
    eval_points: Mapped[int] = mapped_column(Integer, nullable=False)
    eval_steps: Mapped[float] = mapped_column(Float, nullable=False)
    eval_losses: Mapped[float] = mapped_column(Float, nullable=False)


class JobCheckpoint(Base):
    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)
    step: Mapped[int] = mapped_column(Integer, nullable=False)
    object_prefix: Mapped[str] = mapped_column(Text, nullable=False)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()


# --------------------------------------------------------------------------- adapter registry


class Adapter(Base):
    """A named line of versions, per tenant, bound to one base model.

    `next_version` hands out version numbers: one `UPDATE ... RETURNING` per publish, so
    concurrent publishes never share a number (a failed publish leaves a gap).
    """

    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        Index("ix_adapters_tenant_id_base_model_id", "tenant_id", "base_model_id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128), nullable=False)
    base_model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"), nullable=False)
    next_version: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    created_at: Mapped[datetime] = _now()


class AdapterVersion(Base):
    """One immutable, published adapter version: its files, their sha256, and its lineage.

    `job_id` is unique (a job publishes at most one version) but deliberately not a foreign
    key: a version outlives its job row, and rebuilding the registry from the manifests in the
    bucket must not depend on the jobs table.
    """

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "number"), UniqueConstraint("job_id"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False
    )
    number: Mapped[int] = mapped_column(Integer, nullable=False)
    job_id: Mapped[str | None] = mapped_column(String(64))
    parent_version_id: Mapped[str | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    files: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    object_prefix: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _now()


class AdapterAlias(Base):
    """A movable name (`prod`, `staging`, ...) pointing at one version of its adapter.

    RESTRICT on the version: a version cannot be deleted while an alias points at it.
    """

    __tablename__ = "adapter_aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False
    )
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    version_id: Mapped[str] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    updated_by: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = _now()


class AliasEvent(Base):
    """History of an alias: every set, move and delete, with who did it and when.

    Versions are recorded by number, not by id, so the history still reads after a version
    is deleted; `to_version` is None when the alias was deleted.
    """

    __tablename__ = "alias_events"
    __table_args__ = (Index("ix_alias_events_adapter_alias_id", "adapter_id", "alias", "id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    adapter_id: Mapped[str] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), nullable=False
    )
    alias: Mapped[str] = mapped_column(String(64), nullable=False)
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    actor_key_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = _now()


class Trainer(Base):
    """A trainer process as it last reported itself (upserted on every heartbeat, idle or busy);
    one silent for longer than a lease is gone."""

    __tablename__ = "trainers"
    __table_args__ = (CheckConstraint("kind IN ('trainer', 'interactive')", name="kind"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # `trainer`: takes jobs from the queue; `interactive`: runs interactive sessions' calls on
    # its resident base (revision 0023). Only trainers count for the queue and readiness.
    kind: Mapped[str] = mapped_column(String(16), nullable=False, server_default="trainer")
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    device: Mapped[str] = mapped_column(String(64), nullable=False)
    resident_base: Mapped[str | None] = mapped_column(String(255))
    current_job_id: Mapped[str | None] = mapped_column(String(64))
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    step_seconds: Mapped[float | None] = mapped_column(Float)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Counters since the trainer started (Prometheus counters, one series per trainer): jobs
    # claimed, ended succeeded / failed / let go (cancelled, handed back, lease lost), tokens.
    claims: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    succeeded: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    failed: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    let_go: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    tokens_trained: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    started_at: Mapped[datetime] = _now()
    last_heartbeat_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), index=True
    )


# --------------------------------------------------------------------------- queue bookkeeping

# How `queue_heads` rows are ranked: the claim's order, one row per (tenant, base) line.
# A line the claim may walk: something queued, its tenant under its running limit.
_CLAIMABLE_LINE = text("queued > 0 AND NOT saturated")
_QUEUE_FRONT = (
    text("top_priority DESC"),
    "running",
    text("last_served_at NULLS FIRST"),
    "head_created_at",
    "head_id",
)


class TenantQueueStats(Base):
    """A tenant's jobs counted by status from `queued` on, its leases lost, and when the queue
    last served it, so that neither the claim, nor the dashboard, nor a metrics scrape counts
    jobs. Kept exact by triggers on `jobs` (revisions 0006 and 0009) in the statement that moves
    a job; the claim's lock on this row serialises one tenant's claims. `running` counts every
    job holding a lease (`running` and `cancelling`), as the claim's limit does; `cancelling`
    those winding down. Jobs still validating are not kept here (creating one writes no row)."""

    __tablename__ = "tenant_queue_stats"

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    queued: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    running: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_served_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    succeeded: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    cancelled: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    interruptions: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")


class QueueHead(Base):
    """One line of the queue, (tenant, base model): its queued count and its head (the best
    queued job by priority, age, id, backing off or not), beside copies of the tenant's running
    count and served time, so one index walks the lines in the claim's order. Kept by the same
    triggers as `TenantQueueStats`. `max_running` is the tenant's running limit (its own, or
    the default of `QueueSettings`) and `saturated` says the tenant is at it (revision 0013):
    such a line is out of both front indexes, so no walk reads a line it must skip."""

    __tablename__ = "queue_heads"
    __table_args__ = (
        Index("ix_queue_heads_front", *_QUEUE_FRONT, postgresql_where=_CLAIMABLE_LINE),
        Index(
            "ix_queue_heads_base_front",
            "base_model_id",
            *_QUEUE_FRONT,
            postgresql_where=_CLAIMABLE_LINE,
        ),
    )

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    base_model_id: Mapped[str] = mapped_column(
        ForeignKey("base_models.id", ondelete="CASCADE"), primary_key=True
    )
    queued: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    top_priority: Mapped[int | None] = mapped_column(Integer)
    head_created_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    head_id: Mapped[str | None] = mapped_column(String(64))
    running: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    last_served_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    max_running: Mapped[int] = mapped_column(Integer, nullable=False)
    saturated: Mapped[bool] = mapped_column(
        Boolean, Computed("running >= max_running", persisted=True), nullable=False
    )


class QueueSettings(Base):
    """The default running limit that `queue_heads` flags its lines against (one row): the
    claimers' setting, which a claim with another default sets first (`JobQueue.claim`)."""

    __tablename__ = "queue_settings"
    __table_args__ = (
        CheckConstraint("id = 1", name="one_row"),
        CheckConstraint("default_max_running >= 1", name="default_max_running"),
    )

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="1")
    default_max_running: Mapped[int] = mapped_column(Integer, nullable=False)


class QueueReaps(Base):
    """When a trainer last reaped expired leases (one row): a trainer's claim reaps only when
    that is a reap interval ago, and stamps it (`JobQueue.reap_if_due`)."""

    __tablename__ = "queue_reaps"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="1")
    reaped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class QueueDuePasses(Base):
    """Where revision 0018's `queue_wake_due` last ended its window (one row): each pass wakes a
    trainer for the jobs that backed off and came due after it (`control_plane.wakeups`)."""

    __tablename__ = "queue_due_passes"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default="1")
    passed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class QueueSleeper(Base):
    """An idle trainer, asleep on its own channel until a queued job wakes it: revision 0017's
    `queue_wake` takes one row out per job (`control_plane.wakeups`)."""

    __tablename__ = "queue_sleepers"
    __table_args__ = (
        Index("ix_queue_sleepers_base", "resident_base_id", "since"),
        Index("ix_queue_sleepers_since", "since"),
    )

    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    channel: Mapped[str] = mapped_column(String(63), nullable=False)
    resident_base_id: Mapped[str | None] = mapped_column(String(64))
    since: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=text("clock_timestamp()")
    )
    stale_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ServingGeneration(Base):
    """How many times what a serving index of this (tenant, base model) can hold has changed
    (a version published or deleted, an alias set, moved or deleted, an adapter deleted or
    moved), counted by revision 0014's triggers: the serving index's ETag, read in one row. No
    foreign keys (a tenant's deletion counts here as it cascades)."""

    __tablename__ = "serving_generations"

    tenant_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    base_model_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(BigInteger, nullable=False)


class WebhookEndpoint(Base):
    """Where a tenant's events are posted (revision 0022): its URL, the secret its deliveries are
    signed with (Standard Webhooks: the platform signs with it, so it is kept, and shown once),
    and the event types it takes (none: every one). Deleting one disables it (`disabled_at`):
    its delivery log stays readable."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        # What each finished job's trigger probes: the tenant's live endpoints.
        Index(
            "ix_webhook_endpoints_live", "tenant_id", postgresql_where=text("disabled_at IS NULL")
        ),
        Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    url: Mapped[str] = mapped_column(Text, nullable=False)
    secret: Mapped[str] = mapped_column(Text, nullable=False)
    event_types: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    description: Mapped[str] = mapped_column(String(256), nullable=False, server_default="")
    created_at: Mapped[datetime] = _now()
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The secret a rotation replaced: deliveries carry its signature too until then.
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookDelivery(Base):
    """One event for one endpoint: the outbox row written with the change that made the event
    (revision 0022's triggers), then its delivery log. `id` is the `webhook-id` header, the same
    on every attempt, so a receiver drops a repeat; `event_id` is the event's, shared by every
    endpoint it went to."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="status"),
        # The deliverer's pass: pending deliveries by when they are due.
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False
    )
    event_id: Mapped[str] = mapped_column(String(64), nullable=False)
    event_type: Mapped[str] = mapped_column(String(64), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    next_attempt_at: Mapped[datetime] = _now()
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class InteractiveSession(Base):
    """A tenant's Tinker-compatible session (revision 0023): the models it creates and the
    calls on them are its own. The SDK heartbeats it while its process lives."""

    __tablename__ = "interactive_sessions"
    __table_args__ = (
        Index("ix_interactive_sessions_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    created_at: Mapped[datetime] = _now()
    last_heartbeat_at: Mapped[datetime] = _now()
    tags: Mapped[list[Any]] = mapped_column(JSONB, nullable=False, server_default="[]")
    user_metadata: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default="{}"
    )
    sdk_version: Mapped[str | None] = mapped_column(String(64))
    # What the SDK named it, and when and why its client said it was done (revision 0038): the
    # session search's filters and its status.
    display_name: Mapped[str | None] = mapped_column(String(200))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    finish_detail: Mapped[str | None] = mapped_column(Text)


class InteractiveModel(Base):
    """A LoRA model of a session on a resident base (`training`: trained call by call), or a
    `sampler` (a saved adapter, or the base alone, that only samples). Its calls run in `seq`
    order (`next_seq` hands them out) on the one executor holding its weights (`held_by`)."""

    __tablename__ = "interactive_models"
    __table_args__ = (
        CheckConstraint("kind IN ('training', 'sampler')", name="kind"),
        Index("ix_interactive_models_session", "session_id"),
        Index(
            "ix_interactive_models_held_by", "held_by", postgresql_where=text("held_by IS NOT NULL")
        ),
        # A tenant's training runs, oldest first (the SDK's `list_training_runs`).
        Index(
            "ix_interactive_models_tenant_runs",
            "tenant_id",
            "created_at",
            "id",
            postgresql_where=text("kind = 'training'"),
        ),
        # A tenant's loaded training models (its cap counts them).
        Index(
            "ix_interactive_models_tenant_loaded",
            "tenant_id",
            postgresql_where=text("kind = 'training' AND unloaded_at IS NULL"),
        ),
        # The models holding a version's weights (a version's deletion sets them null).
        Index(
            "ix_interactive_models_weights_version",
            "weights_version_id",
            postgresql_where=text("weights_version_id IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        ForeignKey("interactive_sessions.id", ondelete="CASCADE"), nullable=False
    )
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    base_model_id: Mapped[str] = mapped_column(ForeignKey("base_models.id"), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    lora_config: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    model_path: Mapped[str | None] = mapped_column(Text)
    # The registry's adapter version whose weights the model last loaded (revision 0041;
    # `control_plane.session_weights`): what a version published from its saves descends from.
    weights_version_id: Mapped[str | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    next_seq: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # A sampler's next clone number for a client that joins it (`join_sampling_session`; the
    # client that created it is 0), revision 0032.
    next_clone: Mapped[int] = mapped_column(Integer, nullable=False, server_default="1")
    held_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now()
    unloaded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    user_metadata: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default="{}"
    )


class InteractiveTurn(Base):
    """When an executor last took one of a tenant's calls on a base: the claim serves the
    tenant whose turn is oldest first."""

    __tablename__ = "interactive_turns"

    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    base_model_id: Mapped[str] = mapped_column(
        ForeignKey("base_models.id", ondelete="CASCADE"), primary_key=True
    )
    served_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class InteractiveCall(Base):
    """One call on an interactive model, the future the SDK polls: `(model_id, seq)` is its
    place in the model's order, `request` what the executor needs, `result` or `error` (`{"error",
    "category": "user" | "server"}`) what it answered, `metrics` what of it is kept for good."""

    __tablename__ = "interactive_calls"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'running', 'completed', 'failed')", name="status"),
        UniqueConstraint("model_id", "seq", name="uq_interactive_calls_model_seq"),
        # A base's pending calls, oldest first (the metrics' backlog).
        Index(
            "ix_interactive_calls_pending",
            "base_model_id",
            "created_at",
            postgresql_where=text("status = 'pending'"),
        ),
        # The claim's skip scan: each model's first unfinished call on a base.
        Index(
            "ix_interactive_calls_unfinished",
            "base_model_id",
            "model_id",
            "seq",
            postgresql_where=text("status IN ('pending', 'running')"),
        ),
        # The retention pass: finished calls whose payload is still kept, oldest first.
        Index(
            "ix_interactive_calls_payload_kept",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL AND payload_dropped_at IS NULL"),
        ),
        # A tenant's metered calls by when they finished (the usage report, revision 0035).
        Index(
            "ix_interactive_calls_tenant_usage",
            "tenant_id",
            "finished_at",
            postgresql_where=text("usage IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(
        ForeignKey("interactive_models.id", ondelete="CASCADE"), nullable=False
    )
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    base_model_id: Mapped[str] = mapped_column(String(64), nullable=False)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    request: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When its request and answer were let go (`interactive_calls.forget_payloads`).
    payload_dropped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A forward_backward's, forward's or optim_step's `result["metrics"]` (`loss:sum`,
    # `grad_norm:mean`), kept when the answer is let go: the model's curves (revision 0029).
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # The SDK's own `seq_id` for the call, where it sent one (revision 0031): a sampling
    # client's clone is `client_seq // 10^9`, whose completions `retrieve_futures` reports.
    client_seq: Mapped[int | None] = mapped_column(BigInteger)
    # What a completed call used, metered when it was answered and kept when its payload is let
    # go (`control_plane.usage`, revision 0035): `{"training_tokens"}`, `{"prefill_tokens",
    # "sampled_tokens"}` or `{"checkpoints"}`.
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # A streamed chat's text so far while the executor samples it (`{"texts": [...]}`, one a
    # choice; revision 0042); null once it finishes and for every other call.
    partial: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    # When a streamed chat's client left: its executor stops sampling it (revision 0042).
    stream_left_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class InteractiveCustomLoss(Base):
    """A loss function a session uploaded (`create_custom_loss`, revision 0034): the graph the
    SDK traced, as data (`control_plane.loss_graphs` checks it), which the executor runs in the
    session's `forward_backward` calls that name it (`loss_fn: custom`). `seq` is the SDK's
    `custom_loss_seq_id`: a request sent again finds the loss it made."""

    __tablename__ = "interactive_custom_losses"
    __table_args__ = (
        UniqueConstraint("session_id", "seq", name="uq_interactive_custom_losses_seq"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(
        ForeignKey("interactive_sessions.id", ondelete="CASCADE"), nullable=False
    )
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    inputs: Mapped[list[Any]] = mapped_column(JSONB, nullable=False)
    graph: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _now()


class InteractiveCheckpoint(Base):
    """Weights an interactive model saved (`sampler`: an adapter to sample from or publish;
    `state`: adapter and optimizer, to resume; `external`: an adapter for use outside the
    platform, to download), under `storage_prefix` in the object store and named to the SDK by
    `path` (`tinker://<model>/<weights|sampler_weights|external_weights>/<name>`)."""

    __tablename__ = "interactive_checkpoints"
    __table_args__ = (
        CheckConstraint("kind IN ('sampler', 'state', 'external')", name="kind"),
        UniqueConstraint("model_id", "kind", "name", name="uq_interactive_checkpoints_name"),
        UniqueConstraint("path", name="uq_interactive_checkpoints_path"),
        Index("ix_interactive_checkpoints_tenant_created", "tenant_id", "created_at", "id"),
        # A tenant's stored bytes, summed by an index-only scan (revision 0028).
        Index(
            "ix_interactive_checkpoints_tenant_size", "tenant_id", postgresql_include=["size_bytes"]
        ),
        # The expiry pass reads only the checkpoints that expire.
        Index(
            "ix_interactive_checkpoints_expires",
            "expires_at",
            postgresql_where=text("expires_at IS NOT NULL"),
        ),
        # The saves made from a version's weights (a version's deletion sets them null).
        Index(
            "ix_interactive_checkpoints_from_version",
            "from_version_id",
            postgresql_where=text("from_version_id IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(
        ForeignKey("interactive_models.id", ondelete="CASCADE"), nullable=False
    )
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    storage_prefix: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _now()
    # The adapter version it was published as (at most one; a deleted version frees it).
    published_version_id: Mapped[str | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    # The adapter version its model's weights were loaded from at the save (revision 0041): the
    # parent of a version published from it.
    from_version_id: Mapped[str | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="SET NULL")
    )
    # The bytes the save wrote, and when the platform deletes it (null: never).
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Each file it wrote, by its name under the prefix: {"size": bytes, "sha256": hex} (revision
    # 0030; null before).
    files: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    user_metadata: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default="{}"
    )
    # Published by its owner (revision 0037): every tenant may load it, sample from it and
    # download its export; only the owner changes or deletes it.
    public: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default="false")


class AuditEvent(Base):
    """An entry of a tenant's audit log (revision 0039, `control_plane.audit`): what was done to
    its checkpoints, keys and limits, and who read its checkpoints, by whom."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_tenant_created", "tenant_id", "created_at", "id"),
        # The retention pass reads the oldest entries of every tenant: the table only grows at
        # its end, so a BRIN index on the time is a few pages.
        Index("ix_audit_events_created_brin", "created_at", postgresql_using="brin"),
        # An event recorded at most once (a key's reads of a checkpoint for a purpose, an hour).
        Index(
            "uq_audit_events_once",
            "tenant_id",
            "once",
            unique=True,
            postgresql_where=text("once IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    created_at: Mapped[datetime] = _now()
    event: Mapped[str] = mapped_column(String(64), nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default="{}")
    once: Mapped[str | None] = mapped_column(Text)


class Batch(Base):
    """A batch of chat or text completions (OpenAI's Batch API, revision 0043,
    `control_plane.batches`): its input file's requests run by the interactive executors a few
    at a time, their answers written to an output file and an error file once all are over."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_tenant_created", "tenant_id", "created_at", "id"),
        # The runner's pass reads only the batches it still moves.
        Index(
            "ix_batches_moving",
            "created_at",
            postgresql_where=text("status IN ('in_progress', 'cancelling')"),
        ),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False
    )
    # The key that created it: the reader an adapter's owner's audit log names.
    created_by: Mapped[str] = mapped_column(String(64), nullable=False)
    endpoint: Mapped[str] = mapped_column(String(64), nullable=False)
    input_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"), nullable=False)
    completion_window: Mapped[str] = mapped_column(String(16), nullable=False)
    model: Mapped[str] = mapped_column(String(255), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    batch_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)
    output_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    error_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    total: Mapped[int] = mapped_column(Integer, nullable=False)
    completed: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_at: Mapped[datetime] = _now()
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BatchRequest(Base):
    """One line of a batch's input file: `pending` (not asked yet), `asked` (its calls in
    `calls`, `[[call_id, sampler_id], ...]`), then `done` (`response` its answer) or `failed`
    (`response` a refusal's, or `error` why it never ran)."""

    __tablename__ = "batch_requests"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id", name="uq_batch_requests_custom_id"),
        # A pass reads a batch's unfinished lines in order.
        Index(
            "ix_batch_requests_unfinished",
            "batch_id",
            "line",
            postgresql_where=text("status IN ('pending', 'asked')"),
        ),
    )

    batch_id: Mapped[str] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(Text, nullable=False)
    body: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, server_default="pending")
    calls: Mapped[list[Any] | None] = mapped_column(JSONB)
    # How many times it was asked: the platform's failures (an executor lost) ask it again.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
