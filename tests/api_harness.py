"""Fixtures that run the real API: services on the test database, a celery worker on a real
broker (kombu's SQLAlchemy transport on PostgreSQL, as in the embedded default), the app in
process (TestClient) and on a real socket (uvicorn) for the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from control_plane import db
from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore
from loraforge import tasks
from tests.factories import make_base, make_key, make_tenant


@pytest.fixture(scope="session")
def broker_url(pg_admin_url: str) -> str:
    """A database of its own for the celery broker, shared by the whole session (dropped with
    the session's other databases)."""
    from sqlalchemy.engine import make_url

    from tests.conftest import _create_database

    name = _create_database(pg_admin_url, "lf_broker")
    url = make_url(pg_admin_url).set(database=name).render_as_string(hide_password=False)
    return "sqla+" + db.normalize_url(url)


@pytest.fixture(scope="session")
def celery_worker(broker_url: str) -> Iterator[None]:
    from celery.contrib.testing.worker import start_worker

    tasks.celery_app.conf.broker_url = broker_url
    with start_worker(
        tasks.celery_app,
        pool="threads",
        concurrency=2,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=120,
    ):
        yield


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # tenant-a's admin is a platform operator (registers bases); tenant-b's is not.
    return Settings(
        home=tmp_path / "home",
        max_upload_bytes=1024 * 1024,
        lease_seconds=30,
        platform_operator_tenants=["default", "tenant-a"],
    )


@pytest.fixture
def services(
    settings: Settings, database_url: str, broker_url: str, celery_worker: None, tmp_path: Path
) -> Iterator[Services]:
    built = build_services(
        settings, database_url=database_url, store=LocalObjectStore(tmp_path / "objects")
    )
    tasks.configure(built, broker_url=broker_url)
    yield built
    built.close()


@pytest.fixture
def app(services: Services) -> FastAPI:
    return create_app(services)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


serve = serve_in_thread


@pytest.fixture
def live_url(app: FastAPI) -> Iterator[str]:
    """The app on a real socket, for clients that speak HTTP (openai, the CLI)."""
    with serve(app) as url:
        yield url


@dataclass(frozen=True)
class TenantKeys:
    tenant_id: str
    admin: str
    member: str
    reader: str

    def headers(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, role)}"}


def _tenant(engine: Engine, name: str) -> TenantKeys:
    tenant = make_tenant(engine, name)
    return TenantKeys(
        tenant_id=tenant.id,
        admin=make_key(engine, tenant.id, "admin"),
        member=make_key(engine, tenant.id, "member"),
        reader=make_key(engine, tenant.id, "reader"),
    )


@pytest.fixture
def tenant_a(services: Services) -> TenantKeys:
    return _tenant(services.engine, "tenant-a")


@pytest.fixture
def tenant_b(services: Services) -> TenantKeys:
    return _tenant(services.engine, "tenant-b")


@pytest.fixture
def base_name(services: Services) -> str:
    return make_base(services.engine, "tiny-llama").name
