"""GET /v1/fine_tuning/jobs/{id}/events/stream: a job's events as Server-Sent Events for API
clients, over a real socket; streams poll with short checkouts, so open streams never take
the connections other requests need."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.api.app import create_app
from control_plane.events import add_event
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore
from tests.api_harness import TenantKeys, serve
from tests.factories import enqueue_jobs, make_base, make_file


def read_events(
    response: httpx.Response, until: str
) -> list[tuple[str, dict[str, Any], str | None]]:
    """(event, data, id) of each message until one named `until` (inclusive)."""
    found: list[tuple[str, dict[str, Any], str | None]] = []
    event, data, ident = "message", "", None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line.startswith("id: "):
            ident = line[4:]
        elif line == "" and data:
            found.append((event, json.loads(data), ident))
            if event == until:
                return found
            event, data, ident = "message", "", None
    return found


@pytest.fixture
def job_id(services: Services, tenant_a: TenantKeys) -> str:
    base = make_base(services.engine, "tiny-llama")
    (job,) = enqueue_jobs(
        services.engine,
        tenant_a.tenant_id,
        base.id,
        make_file(services.engine, tenant_a.tenant_id).id,
        1,
    )
    with services.engine.begin() as conn:
        for step in (1, 2):
            add_event(
                conn,
                job,
                f"step {step}",
                type="metrics",
                data={"step": step, "train_loss": 1.0 / step},
            )
    return job


def test_the_stream_sends_each_event_then_status_and_ends_when_the_job_is_over(
    live_url: str, services: Services, tenant_a: TenantKeys, job_id: str
) -> None:
    url = f"{live_url}/v1/fine_tuning/jobs/{job_id}/events/stream"
    with httpx.stream("GET", url, headers=tenant_a.headers(), timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        threading.Timer(1.5, services.queue.request_cancel, args=(job_id,)).start()
        messages = read_events(response, until="done")
    events = [data for name, data, _ in messages if name == "event"]
    assert [e["message"] for e in events] == ["step 1", "step 2", "Job cancelled"]
    assert [ident for name, _, ident in messages if name == "event"] == [e["id"] for e in events]
    assert messages[-1][0] == "done" and messages[-1][1]["status"] == "cancelled"

    # Resuming after the second event sends only what came after it.
    second = events[1]["id"]
    with httpx.stream(
        "GET", url, headers={**tenant_a.headers(), "Last-Event-ID": second}, timeout=30
    ) as response:
        resumed = read_events(response, until="done")
    assert [d["message"] for n, d, _ in resumed if n == "event"] == ["Job cancelled"]


def test_the_stream_needs_a_key_and_the_callers_own_job(
    live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, job_id: str
) -> None:
    url = f"{live_url}/v1/fine_tuning/jobs/{job_id}/events/stream"
    assert httpx.get(url).status_code == 401
    refused = httpx.get(url, headers=tenant_b.headers())
    assert refused.status_code == 404
    assert refused.json()["error"]["code"] == "fine_tuning_job_not_found"


def test_open_streams_hold_no_pooled_connection(
    services: Services,
    settings: Settings,
    database_url: str,
    tmp_path: Path,
    tenant_a: TenantKeys,
    job_id: str,
) -> None:
    """Eight streams open on an API whose main pool has two connections: requests still
    get one at once."""
    tight = build_services(
        settings.model_copy(
            update={"db_pool_size": 2, "db_pool_overflow": 0, "db_pool_timeout_seconds": 2}
        ),
        database_url=database_url,
        store=LocalObjectStore(tmp_path / "objects"),
    )
    try:
        with serve(create_app(tight)) as url, httpx.Client(timeout=10) as client:
            streams = [
                client.stream(
                    "GET",
                    f"{url}/v1/fine_tuning/jobs/{job_id}/events/stream",
                    headers=tenant_a.headers(),
                )
                for _ in range(8)
            ]
            opened = [s.__enter__() for s in streams]
            try:
                for response in opened:
                    assert response.status_code == 200
                for _ in range(5):
                    listed = client.get(f"{url}/v1/fine_tuning/jobs", headers=tenant_a.headers())
                    assert listed.status_code == 200
            finally:
                for stream in streams:
                    stream.__exit__(None, None, None)
    finally:
        tight.close()
