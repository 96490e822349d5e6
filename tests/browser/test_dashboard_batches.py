"""The Batches page in a real browser: a tenant's batches, created through the official `openai`
SDK, listed newest first with their status and requests done of their total; the table redraws
itself while a batch runs (the test in the executor's place answering its chats, the runner's
passes run as the beat runs them), a finished batch's output file downloads as the JSONL its
requests answered, a batch cancelled from its row ends cancelled, and cancelling one already
over is a notice. Another tenant's batch, or a file a batch does not have, is the 404 page; a
reader sees no Cancel button and its forged post is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Locator, Page, expect

from control_plane.api import batch_runner
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.browser.conftest import TIMEOUT_MS, sign_in
from tests.factories import register_test_base
from tests.integration.test_batches import _chat_line, _upload
from tests.tinker_harness import PlayedExecutor, openai_client, tinker_settings

pytestmark = pytest.mark.browser


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _batch(client: Any, model: str, *custom_ids: str) -> str:
    """A batch of one chat a custom id, created through the SDK: its id."""
    lines = [_chat_line(custom_id, model, "Hello") for custom_id in custom_ids]
    batch = client.batches.create(
        input_file_id=_upload(client, lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    return str(batch.id)


def _row(page: Page, batch_id: str) -> Locator:
    return page.locator(f"#batches tbody tr[data-batch='{batch_id}']")


def _csrf(page: Page) -> str:
    return str(
        page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    )


def test_a_batch_runs_live_on_the_page_downloads_its_output_and_another_is_cancelled_from_its_row(
    live_url: str,
    page: Page,
    browser: Browser,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    tmp_path: Path,
) -> None:
    base = register_test_base(services.engine, "tiny-played")
    played = PlayedExecutor(services, base.id)
    client = openai_client(live_url, tenant_a.member)
    answered = _batch(client, base.name, "row-0", "row-1")
    to_cancel = _batch(client, base.name, "other-0")

    sign_in(page, live_url, tenant_a.member)
    page.click("nav a[href='/batches']")
    expect(page.locator("nav a[href='/batches']")).to_have_attribute("aria-current", "page")
    rows = page.locator("#batches tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.first).to_have_attribute("data-batch", to_cancel)  # newest first
    for batch_id, total in ((answered, 2), (to_cancel, 1)):
        row = _row(page, batch_id)
        expect(row.locator(".batch-status")).to_have_text("in progress")
        expect(row.locator(".batch-done")).to_have_text(f"0 of {total}")
        expect(row.locator(".batch-failed")).to_have_text("0 failed")
        expect(row.locator("progress")).to_have_attribute("value", "0")
        expect(row.locator("progress")).to_have_attribute("max", str(total))
        expect(row).to_contain_text("/v1/chat/completions")
        expect(row).to_contain_text(base.name)
        expect(row.locator(".batch-output, .batch-errors")).to_have_count(0)
    page.evaluate("window.drawnOnce = true")  # gone if the page were loaded again

    # One chat answered and collected: the table redraws itself, with no reload.
    batch_runner.run_due(services)
    played.finish(played.take(), "first")
    batch_runner.run_due(services)
    row = _row(page, answered)
    expect(row.locator(".batch-done")).to_have_text("1 of 2", timeout=TIMEOUT_MS)
    expect(row.locator("progress")).to_have_attribute("value", "1")
    expect(row.locator(".batch-status")).to_have_text("in progress")
    assert page.evaluate("window.drawnOnce") is True

    # The other answered: completed, its output file downloads as the lines' answers.
    played.finish(played.take(), "second")
    batch_runner.run_due(services)
    expect(row.locator(".batch-status")).to_have_text("completed")
    expect(row.locator(".batch-done")).to_have_text("2 of 2")
    expect(row.locator(".batch-errors")).to_have_count(0)
    expect(row.locator("form")).to_have_count(0)  # nothing to cancel
    with page.expect_download() as downloading:
        row.locator(".batch-output").click()
    download = downloading.value
    assert download.suggested_filename == f"{answered}_output.jsonl"
    entries = [json.loads(line) for line in Path(download.path()).read_text().splitlines()]
    assert [e["custom_id"] for e in entries] == ["row-0", "row-1"]
    texts = [e["response"]["body"]["choices"][0]["message"]["content"] for e in entries]
    assert texts == ["first", "second"]
    assert page.evaluate("window.drawnOnce") is True

    # Cancelled from its row, once confirmed: cancelling, then cancelled after the runner's
    # pass withdrew its chat no executor took; its error file says why.
    other = _row(page, to_cancel)
    page.once("dialog", lambda dialog: dialog.accept())
    other.get_by_role("button", name="Cancel").click()
    expect(page.locator("#notice")).to_contain_text("The batch is cancelling")
    other = _row(page, to_cancel)
    expect(other.locator(".batch-status")).to_have_text("cancelling")
    expect(other.locator("form")).to_have_count(0)
    batch_runner.run_due(services)
    expect(other.locator(".batch-status")).to_have_text("cancelled")
    expect(other.locator(".batch-done")).to_have_text("1 of 1")
    expect(other.locator(".batch-failed")).to_have_text("1 failed")
    expect(other.locator(".batch-output")).to_have_count(0)
    # Nothing on the page moves any more: it stops asking.
    expect(page.locator("#batches-table")).not_to_have_attribute("hx-trigger", re.compile(".*"))
    errors = page.request.get(f"{live_url}/batches/{to_cancel}/errors")
    assert errors.status == 200
    [unrun] = [json.loads(line) for line in errors.text().splitlines()]
    assert unrun["custom_id"] == "other-0" and unrun["error"]["code"] == "batch_cancelled"

    # Cancelling a batch that is over changes nothing and says so.
    over = page.request.post(
        f"{live_url}/batches/{answered}/cancel", form={"csrf_token": _csrf(page)}
    )
    assert over.status == 200 and "had ended already" in over.text()
    assert client.batches.retrieve(answered).status == "completed"

    # A file the batch does not have is the 404 page.
    missing = page.goto(f"{live_url}/batches/{to_cancel}/output")
    assert missing is not None and missing.status == 404
    expect(page.locator("#not-found")).to_be_visible()

    # Another tenant sees none of them, and their files are the 404 page for it.
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    stranger = context.new_page()
    sign_in(stranger, live_url, tenant_b.admin)
    stranger.goto(f"{live_url}/batches")
    expect(stranger.locator("#batches-empty")).to_be_visible()
    stranger_cancel = stranger.request.post(
        f"{live_url}/batches/{to_cancel}/cancel", form={"csrf_token": _csrf(stranger)}
    )
    assert stranger_cancel.status == 404
    for path in (f"{answered}/output", f"{to_cancel}/errors"):
        refused = stranger.goto(f"{live_url}/batches/{path}")
        assert refused is not None and refused.status == 404
        expect(stranger.locator("#not-found")).to_contain_text("belongs to someone else")
    context.close()


def test_a_reader_sees_no_cancel_button_and_its_forged_cancel_is_refused(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    base = register_test_base(services.engine, "tiny-played")
    client = openai_client(live_url, tenant_a.member)
    batch_id = _batch(client, base.name, "row-0")
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/batches")
    expect(_row(page, batch_id).locator(".batch-status")).to_have_text("in progress")
    expect(page.get_by_role("button", name="Cancel")).to_have_count(0)
    forged = page.request.post(
        f"{live_url}/batches/{batch_id}/cancel", form={"csrf_token": _csrf(page)}
    )
    assert forged.status == 403 and "needs a writer" in forged.text()
    assert client.batches.retrieve(batch_id).status == "in_progress"
