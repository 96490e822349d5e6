"""`GET /metrics` against a real server: request counters by route template, and the platform's
figures (jobs, queue, trainers) moving as a real trainer runs a real job on the tiny base."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event, text

from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.job_status import JobStatus
from control_plane.queue import JobQueue
from control_plane.queue_stats import drift
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import S3ObjectStore
from tests.factories import ADDITION_CHATS as RECORDS
from tests.factories import (
    create_validating_job,
    enqueue_jobs,
    make_base,
    make_file,
    make_key,
    make_tenant,
)
from tests.faults.tcp_proxy import CuttableProxy
from tests.integration.test_queue_scale import _plan_rows_from
from tests.integration.test_trainer import make_world, submit
from workers.runner import JobRunner

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url + "/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def matching(samples: Samples, name: str, **labels: str) -> list[float]:
    wanted = set(labels.items())
    return [v for (n, ls), v in samples.items() if n == name and wanted <= ls]


def make_services(database_url: str, tmp_path: Path) -> Services:
    settings = Settings(
        home=tmp_path / "home",
        local_store_dir=tmp_path / "objects",
        lease_seconds=4,
        retry_backoff_seconds=0,
    )
    return build_services(settings, database_url=database_url)


@pytest.fixture
def metered(database_url: str, tmp_path: Path) -> Iterator[tuple[Services, str]]:
    services = make_services(database_url, tmp_path)
    with serve_in_thread(create_app(services)) as url:
        yield services, url
    services.close()


def test_requests_are_counted_by_route_template_and_status(
    metered: tuple[Services, str],
) -> None:
    services, url = metered
    world = make_world(services)
    key = make_key(services.engine, world["tenant"], "member")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(3):
            assert http.get("/v1/fine_tuning/jobs/ftjob-nope").status_code == 404
        assert http.get("/v1/fine_tuning/jobs").status_code == 200
        assert http.get("/no/such/path").status_code == 404
        assert httpx.get(url + "/v1/fine_tuning/jobs").status_code == 401

    samples = scrape(url)
    one_job = {"method": "GET", "route": "/v1/fine_tuning/jobs/{job_id}"}
    assert value(samples, "loraforge_http_requests_total", **one_job, status="404") == 3
    listing = {"method": "GET", "route": "/v1/fine_tuning/jobs"}
    assert value(samples, "loraforge_http_requests_total", **listing, status="200") == 1
    assert value(samples, "loraforge_http_requests_total", **listing, status="401") == 1
    unmatched = {"method": "GET", "route": "unmatched", "status": "404"}
    assert value(samples, "loraforge_http_requests_total", **unmatched) == 1
    # No id ever becomes a label value.
    assert not [ls for (_, ls) in samples if any("ftjob-" in v for _, v in ls)]
    timed = value(samples, "loraforge_http_request_duration_seconds_count", **one_job)
    assert timed == 3
    assert value(samples, "loraforge_database_up") == 1


def test_a_job_run_moves_the_platform_figures(metered: tuple[Services, str]) -> None:
    services, url = metered
    world = make_world(services)
    before = scrape(url)
    assert value(before, "loraforge_jobs", status="succeeded") == 0
    assert value(before, "loraforge_trainers_alive") == 0

    job_id = submit(services, world, records=RECORDS * 2, n_epochs=2)
    queued = scrape(url)
    assert value(queued, "loraforge_jobs", status="queued") == 1
    assert value(queued, "loraforge_queue_depth", base="tiny-llama") == 1
    age = value(queued, "loraforge_queue_oldest_age_seconds", base="tiny-llama")
    assert age is not None and age >= 0

    runner = JobRunner(services, "w-metrics", work_dir=services.settings.home / "w")
    stop = threading.Event()
    thread = threading.Thread(target=runner.run_forever, args=(stop,), kwargs={"idle_wait": 0.1})
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            after = scrape(url)
            ended = value(
                after,
                "loraforge_trainer_jobs_ended_total",
                trainer="w-metrics",
                host=runner.snapshot().host,
                outcome="succeeded",
            )
            if ended == 1 and value(after, "loraforge_jobs", status="succeeded") == 1:
                break
            assert time.monotonic() < deadline and thread.is_alive(), job_id
            time.sleep(0.3)
    finally:
        stop.set()
        thread.join(60)

    trainer = {"trainer": "w-metrics", "host": runner.snapshot().host}
    assert value(after, "loraforge_trainers_alive") == 1
    assert value(after, "loraforge_trainer_claims_total", **trainer) == 1
    assert value(after, "loraforge_trainer_jobs_ended_total", **trainer, outcome="failed") == 0
    trained = value(after, "loraforge_trainer_tokens_trained_total", **trainer)
    assert trained is not None and trained > 0
    speed = value(after, "loraforge_trainer_tokens_per_second", **trainer)
    assert speed is not None and speed > 0
    assert matching(after, "loraforge_trainer_info", resident_base="tiny-llama", **trainer) == [1]
    assert value(after, "loraforge_jobs", status="queued") == 0
    assert value(after, "loraforge_queue_depth", base="tiny-llama") is None
    # The trainer stopped cleanly: it left the registry, and the figures say so.
    assert value(scrape(url), "loraforge_trainers_alive") == 0


def test_a_scrape_counts_every_job_off_the_bookkeeping_not_the_jobs(
    metered: tuple[Services, str],
) -> None:
    """Jobs in every status over two tenants and two bases, 3,000 finished ones imported in bulk,
    then claimed, finished, failed, retried, cancelled, paused, handed back, reaped, moved
    between tenants and deleted: the scrape's figures equal a recount of the jobs, and the
    statements it runs read one job per base and the jobs still validating or paused, no more
    (a scan of the jobs would read thousands)."""
    services, url = metered
    engine = services.engine
    small, large = make_base(engine, "small-base"), make_base(engine, "large-base")
    acme = make_tenant(engine, "acme", max_running_jobs=10)
    globex = make_tenant(engine, "globex", max_running_jobs=10)
    for tenant in (acme, globex):
        file_id = make_file(engine, tenant.id).id
        create_validating_job(engine, tenant.id, small.id, file_id)
        enqueue_jobs(engine, tenant.id, small.id, file_id, 4)
        enqueue_jobs(engine, tenant.id, large.id, file_id, 3, priority=2)
    with engine.begin() as conn:  # a platform's history, imported in one statement
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, "
                "hyperparameters, interruptions, created_at) "
                "SELECT 'ftjob-old-' || g, CASE WHEN g % 2 = 0 THEN :acme ELSE :globex END, "
                "(ARRAY['succeeded', 'failed', 'cancelled'])[1 + g % 3], :base, :file, "
                "'{}'::jsonb, g % 4, now() - interval '30 days' + g * interval '1 s' "
                "FROM generate_series(1, 3000) AS g"
            ),
            {"acme": acme.id, "globex": globex.id, "base": small.id, "file": file_id},
        )
    queue = JobQueue(engine, lease_seconds=60, retry_backoff_seconds=3600)
    claimed = [queue.claim(f"w{n}") for n in range(7)]
    held = [job for job in claimed if job is not None]
    assert len(held) == 7  # the last one still runs
    queue.complete(held[0].id, "w0")
    queue.fail(held[1].id, "w1", code="bad", message="bad data", retryable=False)
    queue.fail(held[2].id, "w2", code="oom", message="out of memory")  # backs off, queued
    queue.request_cancel(held[3].id)  # cancelling: the worker still winds down
    queue.hand_back(held[4].id, "w4", reason="shutting down")
    queue.request_pause(held[6].id)  # running: asked to, it still runs
    with engine.connect() as conn:
        waiting = conn.execute(text("SELECT id FROM jobs WHERE status = 'queued' LIMIT 1"))
        queue.request_pause(waiting.scalar_one())  # queued: paused at once
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET lease_expires_at = now() - interval '1 s' WHERE id = :id"),
            {"id": held[5].id},
        )
        # A finished job and a queued one handed to the other tenant; 500 old ones deleted.
        conn.execute(
            text(
                "UPDATE jobs SET tenant_id = :globex WHERE id IN "
                "('ftjob-old-2', (SELECT id FROM jobs WHERE tenant_id = :acme "
                "AND status = 'queued' ORDER BY id LIMIT 1))"
            ),
            {"acme": acme.id, "globex": globex.id},
        )
        conn.execute(text("DELETE FROM jobs WHERE id LIKE 'ftjob-old-1%'"))
    assert [job.id for job in queue.reap_expired_leases()] == [held[5].id]

    recount = (
        "SELECT count(*) FILTER (WHERE status = 'queued'), "
        "extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'queued')) "
        "FROM jobs WHERE base_model_id = :base"
    )
    with engine.connect() as conn:
        ages_before = {
            b.name: conn.execute(text(recount), {"base": b.id}).one()[1] for b in (small, large)
        }
    statements: list[tuple[str, object]] = []

    def capture(
        conn: object, cursor: object, statement: str, parameters: object, *_: object
    ) -> None:
        statements.append((statement, parameters))

    event.listen(services.auth_engine, "before_cursor_execute", capture)
    try:
        samples = scrape(url)
    finally:
        event.remove(services.auth_engine, "before_cursor_execute", capture)

    with engine.connect() as conn:
        by_status = dict(
            conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).tuples().all()
        )
        lost = conn.execute(text("SELECT sum(interruptions) FROM jobs")).scalar_one()
        queued = {b.name: conn.execute(text(recount), {"base": b.id}).one() for b in (small, large)}
        assert drift(conn) == []
        read = 0
        for statement, parameters in statements:
            plan = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + statement,
                parameters,  # type: ignore[arg-type]
            ).scalar_one()[0]["Plan"]
            read += _plan_rows_from(plan, "jobs")
    assert set(by_status) == {status.value for status in JobStatus}  # every status is here
    for status in JobStatus:
        assert value(samples, "loraforge_jobs", status=status.value) == by_status[status.value]
    assert lost > 0 and value(samples, "loraforge_job_interruptions_total") == lost
    for name, (count, age_after) in queued.items():
        assert count > 0 and value(samples, "loraforge_queue_depth", base=name) == count
        age = value(samples, "loraforge_queue_oldest_age_seconds", base=name)
        assert age is not None and ages_before[name] <= age <= age_after
    assert by_status[JobStatus.PAUSED] == 1
    assert statements and read <= 2 + by_status[JobStatus.VALIDATING_FILES] + 1


def test_a_scrape_during_a_database_outage_answers_and_says_so(
    proxied_url: str, proxy: CuttableProxy, tmp_path: Path
) -> None:
    services = make_services(proxied_url, tmp_path)
    try:
        with serve_in_thread(create_app(services)) as url:
            assert value(scrape(url), "loraforge_database_up") == 1
            proxy.cut()
            down = scrape(url)
            assert value(down, "loraforge_database_up") == 0
            assert value(down, "loraforge_jobs", status="queued") is None
            proxy.restore()
            assert value(scrape(url), "loraforge_database_up") == 1
    finally:
        services.close()


def test_readiness_names_an_object_store_that_does_not_answer(
    database_url: str, s3_store: S3ObjectStore, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", lease_seconds=4)
    services = build_services(settings, database_url=database_url, store=s3_store)
    try:
        with serve_in_thread(create_app(services)) as url:
            ready = httpx.get(url + "/readyz")
            assert ready.status_code == 200
            assert ready.json()["checks"] == {"database": "ok", "object_store": "ok"}
            assert ready.json()["trainers"]["alive"] == 0

            s3_store.client.delete_bucket(Bucket=s3_store.bucket)  # the store is gone
            try:
                down = httpx.get(url + "/readyz")
                assert down.status_code == 503 and down.headers["retry-after"]
                checks = down.json()["checks"]
                assert checks["database"] == "ok"
                assert checks["object_store"].startswith("unavailable: ")
                assert httpx.get(url + "/healthz").status_code == 200
            finally:
                s3_store.client.create_bucket(Bucket=s3_store.bucket)
    finally:
        services.close()
