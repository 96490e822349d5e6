"""The dashboard's tables and pages in a real browser: the jobs table (filter, search, cursor
pages, live rows), a job with 100,000 metric events, queue and workers, base models, empty
states."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import text

from control_plane import base_catalog, trainers
from control_plane.dashboard.queries import MAX_CHART_POINTS, NEWER_AT_MOST
from control_plane.dashboard.routes.platform import QUEUE_PAGE_TENANTS
from control_plane.events import metric_events_in_bulk
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.factories import (
    create_validating_job,
    enqueue_jobs,
    make_base,
    make_file,
    make_tenant,
)

pytestmark = pytest.mark.browser


def named_jobs(
    services: Services, keys: TenantKeys, base_id: str, count: int, name: str
) -> list[str]:
    ids = enqueue_jobs(
        services.engine,
        keys.tenant_id,
        base_id,
        make_file(services.engine, keys.tenant_id).id,
        count,
    )
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET adapter_name = :name WHERE id = ANY(:ids)"),
            {"name": name, "ids": ids},
        )
    return ids


def test_new_tenants_see_what_to_do_next_on_every_page(
    live_url: str, page: Page, tenant_a: TenantKeys
) -> None:
    sign_in(page, live_url, tenant_a.admin)
    expect(page.locator("#jobs-empty a[href='/jobs/new']")).to_be_visible()
    page.click("nav a[href='/adapters']")
    expect(page.locator("#adapters-empty")).to_contain_text("Start a job")
    page.click("nav a[href='/queue']")
    expect(page.locator("#queue-empty")).to_be_visible()
    expect(page.locator("#trainers-empty")).to_contain_text("loraforge up")
    page.click("nav a[href='/bases']")
    expect(page.locator("#bases-empty")).to_contain_text("loraforge base add")
    page.click("nav a[href='/jobs/new']")
    expect(page.locator("#no-bases")).to_be_visible()


def test_the_jobs_table_filters_searches_pages_and_updates_live(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    base = make_base(services.engine, "tiny-llama")
    older = named_jobs(services, tenant_a, base.id, 20, "alpha")
    newer = named_jobs(services, tenant_a, base.id, 5, "beta")
    sign_in(page, live_url, tenant_a.admin)
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(20)
    # Newest first (each batch shares its transaction's time: its order within is by id).
    adapters = page.locator("#jobs-table tbody tr td:nth-child(4)")
    assert adapters.all_inner_texts() == ["beta"] * 5 + ["alpha"] * 15

    page.click("#older-jobs")
    expect(rows).to_have_count(5)
    assert adapters.all_inner_texts() == ["alpha"] * 5
    assert page.locator("#older-jobs").count() == 0
    # An older page announces what was submitted since, not the newer page's jobs.
    named_jobs(services, tenant_a, base.id, 1, "delta")
    expect(page.locator("#newer-count")).to_have_text("1")
    expect(page.locator("#newer-jobs")).to_be_visible()

    page.goto(f"{live_url}/jobs")
    page.fill("#job-search", "beta")
    expect(rows).to_have_count(5)
    page.fill("#job-search", older[3])
    expect(rows).to_have_count(1)
    page.fill("#job-search", "")
    expect(rows).to_have_count(20)

    # Live: a cancelled row changes in place; a job submitted meanwhile is announced.
    services.queue.request_cancel(newer[-1])
    expect(page.locator(f"#job-{newer[-1]} .status")).to_have_text("cancelled")
    named_jobs(services, tenant_a, base.id, 1, "gamma")
    expect(page.locator("#newer-jobs")).to_be_visible()
    expect(page.locator("#newer-count")).to_have_text("1")

    page.select_option("#status-filter", "cancelled")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_id(f"job-{newer[-1]}")

    # A filter that matches nothing still counts from the tenant's newest job, and a sweep is
    # counted up to a bound.
    page.select_option("#status-filter", "failed")
    expect(page.locator("#no-match")).to_be_visible()
    named_jobs(services, tenant_a, base.id, 1, "epsilon")
    expect(page.locator("#newer-count")).to_have_text("1")
    named_jobs(services, tenant_a, base.id, NEWER_AT_MOST + 50, "sweep")
    expect(page.locator("#newer-count")).to_have_text(f"{NEWER_AT_MOST}+")


@pytest.mark.slow
def test_a_job_with_100000_metric_events_opens_with_a_bounded_number_of_points(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    base = make_base(services.engine, "tiny-llama")
    (job_id,) = named_jobs(services, tenant_a, base.id, 1, "long-run")
    with services.engine.begin() as conn, metric_events_in_bulk(conn, [job_id]):
        conn.execute(
            text(
                """
                INSERT INTO job_events (job_id, type, message, data)
                SELECT :job, 'metrics', 'step ' || g,
                       CASE WHEN g % 1000 = 0
                            THEN jsonb_build_object('step', g, 'eval_loss', 3.0 / (1 + g / 5000.0))
                            ELSE jsonb_build_object('step', g, 'total_steps', 100000,
                                   'train_loss', 3.0 / (1 + g / 5000.0) + (g % 7) / 100.0,
                                   'tokens_per_s', 1234.5)
                       END
                FROM generate_series(1, 100000) AS g
                """
            ),
            {"job": job_id},
        )
    sign_in(page, live_url, tenant_a.admin)
    with page.expect_response(re.compile(r".*/metrics\.json$")) as metrics:
        page.goto(f"{live_url}/jobs/{job_id}")
    body = metrics.value.json()
    assert body["points_in_job"] == 100_000 and body["downsampled"]
    assert len(body["train"]["steps"]) <= MAX_CHART_POINTS
    assert len(body["eval"]["steps"]) == 100  # fewer than the bound: sent as they are
    assert len(metrics.value.body()) < 100_000  # bytes, for 100,000 points in the job
    page.wait_for_selector("#loss-chart[data-ready=true]")
    drawn = int(page.get_attribute("#loss-chart", "data-points") or 0)
    assert 0 < drawn <= MAX_CHART_POINTS + 100
    expect(page.locator("#chart-note")).to_contain_text("summarising 100,000")
    expect(page.locator("#event-log li")).to_have_count(50)
    page.click("#older-events button")
    expect(page.locator("#event-log li")).to_have_count(100)
    page.check("#log-scale")
    expect(page.locator("#loss-chart canvas")).to_have_count(1)


def test_queue_and_workers_show_counts_per_tenant_and_each_trainer(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    base = make_base(services.engine, "tiny-llama")
    named_jobs(services, tenant_a, base.id, 3, "a-jobs")
    (theirs,) = named_jobs(services, tenant_b, base.id, 1, "b-jobs")
    with services.engine.begin() as conn:
        for name, job in (("trainer-busy", theirs), ("trainer-gone", None)):
            trainers.report(
                conn,
                trainers.TrainerReport(
                    id=name,
                    host="gpu-node-1",
                    pid=42,
                    device="cuda:0 NVIDIA H100",
                    resident_base="tiny-llama",
                    current_job_id=job,
                    tokens_per_second=5120.0,
                ),
            )
        conn.execute(
            text(
                "UPDATE trainers SET last_heartbeat_at = now() - interval '1 hour' WHERE id = 'trainer-gone'"
            )
        )
    # tenant-a's admin is a platform operator: every tenant's line, every trainer's job.
    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/queue")
    rows = page.locator("#queue-counts tbody tr")
    expect(rows).to_have_count(2)  # both tenants queued, the one with the most queued first
    expect(rows.nth(0)).to_contain_text("tenant-a")
    expect(rows.nth(1)).to_contain_text("tenant-b")
    expect(page.locator("#queue-totals")).to_have_text("4 queued and 0 running over 2 tenants.")
    busy = page.locator("#trainers tr", has_text="trainer-busy")
    expect(busy).to_contain_text("alive")
    expect(busy).to_contain_text("cuda:0 NVIDIA H100")
    expect(busy).to_contain_text("5,120")
    expect(busy).to_contain_text(theirs)
    expect(page.locator("#trainers tr", has_text="trainer-gone")).to_contain_text("gone")

    # tenant-b's member: its own line only; tenant-a sees its own and not b's job id.
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_b.member)
    page.goto(f"{live_url}/queue")
    expect(page.locator("#queue-counts tbody tr")).to_have_count(1)
    expect(page.locator("#queue-counts")).not_to_contain_text("tenant-a")
    expect(page.locator("#queue-totals")).to_have_count(0)  # no other tenant's figures
    expect(page.locator("#trainers tr", has_text="trainer-busy")).to_contain_text(theirs)

    # A platform of many tenants: the operator's page lists the fifty busiest and counts the rest.
    for n in range(QUEUE_PAGE_TENANTS + 1):
        tenant = make_tenant(services.engine, f"sweep-{n:02d}")
        enqueue_jobs(
            services.engine, tenant.id, base.id, make_file(services.engine, tenant.id).id, 2
        )
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/queue")
    expect(rows).to_have_count(QUEUE_PAGE_TENANTS)
    expect(rows.nth(0)).to_contain_text("tenant-a")  # 3 queued
    expect(page.locator("#queue-counts")).not_to_contain_text("tenant-b")  # 1 queued: not listed
    expect(page.locator("#queue-totals")).to_have_text(
        f"{4 + 2 * (QUEUE_PAGE_TENANTS + 1)} queued and 0 running over "
        f"{QUEUE_PAGE_TENANTS + 3} tenants; the {QUEUE_PAGE_TENANTS} with the most queued are listed."
    )


def test_the_queue_page_says_whose_queued_jobs_wait_on_their_running_limit(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    base = make_base(services.engine, "tiny-llama")
    limit = services.settings.max_running_jobs_per_tenant
    named_jobs(services, tenant_a, base.id, limit + 2, "a-jobs")
    named_jobs(services, tenant_b, base.id, 2, "b-jobs")
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE tenants SET max_running_jobs = 1 WHERE id = :t"), {"t": tenant_b.tenant_id}
        )
    claimed = [services.queue.claim(f"trainer-{n}") for n in range(limit + 1)]
    assert services.queue.claim("trainer-x") is None  # both tenants hold their limits
    (b_job,) = [job for job in claimed if job is not None and job.tenant_id == tenant_b.tenant_id]
    sweep = make_tenant(services.engine, "sweep")
    enqueue_jobs(services.engine, sweep.id, base.id, make_file(services.engine, sweep.id).id, 2)

    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/queue")
    rows = page.locator("#queue-counts tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0)).to_have_text(
        re.compile(rf"tenant-a\s*2\s*{limit}\s*{limit}\s*its running limit")
    )
    expect(rows.nth(1)).to_have_text(re.compile(rf"sweep\s*2\s*0\s*{limit}\s*a trainer"))
    expect(rows.nth(2)).to_have_text(re.compile(r"tenant-b\s*1\s*1\s*1\s*its running limit"))
    expect(page.locator("#queue-counts tr.at-limit")).to_have_count(2)

    # One of tenant-b's jobs finishes: its queued job now waits for a trainer, not its limit.
    assert services.queue.complete(b_job.id, b_job.lease_owner or "") is not None
    page.reload()
    expect(rows.nth(2)).to_have_text(re.compile(r"tenant-b\s*1\s*0\s*1\s*a trainer"))
    expect(page.locator("#queue-counts tr.at-limit")).to_have_count(1)


def test_base_models_show_status_and_the_failure_reason_to_operators_only(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    make_base(services.engine, "tiny-llama")
    with services.engine.begin() as conn:
        base_catalog.register_base_model(
            conn,
            base_catalog.NewBaseModel(
                name="broken-base",
                source="/srv/models/broken",
                source_kind="dir",
                status="failed",
                error_message="config.json is missing in /srv/models/broken",
            ),
        )
    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/bases")
    expect(page.locator("#bases tr", has_text="broken-base")).to_contain_text(
        "config.json is missing"
    )
    expect(page.locator("#bases tr", has_text="tiny-llama")).to_contain_text("ready")
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_b.admin)
    page.goto(f"{live_url}/bases")
    row = page.locator("#bases tr", has_text="broken-base")
    expect(row).to_contain_text("failed")
    expect(row).not_to_contain_text("/srv/models")


def _validating_job(services: Services, tenant: TenantKeys) -> str:
    """A job of `tenant` on the tiny base, in `validating_files`: its id."""
    base = make_base(services.engine, "tiny-llama")
    file_id = make_file(services.engine, tenant.tenant_id).id
    return create_validating_job(services.engine, tenant.tenant_id, base.id, file_id)


def test_a_failed_job_shows_its_error_code_and_message_as_text(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    job_id = _validating_job(services, tenant_a)
    message = "training_file (<script>x()</script>.jsonl): line 3: expected an object"
    services.queue.mark_validation_failed(
        job_id, code="invalid_json_line", message=message, param="training_file"
    )
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/{job_id}")
    error = page.locator("#job-error")
    expect(error).to_contain_text("invalid_json_line")
    expect(error.locator("p")).to_have_text(message)
    expect(page.locator("#job-status .status")).to_have_text("failed")
    assert page.locator("#cancel-job").count() == 0  # nothing left to cancel
    expect(page.locator("#timeline li")).to_have_count(3)  # created, validating, failed


def test_a_job_page_lists_its_metadata_as_text(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    job_id = _validating_job(services, tenant_a)
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET user_metadata = CAST(:m AS jsonb) WHERE id = :id"),
            {
                "m": json.dumps(
                    {"team": "nlp", "ticket": "<b>ML-7</b>", "a=b": "c", "z": "long" * 60}
                ),
                "id": job_id,
            },
        )
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/{job_id}")
    listed = page.locator("#job-metadata")
    expect(listed.locator("dt")).to_have_text(["a=b", "team", "ticket", "z"])
    expect(listed.locator("dd")).to_have_text(["c", "nlp", "<b>ML-7</b>", "long" * 60])  # text
    # A pair the jobs search cannot name (a key holding '=', a pair longer than a search) is
    # not a link; the others are.
    expect(listed.locator("dd a")).to_have_text(["nlp", "<b>ML-7</b>"])
    # Each pair leads to the jobs that hold it (the jobs table searched for it: a sweep)
    listed.locator("dd a").first.click()
    expect(page).to_have_url(f"{live_url}/jobs?q=team%3Dnlp")
    expect(page.locator("#job-search")).to_have_value("team=nlp")
    expect(page.locator(f"#jobs-table a[href='/jobs/{job_id}']")).to_have_count(1)


def test_signing_in_and_moving_around_works_from_the_keyboard(
    live_url: str, page: Page, tenant_a: TenantKeys
) -> None:
    page.goto(f"{live_url}/sign-in")
    page.keyboard.type(tenant_a.admin)  # the key field has the focus
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_url}/jobs")
    page.keyboard.press("Tab")
    expect(page.locator(".skip")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    expect(page.locator("nav a[href='/jobs']").last).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    page.wait_for_url(f"{live_url}/jobs/new")


@pytest.mark.slow
def test_a_queued_jobs_page_says_what_it_waits_for_and_follows_the_queue(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    base = make_base(services.engine, "tiny-llama")
    file_id = make_file(services.engine, tenant_a.tenant_id).id
    # One at a time: each its own created_at, the oldest first.
    jobs = [
        enqueue_jobs(services.engine, tenant_a.tenant_id, base.id, file_id, 1)[0] for _ in "abc"
    ]
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/{jobs[2]}")
    message = page.locator("#standing-message")
    expect(message).to_have_text(
        "2 jobs of your own go first (a higher priority, or submitted earlier)."
    )
    expect(page.locator("#job-standing")).to_contain_text("your organization runs 0 of 4")

    # Trainers claim the older two: the line moves up without a reload (htmx polls it).
    first = services.queue.claim("trainer-1")
    assert first is not None and first.id == jobs[0]
    expect(message).to_have_text(
        "1 job of your own goes first (a higher priority, or submitted earlier).",
        timeout=15_000,
    )
    second = services.queue.claim("trainer-2")
    assert second is not None and second.id == jobs[1]
    expect(message).to_have_text(
        "It is next, but no trainer is running: nothing takes it until one starts (ask the "
        "platform's operators).",
        timeout=15_000,
    )
    expect(page.locator("#job-standing")).to_contain_text("your organization runs 2 of 4")

    # Claimed: nothing to wait for, and the page says it runs.
    third = services.queue.claim("trainer-3")
    assert third is not None and third.id == jobs[2]
    expect(page.locator("#job-standing")).to_be_hidden(timeout=15_000)
    expect(page.locator("#job-status .status")).to_have_text("running")
