"""The child processes `loraforge up` and `loraforge demo` start, started the same way.

The API tests run celery in-process; here the worker is the real `celery -A loraforge.tasks`
child with the environment the CLI gives it, so it must find loraforge's broker (kombu's
SQLAlchemy transport on the same PostgreSQL) and store by itself.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane import jobs
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from loraforge import tasks
from loraforge.embedded import celery_spec
from tests.factories import create_validating_job, make_base, make_tenant, upload_records

RECORDS = [{"prompt": f"{n} + 1 =", "completion": f" {n + 1}"} for n in range(5)]


@pytest.fixture
def child_services(database_url: str, tmp_path: Path) -> Iterator[Services]:
    # A store outside `home`: the child must be told where it is, not guess the default.
    settings = Settings(home=tmp_path / "home", local_store_dir=tmp_path / "elsewhere")
    services = build_services(settings, database_url=database_url)
    yield services
    services.close()


def test_celery_worker_child_validates_jobs_over_the_database_broker(
    child_services: Services,
) -> None:
    services = child_services
    tenant = make_tenant(services.engine, "acme")
    base = make_base(services.engine)
    file_id = upload_records(services, tenant.id, RECORDS)
    job_id = create_validating_job(services.engine, tenant.id, base.id, file_id)
    broker = tasks.broker_url_for(services.settings, services.database_url)
    spec = celery_spec(services.database_url, services.settings)
    child = subprocess.Popen(list(spec.argv), env=spec.env)
    try:
        with tasks.celery_app.connection_for_write(broker) as connection:
            tasks.validate_job_files.apply_async((job_id,), connection=connection)
        deadline = time.monotonic() + 90
        status = "validating_files"
        while status == "validating_files":
            assert child.poll() is None, "the celery worker exited"
            assert time.monotonic() < deadline, "the child never validated the job"
            time.sleep(0.5)
            with services.engine.connect() as conn:
                job = jobs.get_job_unscoped(conn, job_id)
            assert job is not None
            status = job.status
        assert status == "queued", job
    finally:
        child.terminate()
        child.wait(timeout=60)
