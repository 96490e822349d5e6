"""Celery: the background tasks (dataset validation, base import, queue maintenance).

Broker: `LORAFORGE_BROKER_URL` (Redis on a cluster) when set; otherwise kombu's SQLAlchemy
transport over loraforge's own PostgreSQL (`loraforge.broker`, which makes a database outage a
reconnect with backoff instead of a flood of tracebacks), so the embedded default needs no
second server (its cost is polling: up to 1 s before a task starts; kombu passes this
transport's options to `create_engine`, so its polling interval is not configurable from
celery). The celery app object exists at import
time (the `celery -A loraforge.tasks` CLI needs it); its configuration and the services it
uses are built lazily from `Settings`.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from control_plane import (
    audit,
    db,
    interactive_calls,
    interactive_health,
    interactive_runs,
    jobs,
    trainers,
    webhooks,
)
from control_plane.api import batch_runner
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.validation import run_validation
from control_plane.wakeups import WAKE_DUE_INTERVAL_S, wake_due
from control_plane.webhooks import WEBHOOK_PASS_INTERVAL_S
from loraforge import broker
from workers.bases.registration import import_registered_base

log = logging.getLogger(__name__)

broker.register()
# How often the interactive sessions' housekeeping runs: expired checkpoints deleted, finished
# calls' payloads let go.
INTERACTIVE_PASS_INTERVAL_S = 300.0
# How often the beat does an executor's idle pass for every base (what waits on a lost executor
# or a silent session is answered where no executor of its base runs any more).
INTERACTIVE_TIDY_INTERVAL_S = 60.0

# How often the beat starts the batches' runner, and how long one run steps them (woken by each
# call's finish) before the next: one worker's slot, while batches move.
BATCH_PASS_INTERVAL_S = 1.0
BATCH_RUN_SECONDS = 5.0

celery_app = Celery("loraforge")
celery_app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    # Through a broker outage of any length: celery backs off to a try every 30 s and carries
    # on when the broker is back (`up` or Kubernetes would restart a worker that gave up).
    broker_connection_max_retries=None,
    # A task running when the broker goes away is cancelled and handed back to the broker
    # (celery 6's default; every task here is idempotent), which also silences celery 5's
    # warning about it. Where the broker is the database, handing it back fails while the
    # database is away and the message is lost: the periodic tasks run again on schedule, a
    # validation is dispatched again by `redispatch_validation`, and an import left
    # `registering` past its timeout is registered again (the API allows it).
    worker_cancel_long_running_tasks_on_connection_loss=True,
    worker_hijack_root_logger=False,
    beat_schedule={
        "reap-expired-leases": {"task": "loraforge.reap_expired_leases", "schedule": 15.0},
        # Expiring unrun with the next one due: a busy worker runs one pass, not a backlog.
        "wake-due-jobs": {
            "task": "loraforge.wake_due_jobs",
            "schedule": WAKE_DUE_INTERVAL_S,
            "options": {"expires": WAKE_DUE_INTERVAL_S},
        },
        "redispatch-validation": {"task": "loraforge.redispatch_validation", "schedule": 60.0},
        "deliver-webhooks": {
            "task": "loraforge.deliver_webhooks",
            "schedule": WEBHOOK_PASS_INTERVAL_S,
            "options": {"expires": WEBHOOK_PASS_INTERVAL_S},
        },
        # A batch's requests asked and collected a window at a time (`api.batch_runner`).
        "run-batches": {
            "task": "loraforge.run_batches",
            "schedule": BATCH_PASS_INTERVAL_S,
            "options": {"expires": BATCH_PASS_INTERVAL_S},
        },
        "forget-gone-trainers": {"task": "loraforge.forget_gone_trainers", "schedule": 600.0},
        "forget-old-webhook-deliveries": {
            "task": "loraforge.forget_old_webhook_deliveries",
            "schedule": 3600.0,
        },
        "forget-old-audit-events": {
            "task": "loraforge.forget_old_audit_events",
            "schedule": 3600.0,
        },
        "forget-interactive-call-payloads": {
            "task": "loraforge.forget_interactive_call_payloads",
            "schedule": INTERACTIVE_PASS_INTERVAL_S,
            "options": {"expires": INTERACTIVE_PASS_INTERVAL_S},
        },
        "tidy-interactive-sessions": {
            "task": "loraforge.tidy_interactive_sessions",
            "schedule": INTERACTIVE_TIDY_INTERVAL_S,
            "options": {"expires": INTERACTIVE_TIDY_INTERVAL_S},
        },
        "expire-interactive-checkpoints": {
            "task": "loraforge.expire_interactive_checkpoints",
            "schedule": INTERACTIVE_PASS_INTERVAL_S,
            "options": {"expires": INTERACTIVE_PASS_INTERVAL_S},
        },
    },
)

_services_lock = threading.Lock()
_services: Services | None = None


def broker_url_for(settings: Settings, database_url: str) -> str:
    if settings.broker_url:
        return settings.broker_url
    return f"{broker.SCHEME}+{database_url}"


def broker_url_from_environment() -> str | None:
    """The broker a `celery -A loraforge.tasks worker` process must use, from `LORAFORGE_*`
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
    `workers.bases.registration.import_registered_base`)."""
    return import_registered_base(get_services(), base_id)


@celery_app.task(name="loraforge.reap_expired_leases")
def reap_expired_leases() -> int:
    return len(get_services().queue.reap_expired_leases())


@celery_app.task(name="loraforge.wake_due_jobs")
def wake_due_jobs() -> int:
    """Wake idle trainers for the jobs that backed off and came due (`control_plane.wakeups`)."""
    return wake_due(get_services().engine)


@celery_app.task(name="loraforge.deliver_webhooks")
def deliver_webhooks() -> int:
    """Post the webhook deliveries due (`control_plane.webhooks`); how many were delivered."""
    services = get_services()
    settings = services.settings
    return webhooks.deliver_due(
        services.engine,
        retry_schedule=settings.webhook_retry_schedule_seconds,
        timeout=settings.webhook_timeout_seconds,
        allow_private=settings.webhooks_may_post_privately,
    )


@celery_app.task(name="loraforge.run_batches")
def run_batches() -> int:
    """Step the batches still moving for up to BATCH_RUN_SECONDS
    (`control_plane.api.batch_runner`); how many steps."""
    return batch_runner.run_for(get_services(), BATCH_RUN_SECONDS)


@celery_app.task(name="loraforge.forget_old_webhook_deliveries")
def forget_old_webhook_deliveries() -> int:
    """Trim the webhook delivery log to `webhook_log_retention_days` (pending ones stay)."""
    services = get_services()
    return webhooks.forget_old_deliveries(
        services.engine, services.settings.webhook_log_retention_days
    )


@celery_app.task(name="loraforge.forget_old_audit_events")
def forget_old_audit_events() -> int:
    """Trim the tenants' audit logs to `audit_retention_days`."""
    services = get_services()
    return audit.forget_older_than(services.engine, services.settings.audit_retention_days)


@celery_app.task(name="loraforge.expire_interactive_checkpoints")
def expire_interactive_checkpoints() -> int:
    """Delete the interactive sessions' checkpoints past their time to live (files, then row)."""
    services = get_services()
    return interactive_runs.expire_checkpoints(services.engine, services.store)


@celery_app.task(name="loraforge.tidy_interactive_sessions")
def tidy_interactive_sessions() -> None:
    """Free lost executors' models, end silent sessions, fail what waits on unheld unloaded
    models: an executor's idle pass, for the bases whose executors are all gone."""
    services = get_services()
    settings = services.settings
    with services.engine.begin() as conn:
        interactive_health.tidy(
            conn, settings.lease_seconds, settings.interactive_session_timeout_seconds
        )


@celery_app.task(name="loraforge.forget_interactive_call_payloads")
def forget_interactive_call_payloads() -> int:
    """Let go of finished interactive calls' requests and answers past their retention."""
    services = get_services()
    return interactive_calls.forget_payloads(
        services.engine, services.settings.interactive_call_retention_seconds
    )


@celery_app.task(name="loraforge.redispatch_validation")
def redispatch_validation() -> int:
    """Re-send validation for jobs stuck in `validating_files` (e.g. the broker was down)."""
    services = get_services()
    with services.engine.connect() as conn:
        stuck = jobs.stuck_in_validation(conn, older_than_seconds=120)
    for job_id in stuck:
        dispatch_validation(job_id)
    return len(stuck)


# A trainer silent this long is not coming back under its id (a replacement takes a new one).
FORGET_TRAINERS_AFTER_S = 24 * 3600.0


@celery_app.task(name="loraforge.forget_gone_trainers")
def forget_gone_trainers() -> int:
    """Drop the trainer registry's rows of trainers silent for a day (shown as gone until then)."""
    with get_services().engine.begin() as conn:
        return trainers.forget_gone(conn, older_than_seconds=FORGET_TRAINERS_AFTER_S)
