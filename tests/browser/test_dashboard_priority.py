"""A job's priority in the dashboard, in a real browser: a writer moves a queued job ahead from
its page (`POST /jobs/{id}/priority`, the REST route's own function) and its standing follows;
a sweep filtered by metadata takes a new priority from the jobs table (`POST /jobs/sweep`,
`sweeps.prioritize_matching`). A reader is offered neither, and a priority no REST body would
take is a notice that changes nothing."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import text

from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.factories import enqueue_jobs, make_base, make_file, tag_jobs

pytestmark = pytest.mark.browser

NEXT = (
    "It is next, but no trainer is running: nothing takes it until one starts (ask the "
    "platform's operators)."
)
BAD_PRIORITY = "Nothing changed: a priority is a whole number from -100 (last) to 100 (first)."
ABOVE_CAP = (
    "Nothing changed: that is above the highest priority your tenant's jobs may ask for (the "
    "platform's operator sets it)."
)


def _queued_one_at_a_time(services: Services, keys: TenantKeys, count: int) -> list[str]:
    """`count` queued jobs, each its own `created_at`, the oldest first."""
    base_id = make_base(services.engine, "tiny-priority").id
    file_id = make_file(services.engine, keys.tenant_id).id
    return [
        enqueue_jobs(services.engine, keys.tenant_id, base_id, file_id, 1)[0] for _ in range(count)
    ]


def _priorities(services: Services, job_ids: list[str]) -> list[int]:
    with services.engine.connect() as conn:
        found = dict(
            conn.execute(
                text("SELECT id, priority FROM jobs WHERE id = ANY(:ids)"), {"ids": job_ids}
            ).all()
        )
    return [found[job_id] for job_id in job_ids]


def _priority_events(services: Services, job_id: str) -> list[str]:
    with services.engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT message FROM job_events WHERE job_id = :id "
                    "AND message LIKE 'Priority changed%' ORDER BY id"
                ),
                {"id": job_id},
            ).scalars()
        )


def _csrf(page: Page) -> str:
    return str(
        page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    )


def test_a_person_moves_a_queued_job_ahead_from_its_page_and_a_sweep_behind_from_the_table(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    *grid, job_id, last = _queued_one_at_a_time(services, tenant_a, 5)
    tag_jobs(services.engine, {"sweep": "grid"}, *grid)

    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/{job_id}")
    standing = page.locator("#standing-message")
    expect(standing).to_have_text(
        "3 jobs of your own go first (a higher priority, or submitted earlier)."
    )
    expect(page.locator("#job-priority")).to_have_text("0")
    expect(page.locator("#priority-input")).to_have_value("0")

    # Ahead of its own jobs: the page comes back with the priority, the notice, the event,
    # and a standing with none of its own jobs before it.
    page.fill("#priority-input", "10")
    page.click("#set-priority")
    page.wait_for_url(re.compile(r".*notice=prioritized$"))
    expect(page.locator("#notice")).to_have_text(
        "New priority set: the job takes its new place in the queue at once."
    )
    expect(page.locator("#job-priority")).to_have_text("10")
    expect(page.locator("#priority-input")).to_have_value("10")
    expect(standing).to_have_text(NEXT)
    expect(page.locator("#event-log")).to_contain_text("Priority changed from 0 to 10")
    assert _priorities(services, [*grid, job_id]) == [0, 0, 0, 10]

    # Changed elsewhere (the REST API) while the page is open: the panel follows live, and a
    # priority the person is typing is theirs until they send it.
    page.fill("#priority-input", "7")
    moved = page.request.post(
        f"{live_url}/v1/fine_tuning/jobs/{job_id}/priority",
        headers=tenant_a.headers("member"),
        data={"priority": 20},
    )
    assert moved.ok, moved.text()
    expect(page.locator("#job-priority")).to_have_text("20")
    expect(page.locator("#event-log")).to_contain_text("Priority changed from 10 to 20")
    expect(page.locator("#priority-input")).to_have_value("7")
    expect(page.locator("#priority-input")).to_be_focused()
    page.keyboard.type("5")  # the caret is where it was
    expect(page.locator("#priority-input")).to_have_value("75")
    with page.expect_navigation():
        page.keyboard.press("Enter")
    expect(page.locator("#job-priority")).to_have_text("75")
    expect(page.locator("#event-log")).to_contain_text("Priority changed from 20 to 75")

    # The newest job waits behind the whole sweep and the job moved ahead...
    page.goto(f"{live_url}/jobs/{last}")
    expect(standing).to_have_text(
        "4 jobs of your own go first (a higher priority, or submitted earlier)."
    )

    # ...until the sweep goes behind it, from the table filtered by the sweep's metadata.
    page.goto(f"{live_url}/jobs")
    page.fill("#job-search", "sweep=grid")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(3)
    expect(page.locator("#prioritize-sweep")).to_have_text("Set priority of job(s) with sweep=grid")
    page.fill("#sweep-priority", "-5")
    page.click("#prioritize-sweep")
    expect(page.locator("#notice")).to_have_text(
        "3 job(s) took priority -5: queued ones take their new place at once."
    )
    expect(page.locator("#jobs-table tbody tr")).to_have_count(3)  # still filtered
    assert _priorities(services, [*grid, job_id, last]) == [-5, -5, -5, 75, 0]
    assert _priority_events(services, grid[0]) == ["Priority changed from 0 to -5"]

    # The same priority again changes nothing, and says so.
    page.fill("#sweep-priority", "-5")
    page.click("#prioritize-sweep")
    expect(page.locator("#notice")).to_have_text(
        "No job took priority -5: each already had it, or is cancelling or over."
    )
    assert _priority_events(services, grid[0]) == ["Priority changed from 0 to -5"]

    page.goto(f"{live_url}/jobs/{last}")
    expect(standing).to_have_text(
        "1 job of your own goes first (a higher priority, or submitted earlier)."
    )


def test_a_paused_job_keeps_its_new_priority_and_a_finished_one_takes_none(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    paused_id, cancelled_id = _queued_one_at_a_time(services, tenant_a, 2)
    services.queue.request_pause(paused_id)
    services.queue.request_cancel(cancelled_id)

    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/{paused_id}")
    page.fill("#priority-input", "-3")
    page.click("#set-priority")
    expect(page.locator("#notice")).to_have_text(
        "New priority set: the job is not queued now; it takes its place once it is."
    )
    expect(page.locator("#job-priority")).to_have_text("-3")
    assert _priorities(services, [paused_id]) == [-3]

    # Over: no form, and a post made all the same is refused on the page with the rule.
    page.goto(f"{live_url}/jobs/{cancelled_id}")
    expect(page.locator("#job-status .status")).to_have_text("cancelled")
    expect(page.locator("#job-priority")).to_have_text("0")
    assert page.locator("#priority-form").count() == 0
    late = page.request.post(
        f"{live_url}/jobs/{cancelled_id}/priority",
        form={"csrf_token": _csrf(page), "priority": "5"},
    )
    assert late.ok and "Only a job not yet over and not cancelling takes a new priority" in (
        late.text()
    )
    assert _priorities(services, [cancelled_id]) == [0]


def test_a_priority_out_of_range_or_not_a_number_is_a_notice_and_changes_nothing(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    job_ids = _queued_one_at_a_time(services, tenant_a, 2)
    tag_jobs(services.engine, {"sweep": "grid"}, *job_ids)
    job_id = job_ids[1]
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/{job_id}")

    # The browser holds back a number out of range...
    page.fill("#priority-input", "500")
    page.click("#set-priority")
    assert page.eval_on_selector("#priority-input", "el => el.validity.rangeOverflow")
    assert page.url == f"{live_url}/jobs/{job_id}"
    # ...and the server refuses it from a browser that does not.
    page.eval_on_selector("#priority-form", "form => { form.noValidate = true; }")
    page.click("#set-priority")
    expect(page.locator("#notice")).to_have_text(BAD_PRIORITY)
    expect(page.locator("#job-priority")).to_have_text("0")
    for sent in ("ten", "", "101", "-101", "1.5"):
        refused = page.request.post(
            f"{live_url}/jobs/{job_id}/priority", form={"csrf_token": _csrf(page), "priority": sent}
        )
        assert refused.ok and BAD_PRIORITY in refused.text(), sent

    # The same from the jobs table's sweep.
    page.goto(f"{live_url}/jobs?q=sweep%3Dgrid")
    page.fill("#sweep-priority", "-500")
    page.click("#prioritize-sweep")
    assert page.eval_on_selector("#sweep-priority", "el => el.validity.rangeUnderflow")
    page.eval_on_selector("#priority-sweep-form", "form => { form.noValidate = true; }")
    page.click("#prioritize-sweep")
    expect(page.locator("#notice")).to_have_text(BAD_PRIORITY)
    for sent in ("first", "", "1000"):
        refused = page.request.post(
            f"{live_url}/jobs/sweep",
            form={
                "csrf_token": _csrf(page),
                "action": "priority",
                "q": "sweep=grid",
                "priority": sent,
            },
        )
        assert refused.ok and BAD_PRIORITY in refused.text(), sent

    # Above the tenant's cap (`loraforge admin tenant NAME --max-priority 5`): from the page
    # and from the table, a notice and nothing changed.
    with services.engine.begin() as conn:
        conn.execute(
            text("UPDATE tenants SET max_priority = 5 WHERE id = :id"), {"id": tenant_a.tenant_id}
        )
    page.goto(f"{live_url}/jobs/{job_id}")
    page.fill("#priority-input", "6")
    page.click("#set-priority")
    expect(page.locator("#notice")).to_have_text(ABOVE_CAP)
    expect(page.locator("#job-priority")).to_have_text("0")
    page.goto(f"{live_url}/jobs?q=sweep%3Dgrid")
    page.fill("#sweep-priority", "6")
    page.click("#prioritize-sweep")
    expect(page.locator("#notice")).to_have_text(ABOVE_CAP)

    assert _priorities(services, job_ids) == [0, 0]
    assert _priority_events(services, job_id) == []


def test_a_reader_sees_the_priority_is_offered_no_change_and_a_forged_one_is_refused(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    job_ids = _queued_one_at_a_time(services, tenant_a, 2)
    tag_jobs(services.engine, {"sweep": "grid"}, *job_ids)
    job_id = job_ids[1]

    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/jobs/{job_id}")
    expect(page.locator("#job-priority")).to_have_text("0")
    expect(page.locator("#standing-message")).to_have_text(
        "1 job of your own goes first (a higher priority, or submitted earlier)."
    )
    assert page.locator("#priority-form").count() == 0
    token = _csrf(page)
    forged = page.request.post(
        f"{live_url}/jobs/{job_id}/priority", form={"csrf_token": token, "priority": "50"}
    )
    assert forged.status == 403 and "reader role" in forged.text()

    page.goto(f"{live_url}/jobs?q=sweep%3Dgrid")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(2)
    assert page.locator("#sweep-moves").count() == 0
    forged = page.request.post(
        f"{live_url}/jobs/sweep",
        form={"csrf_token": token, "action": "priority", "q": "sweep=grid", "priority": "50"},
    )
    assert forged.status == 403 and "reader role" in forged.text()
    # Without the page's token a writer's session is refused too; another tenant's job is not
    # found.
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_b.member)
    no_token = page.request.post(f"{live_url}/jobs/{job_id}/priority", form={"priority": "50"})
    assert no_token.status == 403
    elsewhere = page.request.post(
        f"{live_url}/jobs/{job_id}/priority", form={"csrf_token": _csrf(page), "priority": "50"}
    )
    assert elsewhere.status == 404

    assert _priorities(services, job_ids) == [0, 0]
    assert _priority_events(services, job_id) == []
