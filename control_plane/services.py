"""The long-lived parts one process needs, built from `Settings` (never at import time)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine

from control_plane import db
from control_plane.queue import JobQueue
from control_plane.settings import Settings
from control_plane.storage import ObjectStore, make_object_store

ValidationDispatcher = Callable[[str], None]
ImportDispatcher = Callable[[str], None]


@dataclass
class Services:
    settings: Settings
    database_url: str
    engine: Engine
    # API keys are checked on their own small pool (see Settings.auth_pool_size).
    auth_engine: Engine
    queue: JobQueue
    store: ObjectStore
    # Starts dataset validation for a job (a celery task in production; see loraforge.tasks).
    dispatch_validation: ValidationDispatcher = field(default=lambda job_id: None)
    # Starts the import of a base model registered over the API (a celery task likewise).
    dispatch_base_import: ImportDispatcher = field(default=lambda base_id: None)

    def close(self) -> None:
        self.engine.dispose()
        self.auth_engine.dispose()


def build_object_store(settings: Settings) -> ObjectStore:
    return make_object_store(
        local_root=None if settings.s3_bucket else settings.object_store_root,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_bucket=settings.s3_bucket,
        s3_prefix=settings.s3_prefix,
        s3_region=settings.s3_region,
        s3_access_key_id=settings.s3_access_key_id,
        s3_secret_access_key=settings.s3_secret_access_key,
    )


def build_services(
    settings: Settings,
    *,
    database_url: str | None = None,
    store: ObjectStore | None = None,
    dispatch_validation: ValidationDispatcher | None = None,
) -> Services:
    url = database_url or db.resolve_database_url(settings)
    engine = db.make_engine(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        connect_timeout=settings.db_connect_timeout_seconds,
    )
    auth_engine = db.make_engine(
        url,
        pool_size=settings.auth_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout_seconds,
        connect_timeout=settings.db_connect_timeout_seconds,
    )
    queue = JobQueue(
        engine,
        lease_seconds=settings.lease_seconds,
        retry_backoff_seconds=settings.retry_backoff_seconds,
        max_running_per_tenant=settings.max_running_jobs_per_tenant,
        max_interruptions=settings.max_interruptions,
    )
    services = Services(
        settings=settings,
        database_url=url,
        engine=engine,
        auth_engine=auth_engine,
        queue=queue,
        store=store or build_object_store(settings),
    )
    if dispatch_validation is not None:
        services.dispatch_validation = dispatch_validation
    return services
