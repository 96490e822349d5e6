"""Celery: dataset validation before a job is queued, and queue maintenance.

Broker: `LORAFORGE_BROKER_URL` (Redis on a cluster) when set; otherwise kombu's SQLAlchemy
transport over loraforge's own PostgreSQL, so the embedded default needs no second server (its
cost is polling: up to 1 s before a task starts; kombu passes this transport's options to
`create_engine`, so its polling interval is not configurable from celery). The celery app object exists at import
time (the `celery -A control_plane.tasks` CLI needs it); its configuration and the services it
uses are built lazily from `Settings`.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from celery import Celery

from control_plane import base_models, datasets, db
from control_plane import files as file_repo
from control_plane.jobs import get_job_unscoped
from control_plane.queue import JobStateError
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import ObjectStoreError

log = logging.getLogger(__name__)

celery_app = Celery("loraforge")
celery_app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "reap-expired-leases": {"task": "loraforge.reap_expired_leases", "schedule": 15.0},
        "redispatch-validation": {"task": "loraforge.redispatch_validation", "schedule": 60.0},
    },
)

_services_lock = threading.Lock()
_services: Services | None = None


def broker_url_for(settings: Settings, database_url: str) -> str:
    if settings.broker_url:
        return settings.broker_url
    return "sqla+" + database_url


def broker_url_from_environment() -> str | None:
    """The broker a `celery -A control_plane.tasks worker` process must use, from `LORAFORGE_*`
    (the broker URL, or the database it shares); None when neither is set."""
    settings = Settings()
    if settings.broker_url:
        return settings.broker_url
    if settings.database_url:
        return broker_url_for(settings, db.normalize_url(settings.database_url))
    return None


# A worker started by the celery CLI connects before any task runs: point it at loraforge's
# broker now, not only when the first task builds the services (celery's default is amqp://).
celery_app.conf.broker_url = broker_url_from_environment()


def configure(services: Services, *, broker_url: str | None = None) -> Celery:
    """Bind the celery app to these services (API process, embedded `up`, tests)."""
    global _services
    with _services_lock:
        _services = services
    celery_app.conf.broker_url = broker_url or broker_url_for(
        services.settings, services.database_url
    )
    services.dispatch_validation = dispatch_validation
    services.dispatch_base_import = dispatch_base_import
    return celery_app


def get_services() -> Services:
    """The services of this process; a bare `celery worker` builds them from the environment."""
    global _services
    with _services_lock:
        if _services is None:
            _services = build_services(Settings())
            celery_app.conf.broker_url = broker_url_for(_services.settings, _services.database_url)
        return _services


def dispatch_validation(job_id: str) -> None:
    validate_job_files.delay(job_id)


@celery_app.task(name="loraforge.validate_job_files")
def validate_job_files(job_id: str) -> str:
    return run_validation(get_services(), job_id)


def dispatch_base_import(base_id: str) -> None:
    import_base_model.delay(base_id)


@celery_app.task(name="loraforge.import_base_model")
def import_base_model(base_id: str) -> str:
    """Fetch, inspect or import a base registered over the API (see
    `workers.base_registration.import_registered_base`)."""
    from workers.base_registration import import_registered_base

    return import_registered_base(get_services(), base_id)


@celery_app.task(name="loraforge.reap_expired_leases")
def reap_expired_leases() -> int:
    return len(get_services().queue.reap_expired_leases())


@celery_app.task(name="loraforge.redispatch_validation")
def redispatch_validation() -> int:
    """Re-send validation for jobs stuck in `validating_files` (e.g. the broker was down)."""
    services = get_services()
    from sqlalchemy import text

    with services.engine.connect() as conn:
        stuck = (
            conn.execute(
                text(
                    "SELECT id FROM jobs WHERE status = 'validating_files' "
                    "AND created_at < now() - interval '2 minutes'"
                )
            )
            .scalars()
            .all()
        )
    for job_id in stuck:
        dispatch_validation(job_id)
    return len(stuck)


def run_validation(services: Services, job_id: str) -> str:
    """Validate a job's files; the job becomes `queued`, or `failed` with line and reason."""
    with services.engine.connect() as conn:
        job = get_job_unscoped(conn, job_id)
        if job is None or job.status != "validating_files":
            return "skipped"
        base = base_models.get_base_model(conn, job.base_model_id)
        wanted = [("training_file", job.training_file_id)]
        if job.validation_file_id:
            wanted.append(("validation_file", job.validation_file_id))
        records = [(param, file_repo.get_file_unscoped(conn, fid)) for param, fid in wanted]
    count_tokens = services.token_counter(base) if base is not None else None
    max_example_tokens = services.settings.max_example_tokens
    failure: tuple[str, str, str] | None = None
    for param, record in records:
        if record is None:
            failure = ("file_not_found", f"{param} no longer exists", param)
            break
        try:
            _validate_file(services, record, count_tokens, max_example_tokens)
        except datasets.DatasetError as exc:
            failure = (exc.code, f"{param} {record.id} ({record.filename}): {exc.message}", param)
            break
    if failure is not None:
        code, message, param = failure
        try:
            services.queue.mark_validation_failed(job_id, code=code, message=message, param=param)
        except JobStateError:
            return "skipped"
        return "failed"
    try:
        services.queue.mark_queued(job_id)
    except JobStateError:
        return "skipped"
    return "queued"


def _validate_file(
    services: Services, record: Any, count_tokens: Any, max_example_tokens: int
) -> datasets.DatasetStats:
    with tempfile.TemporaryDirectory(prefix="loraforge-validate-") as tmp:
        local = Path(tmp) / "data.jsonl"
        try:
            services.store.download_to(record.object_key, local, expected_sha256=record.sha256)
        except ObjectStoreError as exc:
            raise datasets.DatasetError("file_unreadable", str(exc)) from exc
        with local.open("rb") as fh:
            return datasets.validate_jsonl(
                fh,
                max_bytes=services.settings.max_upload_bytes,
                max_example_tokens=max_example_tokens,
                count_tokens=count_tokens,
            )
