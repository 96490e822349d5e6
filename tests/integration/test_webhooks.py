"""Webhooks on a real PostgreSQL, posted over real HTTP to a receiver that verifies them with the
official `openai` SDK (Standard Webhooks signatures, as OpenAI's own webhooks are signed): every
way a job ends writes its event once, in the statement that ends it; each endpoint gets the
events it takes, signed, at least once, retried on the schedule and logged; refusals write
nothing."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from control_plane import registry
from control_plane.queue import JobQueue
from control_plane.services import Services
from control_plane.sweeps import cancel_matching
from control_plane.webhooks import MAX_ENDPOINTS_PER_TENANT, deliver_due, forget_old_deliveries
from loraforge import tasks
from tests.api_harness import TenantKeys
from tests.factories import (
    create_validating_job,
    enqueue_jobs,
    make_base,
    make_file,
    tag_jobs,
)
from tests.integration.test_metrics import scrape, value
from tests.integration.test_registry import claim_job, publish
from tests.integration.test_wakeups import _wait_for

FAST = [0.05, 0.05]


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every post (path, headers, body) and answers
    the next status of `answers` (200 once they run out)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    receiver.posts.append((self.path, dict(self.headers.items()), body))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"no" if status >= 300 else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def to(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for p, h, b in self.posts if p == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver()
    yield started
    started.server.shutdown()


def _register(client: TestClient, keys: TenantKeys, url: str, **body: Any) -> dict[str, Any]:
    answer = client.post("/v1/webhooks", json={"url": url, **body}, headers=keys.headers())
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _deliver(services: Services, schedule: list[float] = FAST, limit: int = 100) -> int:
    return deliver_due(
        services.engine, retry_schedule=schedule, timeout=5, allow_private=True, limit=limit
    )


def _events(engine: Engine) -> list[tuple[str, str, str]]:
    """(endpoint, event type, the payload's data.id) of every delivery written."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT endpoint_id, event_type, payload -> 'data' ->> 'id' "
                "FROM webhook_deliveries ORDER BY created_at, id"
            )
        )
        return [tuple(r) for r in rows]


def test_a_finished_job_and_its_version_reach_each_endpoint_that_takes_them_signed_once(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    receiver: Receiver,
    peft_adapter: Path,
) -> None:
    """tenant-a's endpoint for every event gets the job's `fine_tuning.job.succeeded` and the
    version's `adapter.version.created` (the job published with its adapter), each verified by
    `openai`'s `webhooks.unwrap` with the secret shown at create; its endpoint for failures
    only and tenant-b's endpoint get nothing; the log says what was sent; the celery task posts
    what is due."""
    every = _register(client, tenant_a, receiver.url + "/every", description="all")
    failures = _register(
        client, tenant_a, receiver.url + "/failures", event_types=["fine_tuning.job.failed"]
    )
    _register(client, tenant_b, receiver.url + "/b")
    assert every["secret"].startswith("whsec_") and every["event_types"] is None
    listed = client.get("/v1/webhooks", headers=tenant_a.headers()).json()["data"]
    assert [w["id"] for w in listed] == [every["id"], failures["id"]]
    assert all(w["secret"] is None for w in listed)  # shown once, at create

    base = make_base(services.engine, "tiny-llama")
    job = claim_job(services, tenant_a.tenant_id, base.id, adapter_name="bot")
    version = publish(services, job, peft_adapter).version
    assert _deliver(services) == 2
    assert receiver.to("/failures") == [] and receiver.to("/b") == []
    sdk = openai.OpenAI(api_key="unused", webhook_secret=every["secret"])
    received: dict[str, tuple[Any, str, Any]] = {}
    for headers, body in receiver.to("/every"):
        event = sdk.webhooks.unwrap(body, headers)
        received[event.type] = (event, headers["webhook-id"], json.loads(body))
    event, msg_id, body = received["fine_tuning.job.succeeded"]
    assert event.data.id == job.id and body["data"]["status"] == "succeeded"
    assert body["data"]["model"] == "tiny-llama" and body["object"] == "event"
    created = received["adapter.version.created"][2]["data"]
    assert (created["adapter"], created["version"], created["job_id"]) == ("bot", 1, job.id)
    assert created["id"] == version.id
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.unwrap(
            receiver.to("/every")[0][1].replace(b"succeeded", b"failed"),
            receiver.to("/every")[0][0],
        )

    log = client.get(f"/v1/webhooks/{every['id']}/deliveries", headers=tenant_a.headers())
    entries = {d["event_type"]: d for d in log.json()["data"]}
    succeeded = entries["fine_tuning.job.succeeded"]
    assert (succeeded["id"], succeeded["status"], succeeded["attempts"]) == (msg_id, "delivered", 1)
    assert succeeded["last_status_code"] == 200 and succeeded["payload"] == body
    assert _deliver(services) == 0  # nothing posted twice

    # The platform's own pass: celery's task, as beat runs it every 2 s.
    test = client.post(f"/v1/webhooks/{every['id']}/test", headers=tenant_a.headers()).json()
    tasks.deliver_webhooks.delay()
    _wait_for(lambda: len(receiver.to("/every")) == 3, "the celery task's delivery")
    headers, body = receiver.to("/every")[2]
    assert headers["webhook-id"] == test["id"] and json.loads(body)["type"] == "webhook.test"


def test_every_way_a_job_ends_writes_its_event_once_and_nothing_else_writes_one(
    services: Services, client: TestClient, tenant_a: TenantKeys, receiver: Receiver
) -> None:
    """Succeeded, failed (not retryable, and retryable once its attempts are spent), cancelled
    (queued, running through `cancelling`, by sweep), a dataset refused: one delivery each, of
    its status's type; a retry, a pause, a resume and a claim write none; an ending rolled
    back writes none."""
    engine = services.engine
    endpoint = _register(client, tenant_a, receiver.url + "/e")["id"]
    base_id = make_base(engine, "tiny-ends").id
    file_id = make_file(engine, tenant_a.tenant_id).id
    queue = JobQueue(engine, max_running_per_tenant=100, retry_backoff_seconds=0)
    enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 7, max_attempts=2)
    expected: dict[str, str] = {}

    def take() -> str:
        got = queue.claim("w")
        assert got is not None
        return got.id

    def queued() -> str:
        with engine.connect() as conn:
            return str(
                conn.execute(text("SELECT id FROM jobs WHERE status = 'queued' LIMIT 1")).scalar()
            )

    done = take()
    queue.complete(done, "w")
    expected[done] = "succeeded"
    bad = take()
    queue.fail(bad, "w", code="bad", message="bad data", retryable=False)
    expected[bad] = "failed"
    spent = take()
    queue.fail(spent, "w", code="oom", message="out of memory")  # retried: no event
    assert _events(engine) == [
        (endpoint, "fine_tuning.job.succeeded", done),
        (endpoint, "fine_tuning.job.failed", bad),
    ]
    assert take() == spent  # back first, its backoff 0
    queue.fail(spent, "w", code="oom", message="out of memory")  # attempts spent
    expected[spent] = "failed"
    waiting = queued()
    queue.request_cancel(waiting)  # queued: cancelled at once
    expected[waiting] = "cancelled"
    stopping = take()
    queue.request_cancel(stopping)  # running: cancelling, then its trainer stops
    assert len(_events(engine)) == 4
    queue.finish_cancelled(stopping, "w")
    expected[stopping] = "cancelled"
    swept = queued()
    queue.request_pause(swept)
    queue.resume(swept)
    tag_jobs(engine, {"sweep": "s"}, swept)
    cancel_matching(engine, tenant_a.tenant_id, {"sweep": "s"})
    expected[swept] = "cancelled"
    refused = create_validating_job(engine, tenant_a.tenant_id, base_id, file_id)
    queue.mark_validation_failed(refused, code="invalid_file", message="line 3: not JSON")
    expected[refused] = "failed"
    with engine.connect() as conn:  # an ending rolled back
        conn.execute(text("UPDATE jobs SET status = 'succeeded' WHERE id = :id"), {"id": queued()})
        conn.rollback()

    with engine.begin() as conn:  # a status written again unchanged is no new ending
        conn.execute(text("UPDATE jobs SET status = status"))
    written = _events(engine)
    assert sorted(written) == sorted(
        (endpoint, f"fine_tuning.job.{status}", job_id) for job_id, status in expected.items()
    )
    assert _deliver(services) == len(expected)
    assert sorted(json.loads(b)["data"]["id"] for _, b in receiver.to("/e")) == sorted(expected)


def test_a_failing_endpoint_is_tried_on_schedule_then_failed_and_retried_on_request(
    services: Services, client: TestClient, tenant_a: TenantKeys, receiver: Receiver
) -> None:
    """500 and 503 then 200: delivered at the third attempt, the same `webhook-id` each time,
    not before each delay is over; an endpoint that keeps failing is marked failed after the
    schedule, with the last answer; retried on request, it is delivered; a refused connection
    is an attempt like any other; two deliverers at once post each delivery once."""
    engine = services.engine
    endpoint = _register(client, tenant_a, receiver.url + "/flaky")["id"]
    base_id = make_base(engine, "tiny-retry").id
    file_id = make_file(engine, tenant_a.tenant_id).id
    queue = JobQueue(engine, max_running_per_tenant=100)
    [job] = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 1)
    receiver.answers = [500, 503]
    queue.request_cancel(job)
    # The first delay outlasts the next pass, whatever a busy machine makes it wait.
    schedule = [2.0, 0.3]
    assert _deliver(services, schedule) == 0
    assert _deliver(services, schedule) == 0  # the next attempt is not due yet
    assert len(receiver.to("/flaky")) == 1
    _posted_until(services, schedule, receiver, "/flaky", 3)
    ids = {h["webhook-id"] for h, _ in receiver.to("/flaky")}
    assert len(receiver.to("/flaky")) == 3 and len(ids) == 1
    [entry] = client.get(f"/v1/webhooks/{endpoint}/deliveries", headers=tenant_a.headers()).json()[
        "data"
    ]
    assert (entry["status"], entry["attempts"], entry["last_status_code"]) == ("delivered", 3, 200)

    receiver.answers = [500] * 3
    [job] = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 1)
    queue.request_cancel(job)
    _posted_until(services, schedule, receiver, "/flaky", 6)
    failed = client.get(f"/v1/webhooks/{endpoint}/deliveries", headers=tenant_a.headers())
    newest = failed.json()["data"][0]
    assert (newest["status"], newest["attempts"]) == ("failed", 3)
    assert newest["last_error"] == "HTTP 500: no" and newest["next_attempt_at"] is None
    assert _deliver(services, schedule) == 0  # failed: not tried again by itself
    retried = client.post(
        f"/v1/webhooks/{endpoint}/deliveries/{newest['id']}/retry", headers=tenant_a.headers()
    )
    assert retried.json()["status"] == "pending"
    assert _deliver(services, schedule) == 1
    again = client.post(
        f"/v1/webhooks/{endpoint}/deliveries/{newest['id']}/retry", headers=tenant_a.headers()
    )
    assert (again.status_code, again.json()["error"]["code"]) == (409, "delivery_not_failed")

    closed = _register(client, tenant_a, "http://127.0.0.1:9/nobody")["id"]
    client.post(f"/v1/webhooks/{closed}/test", headers=tenant_a.headers())
    _deliver(services, schedule)
    [attempt] = client.get(f"/v1/webhooks/{closed}/deliveries", headers=tenant_a.headers()).json()[
        "data"
    ]
    assert attempt["status"] == "pending" and attempt["attempts"] == 1
    assert attempt["last_error"].startswith("ConnectError")

    for _ in range(60):
        client.post(f"/v1/webhooks/{endpoint}/test", headers=tenant_a.headers())
    before = len(receiver.to("/flaky"))

    def deliverer() -> None:
        while _deliver(services, schedule, limit=2):
            pass

    passes = [threading.Thread(target=deliverer) for _ in range(4)]
    for t in passes:
        t.start()
    for t in passes:
        t.join()
    posted = [h["webhook-id"] for h, _ in receiver.to("/flaky")[before:]]
    assert len(posted) == len(set(posted)) == 60


def test_webhook_requests_are_refused_with_a_reason_and_write_nothing(
    services: Services,
    client: TestClient,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = services.engine
    mine = _register(client, tenant_a, receiver.url + "/mine")
    before = _rows(engine)
    monkeypatch.setattr(services.settings, "webhook_allow_private_urls", False)
    for body, status, code, param in (
        ({"url": "ftp://example.com/x"}, 400, "unsafe_webhook_url", "url"),
        ({"url": "/relative"}, 400, "unsafe_webhook_url", "url"),
        ({"url": "http://user:pw@example.com/"}, 400, "unsafe_webhook_url", "url"),
        ({"url": receiver.url + "/x"}, 400, "unsafe_webhook_url", "url"),  # loopback
        ({"url": "http://169.254.169.254/latest"}, 400, "unsafe_webhook_url", "url"),
        ({"url": "http://10.0.0.8/hook"}, 400, "unsafe_webhook_url", "url"),
        ({"url": "https://example.com", "event_types": ["job.done"]}, 400, None, "event_types.0"),
        ({"url": "https://example.com", "event_types": []}, 400, None, "event_types"),
        ({"url": "https://example.com", "secret": "mine"}, 400, None, "secret"),
        ({}, 400, None, "url"),
    ):
        answer = client.post("/v1/webhooks", json=body, headers=tenant_a.headers())
        error = answer.json()["error"]
        assert (answer.status_code, error["param"]) == (status, param), (body, error)
        assert code is None or error["code"] == code
    loopback = client.post(
        "/v1/webhooks", json={"url": receiver.url + "/x"}, headers=tenant_a.headers()
    )
    assert "LORAFORGE_WEBHOOK_ALLOW_PRIVATE_URLS" in loopback.json()["error"]["message"]
    for role in ("member", "reader"):
        answer = client.post(
            "/v1/webhooks", json={"url": "https://example.com"}, headers=tenant_a.headers(role)
        )
        assert (answer.status_code, answer.json()["error"]["code"]) == (403, "admin_required")
    for method, path in (
        ("GET", f"/v1/webhooks/{mine['id']}"),
        ("DELETE", f"/v1/webhooks/{mine['id']}"),
        ("GET", f"/v1/webhooks/{mine['id']}/deliveries"),
        ("POST", f"/v1/webhooks/{mine['id']}/test"),
    ):
        answer = client.request(method, path, headers=tenant_b.headers())  # not tenant-b's
        assert (answer.status_code, answer.json()["error"]["code"]) == (404, "webhook_not_found")
    assert _rows(engine) == before  # nothing written by any refusal

    # At most MAX_ENDPOINTS_PER_TENANT live endpoints: the next is refused, nothing written,
    # and deleting one makes room.
    monkeypatch.setattr(services.settings, "webhook_allow_private_urls", None)
    extra = [
        _register(client, tenant_a, f"{receiver.url}/n{n}")["id"]
        for n in range(MAX_ENDPOINTS_PER_TENANT - 1)
    ]
    full = _rows(engine)
    over = client.post("/v1/webhooks", json={"url": receiver.url}, headers=tenant_a.headers())
    assert (over.status_code, over.json()["error"]["code"]) == (409, "too_many_webhooks")
    assert _rows(engine) == full
    client.delete(f"/v1/webhooks/{extra[0]}", headers=tenant_a.headers())
    room = _register(client, tenant_a, receiver.url + "/room")["id"]
    for endpoint_id in [*extra[1:], room]:
        client.delete(f"/v1/webhooks/{endpoint_id}", headers=tenant_a.headers())

    # Deleted: no new event goes to it, what was pending fails, its log stays readable.
    client.post(f"/v1/webhooks/{mine['id']}/test", headers=tenant_a.headers())
    deleted = client.delete(f"/v1/webhooks/{mine['id']}", headers=tenant_a.headers()).json()
    assert deleted["deleted"] is True
    [pending] = client.get(
        f"/v1/webhooks/{mine['id']}/deliveries", headers=tenant_a.headers()
    ).json()["data"]
    assert (pending["status"], pending["last_error"]) == ("failed", "the endpoint was deleted")
    base_id = make_base(engine, "tiny-deleted").id
    [job] = enqueue_jobs(
        engine, tenant_a.tenant_id, base_id, make_file(engine, tenant_a.tenant_id).id, 1
    )
    JobQueue(engine).request_cancel(job)
    assert [e for e in _events(engine) if e[2] == job] == []
    for method, path in (
        ("POST", f"/v1/webhooks/{mine['id']}/test"),
        ("POST", f"/v1/webhooks/{mine['id']}/deliveries/{pending['id']}/retry"),
    ):
        answer = client.request(method, path, headers=tenant_a.headers())
        assert (answer.status_code, answer.json()["error"]["code"]) == (409, "webhook_deleted")
    assert client.get("/v1/webhooks", headers=tenant_a.headers()).json()["data"] == []
    assert _deliver(services) == 0 and receiver.to("/mine") == []


def _posted_until(
    services: Services, schedule: list[float], receiver: Receiver, path: str, count: int
) -> None:
    """Delivery passes until `path` has had `count` posts (the retries' delays going by)."""
    _wait_for(
        lambda: _deliver(services, schedule) >= 0 and len(receiver.to(path)) >= count,
        f"{count} posts to {path}",
        timeout=30,
    )
    assert len(receiver.to(path)) == count


def _rows(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return (
            conn.execute(text("SELECT count(*) FROM webhook_endpoints")).scalar_one(),
            conn.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar_one(),
        )


def test_a_scrape_shows_the_deliveries_pending_and_overdue_and_the_log_is_trimmed_to_its_days(
    services: Services, client: TestClient, tenant_a: TenantKeys, live_url: str
) -> None:
    """`/metrics` counts the deliveries not yet delivered and how long the most overdue has
    waited (a deliverer that stopped shows as that age growing); the hourly trim forgets
    delivered and failed entries past `webhook_log_retention_days`, never a pending one."""
    engine = services.engine
    endpoint = _register(client, tenant_a, "http://127.0.0.1:9/down")["id"]
    for _ in range(3):
        client.post(f"/v1/webhooks/{endpoint}/test", headers=tenant_a.headers())
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE webhook_deliveries SET next_attempt_at = now() - interval '90 s', "
                "created_at = now() - interval '40 days' WHERE id = (SELECT min(id) FROM "
                "webhook_deliveries)"
            )
        )
    samples = scrape(live_url)
    assert value(samples, "loraforge_webhook_deliveries_pending") == 3
    overdue = value(samples, "loraforge_webhook_oldest_due_seconds")
    assert overdue is not None and 90 <= overdue < 120

    assert _deliver(services, [60.0]) == 0  # the port refuses: each waits a minute now
    samples = scrape(live_url)
    assert value(samples, "loraforge_webhook_deliveries_pending") == 3
    assert value(samples, "loraforge_webhook_oldest_due_seconds") == 0
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE webhook_deliveries SET status = 'failed', created_at = now() - "
                "make_interval(days => days) FROM (VALUES (1, 40), (2, 20)) AS v(n, days) "
                "WHERE webhook_deliveries.id = (SELECT id FROM webhook_deliveries ORDER BY id "
                "OFFSET v.n - 1 LIMIT 1)"
            )
        )
        before: dict[str, str] = dict(
            conn.execute(text("SELECT id, status FROM webhook_deliveries")).all()
        )
    assert forget_old_deliveries(engine, older_than_days=30) == 1
    with engine.connect() as conn:
        after: dict[str, str] = dict(
            conn.execute(text("SELECT id, status FROM webhook_deliveries")).all()
        )
    [forgotten] = set(before) - set(after)
    assert before[forgotten] == "failed" and sorted(after.values()) == ["failed", "pending"]
    assert tasks.forget_old_webhook_deliveries.run() == 0  # the task, the settings' 30 days


def test_the_registrys_events_reach_an_endpoint_and_a_rebuild_replays_none(
    services: Services, client: TestClient, tenant_a: TenantKeys, peft_adapter: Path
) -> None:
    """Versions published and deleted, an alias set, moved and deleted: one event each, in
    order, with what changed; the registry rebuilt from the bucket restores a lost version and
    writes no event for it (it happened before)."""
    engine = services.engine
    types = ["adapter.version.created", "adapter.version.deleted", "adapter.alias.updated"]
    endpoint = _register(client, tenant_a, "http://127.0.0.1:9/registry", event_types=types)["id"]
    base = make_base(engine, "tiny-llama")
    for _ in range(2):
        publish(
            services,
            claim_job(services, tenant_a.tenant_id, base.id, adapter_name="bot"),
            peft_adapter,
        )
    headers = tenant_a.headers()
    for version in (1, 2):
        moved = client.put(
            "/v1/adapters/bot/aliases/prod", json={"version": version}, headers=headers
        )
        assert moved.status_code == 200, moved.text
    assert client.delete("/v1/adapters/bot/aliases/prod", headers=headers).status_code == 200
    assert client.delete("/v1/adapters/bot/versions/1", headers=headers).status_code == 200

    def log() -> list[tuple[str, dict[str, Any]]]:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT event_type, payload -> 'data' FROM webhook_deliveries "
                    "WHERE endpoint_id = :e ORDER BY created_at, id"
                ),
                {"e": endpoint},
            )
            return [(r[0], r[1]) for r in rows]

    said = [(t, d.get("version"), d.get("from_version"), d.get("to_version")) for t, d in log()]
    assert said == [
        ("adapter.version.created", 1, None, None),
        ("adapter.version.created", 2, None, None),
        ("adapter.alias.updated", None, None, 1),
        ("adapter.alias.updated", None, 1, 2),
        ("adapter.alias.updated", None, 2, None),
        ("adapter.version.deleted", 1, None, None),
    ]
    assert all(d["adapter"] == "bot" for _, d in log())

    with engine.begin() as conn:  # version 2's row lost; its files stay in the bucket
        conn.execute(text("DELETE FROM adapter_versions WHERE number = 2"))
    written = len(log())
    report = registry.rebuild_from_manifests(engine, services.store)
    assert report.versions == 1
    assert client.get("/v1/adapters/bot/versions/2", headers=headers).status_code == 200
    assert len(log()) == written  # the restored version announced nothing


def test_a_rotated_secret_signs_beside_the_old_one_until_the_overlap_ends(
    services: Services, client: TestClient, tenant_a: TenantKeys, receiver: Receiver
) -> None:
    """After a rotation the answer holds the new secret (and the list does not); deliveries
    verify with the new secret and, during the overlap, with the old one too, so a receiver
    switches without dropping one; once the overlap is over, only the new one signs."""
    engine = services.engine
    created = _register(client, tenant_a, receiver.url + "/rot")
    old = created["secret"]
    rotated = client.post(
        f"/v1/webhooks/{created['id']}/rotate_secret", headers=tenant_a.headers()
    ).json()
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old and rotated["previous_secret_valid_until"]
    listed = client.get(f"/v1/webhooks/{created['id']}", headers=tenant_a.headers()).json()
    assert listed["secret"] is None

    def delivered() -> tuple[bytes, dict[str, str]]:
        client.post(f"/v1/webhooks/{created['id']}/test", headers=tenant_a.headers())
        assert _deliver(services) == 1
        headers, body = receiver.to("/rot")[-1]
        return body, headers

    def verifies(secret: str, body: bytes, headers: dict[str, str]) -> bool:
        try:
            openai.OpenAI(api_key="unused").webhooks.verify_signature(body, headers, secret=secret)
        except openai.InvalidWebhookSignatureError:
            return False
        return True

    body, headers = delivered()
    assert len(headers["webhook-signature"].split()) == 2
    assert verifies(new, body, headers) and verifies(old, body, headers)
    with engine.begin() as conn:  # the overlap is over
        conn.execute(
            text("UPDATE webhook_endpoints SET previous_secret_until = now() - interval '1 s'")
        )
    body, headers = delivered()
    assert verifies(new, body, headers) and not verifies(old, body, headers)
    gone = client.delete(f"/v1/webhooks/{created['id']}", headers=tenant_a.headers())
    assert gone.status_code == 200
    again = client.post(f"/v1/webhooks/{created['id']}/rotate_secret", headers=tenant_a.headers())
    assert (again.status_code, again.json()["error"]["code"]) == (404, "webhook_not_found")
