"""A sweep in the dashboard, in a real browser: the jobs table filtered by `key=value` shows
the jobs whose metadata holds it, and a writer pauses, resumes and cancels the sweep from there
(`POST /jobs/sweep`, the REST routes' own rules); a reader sees the sweep and no button."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.factories import enqueue_jobs, make_base, make_file, tag_jobs

pytestmark = pytest.mark.browser


def _statuses(page: Page) -> list[str]:
    return sorted(page.locator("#jobs-table tbody tr .status").all_inner_texts())


def test_a_sweep_filtered_by_its_metadata_is_paused_resumed_and_cancelled_from_the_table(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    engine, queue = services.engine, services.queue
    base_id = make_base(engine, "tiny-sweep").id
    file_id = make_file(engine, tenant_a.tenant_id).id
    grid = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 6)
    other = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 3)
    untagged = enqueue_jobs(engine, tenant_a.tenant_id, base_id, file_id, 2)
    tag_jobs(services.engine, {"sweep": "grid", "lr": "3e-4"}, *grid)
    tag_jobs(services.engine, {"sweep": "other"}, *other)
    first, second = queue.claim("w1"), queue.claim("w2")
    assert first is not None and second is not None and {first.id, second.id} <= set(grid)
    assert queue.complete(second.id, "w2") is not None

    sign_in(page, live_url, tenant_a.member)
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(11)
    assert page.locator("#cancel-sweep").count() == 0  # no metadata filter, no sweep
    page.fill("#job-search", "sweep=grid")
    expect(rows).to_have_count(6)
    expect(page.locator("#cancel-sweep")).to_have_text("Cancel 5 unfinished job(s) with sweep=grid")
    page.fill("#job-search", "sweep=grid lr=1e-3")  # every pair must match
    expect(page.locator("#no-match")).to_be_visible()
    assert page.locator("#cancel-sweep").count() == 0
    page.fill("#job-search", "sweep=grid lr=3e-4")
    expect(rows).to_have_count(6)

    # Pause the sweep to make way, then resume it.
    expect(page.locator("#pause-sweep")).to_have_text("Pause 5 job(s) with sweep=grid lr=3e-4")
    assert page.locator("#resume-sweep").count() == 0
    page.click("#pause-sweep")
    expect(page.locator("#notice")).to_have_text(
        "Paused 4 job(s); 1 running job(s) pause at their next step, with a checkpoint."
    )
    assert _statuses(page) == ["paused"] * 4 + ["running", "succeeded"]
    assert page.locator("#pause-sweep").count() == 0
    expect(page.locator("#resume-sweep")).to_have_text("Resume 5 job(s) with sweep=grid lr=3e-4")
    page.click("#resume-sweep")
    expect(page.locator("#notice")).to_have_text(
        "Resumed 4 job(s); 1 running job(s) asked to pause go on."
    )
    assert _statuses(page) == ["queued"] * 4 + ["running", "succeeded"]
    assert not queue.heartbeat(first.id, "w1").pause_requested

    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.click("#cancel-sweep")
    expect(page.locator("#notice")).to_have_text(
        "Cancelled 4 job(s); 1 running job(s) stop at their next step."
    )
    assert dialogs and "5 unfinished job(s)" in dialogs[0]
    expect(rows).to_have_count(6)  # still filtered to the sweep
    assert _statuses(page) == ["cancelled"] * 4 + ["cancelling", "succeeded"]
    assert page.locator("#sweep-moves").count() == 0  # nothing left to move
    # The running job stops when its trainer learns it; the row follows live.
    assert queue.finish_cancelled(first.id, "w1") is not None
    expect(page.locator(f"#job-{first.id} .status")).to_have_text("cancelled")

    # A selector no job's metadata could hold moves nothing and says why.
    token = page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    too_long = page.request.post(
        f"{live_url}/jobs/sweep",
        form={"csrf_token": token, "action": "cancel", "q": f"{'k' * 65}=v sweep=other"},
    )
    assert too_long.ok and "Nothing was cancelled" in too_long.text()
    forged = page.request.post(
        f"{live_url}/jobs/sweep",
        form={"csrf_token": "0" * 64, "action": "cancel", "q": "sweep=other"},
    )
    assert forged.status == 403

    # Nothing else moved.
    page.goto(f"{live_url}/jobs")
    page.fill("#job-search", "sweep=other")
    expect(rows).to_have_count(3)
    assert _statuses(page) == ["queued"] * 3
    page.fill("#job-search", "")
    expect(rows).to_have_count(11)
    for job_id in untagged:
        expect(page.locator(f"#job-{job_id} .status")).to_have_text("queued")

    # A reader sees the sweep but is offered no cancel.
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_a.reader)
    page.fill("#job-search", "sweep=other")
    expect(rows).to_have_count(3)
    assert page.locator("#sweep-moves").count() == 0
    token = page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    refused = page.request.post(
        f"{live_url}/jobs/sweep", form={"csrf_token": token, "action": "pause", "q": "sweep=other"}
    )
    assert refused.status == 403 and "reader role" in refused.text()
    page.reload()
    expect(rows).to_have_count(3)
    assert _statuses(page) == ["queued"] * 3
