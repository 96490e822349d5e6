"""The webhooks page in a real browser, a tenant's admins' own: an endpoint registered from the
page whose signing secret is shown once and verifies what a real receiver got; its delivery log
showing every answer, twenty a page, a failed delivery sent again from its row; a URL the
platform will not post to refused with nothing written; a deleted endpoint gone from the list,
its log read-only and taking no new event; and every viewer who may not (a member, a reader,
another tenant's admin, a post without its CSRF token) refused on a page with nothing
written."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import APIResponse, Dialog, Locator, Page, expect
from sqlalchemy import text

from control_plane import webhooks
from control_plane.dashboard.routes.webhooks import DELIVERIES_PAGE
from control_plane.queue import JobQueue
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.factories import enqueue_jobs, make_base, make_file
from tests.integration.test_wakeups import _wait_for
from tests.integration.test_webhooks import Receiver

pytestmark = pytest.mark.browser

ADMINS_ONLY = "Webhooks are managed by the tenant's admins"
SCHEDULE = [0.05]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver()
    yield started
    started.server.shutdown()


def _csrf(page: Page) -> str:
    return str(
        page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    )


def _text(response: APIResponse) -> str:
    """A page's text as a person reads it (`'` is `&#39;` in the markup)."""
    return html.unescape(response.text())


def _deliver(services: Services) -> int:
    return webhooks.deliver_due(
        services.engine, retry_schedule=SCHEDULE, timeout=5, allow_private=True
    )


def _deliver_until(services: Services, done: Callable[[], bool], what: str) -> None:
    """Delivery passes until `done` (a retry's delay going by between them)."""
    _wait_for(lambda: _deliver(services) >= 0 and done(), what, timeout=10)


def _endpoints(services: Services, tenant_id: str) -> list[tuple[Any, ...]]:
    """The tenant's endpoints as stored: id, url, event types, description, deleted."""
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, url, event_types, description, disabled_at IS NOT NULL "
                "FROM webhook_endpoints WHERE tenant_id = :t ORDER BY created_at, id"
            ),
            {"t": tenant_id},
        )
        return [tuple(r) for r in rows]


def _deliveries(services: Services) -> list[tuple[Any, ...]]:
    """Every delivery as stored: endpoint, event type, the event's data id, status, attempts."""
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT endpoint_id, event_type, payload -> 'data' ->> 'id', status, attempts "
                "FROM webhook_deliveries ORDER BY created_at, id"
            )
        )
        return [tuple(r) for r in rows]


def _status(services: Services, delivery_id: str) -> str:
    with services.engine.connect() as conn:
        return str(
            conn.execute(
                text("SELECT status FROM webhook_deliveries WHERE id = :id"), {"id": delivery_id}
            ).scalar_one()
        )


def _register(page: Page, live_url: str, url: str, *events: str, description: str = "") -> str:
    """Register an endpoint from the page's form; the secret the answer shows."""
    page.goto(f"{live_url}/webhooks")
    page.fill("#new-webhook-url", url)
    page.fill("#new-webhook-description", description)
    for event in events:
        page.check(f"#new-webhook-events input[value='{event}']")
    page.click("#create-webhook")
    expect(page.locator("#webhook-created")).to_contain_text("will not be shown again")
    return page.locator("#webhook-secret").inner_text()


def _row(page: Page, webhook_id: str) -> Locator:
    return page.locator(f"#webhooks tbody tr[data-webhook='{webhook_id}']")


def _log(page: Page) -> list[list[str]]:
    """The delivery log's rows as read: event, of, status, attempts, last answer, created,
    next attempt, and the row's button."""
    return [
        [re.sub(r"\s+", " ", c).strip() for c in row.locator("td").all_inner_texts()]
        for row in page.locator("#deliveries tbody tr").all()
    ]


def _listed(page: Page) -> list[str]:
    return [
        str(w)
        for w in page.locator("#webhooks tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.webhook)"
        )
    ]


def test_an_admin_registers_an_endpoint_sees_its_secret_once_and_its_test_event_arrives_signed(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, receiver: Receiver
) -> None:
    sign_in(page, live_url, tenant_a.admin)
    page.click("nav a[href='/webhooks']")
    page.wait_for_url(f"{live_url}/webhooks")
    expect(page.locator("#webhooks-empty")).to_be_visible()
    secret = _register(
        page, live_url, receiver.url + "/hook", "fine_tuning.job.succeeded", description="ci"
    )
    assert secret.startswith("whsec_")
    assert page.url == f"{live_url}/webhooks"  # answered in place: the secret is in no address
    [(webhook_id, *stored)] = _endpoints(services, tenant_a.tenant_id)
    assert stored == [receiver.url + "/hook", ["fine_tuning.job.succeeded"], "ci", False]

    # On the list: the endpoint as registered, and the secret nowhere.
    page.click("#back-to-webhooks")
    row = _row(page, webhook_id)
    cells = [re.sub(r"\s+", " ", c).strip() for c in row.locator("td").all_inner_texts()]
    assert cells[:3] == [receiver.url + "/hook", "fine_tuning.job.succeeded", "ci"]
    assert secret not in page.content()

    # A test event from the row: due now, in the log; one pass posts it, and the log says so.
    row.get_by_role("button", name="Send test event").click()
    page.wait_for_url(f"{live_url}/webhooks/{webhook_id}?notice=test-sent")
    expect(page.locator("#notice")).to_contain_text("A webhook.test event is due now")
    [pending] = _log(page)
    assert pending[:5] == ["webhook.test", webhook_id, "pending", "0", "—"]
    assert _deliver(services) == 1
    page.reload()
    [delivered] = _log(page)
    assert delivered[:5] == ["webhook.test", webhook_id, "delivered", "1", "HTTP 200"]
    assert delivered[6] == "—"  # no next attempt once delivered

    # The receiver got it, signed with the very secret the page showed.
    [(headers, body)] = receiver.to("/hook")
    sdk = openai.OpenAI(api_key="x", webhook_secret=secret)
    sdk.webhooks.verify_signature(body, headers)
    assert json.loads(body)["type"] == "webhook.test"
    delivery_id = page.locator("#deliveries tbody tr").get_attribute("data-delivery")
    assert headers["webhook-id"] == delivery_id
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.verify_signature(body.replace(b"webhook.test", b"webhook.tost"), headers)


def test_a_failing_endpoints_delivery_shows_its_last_answer_and_a_retry_from_the_page_delivers_it(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, receiver: Receiver
) -> None:
    receiver.answers = [500] * 5
    sign_in(page, live_url, tenant_a.admin)
    _register(page, live_url, receiver.url + "/flaky")
    [(webhook_id, *_)] = _endpoints(services, tenant_a.tenant_id)
    page.click("#back-to-webhooks")
    expect(_row(page, webhook_id).locator("td").nth(1)).to_have_text("every event")
    _row(page, webhook_id).get_by_role("button", name="Send test event").click()
    page.wait_for_url(re.compile(r".*notice=test-sent$"))
    delivery_id = str(page.locator("#deliveries tbody tr").get_attribute("data-delivery"))

    # Tried once, then once more after the schedule's one delay: failed, with the last answer.
    _deliver_until(services, lambda: _status(services, delivery_id) == "failed", "failed")
    assert len(receiver.to("/flaky")) == 2
    page.reload()
    [failed] = _log(page)
    assert failed[2:5] == ["failed", "2", "HTTP 500: no"]
    assert failed[6:] == ["—", "Retry"]
    assert _deliver(services) == 0  # failed: not tried again by itself

    # The receiver mended, Retry from the row: pending again, the next pass delivers it.
    receiver.answers.clear()
    page.locator("#deliveries").get_by_role("button", name="Retry").click()
    page.wait_for_url(f"{live_url}/webhooks/{webhook_id}?notice=retried")
    expect(page.locator("#notice")).to_contain_text("The delivery is due again now")
    [pending] = _log(page)
    assert pending[2:4] == ["pending", "2"] and pending[6] != "—" and pending[7] == ""
    assert _deliver(services) == 1
    page.reload()
    [delivered] = _log(page)
    assert delivered[2:5] == ["delivered", "3", "HTTP 200"]
    posted = receiver.to("/flaky")
    assert len(posted) == 3 and {h["webhook-id"] for h, _ in posted} == {delivery_id}

    # A retry of one no longer failed (a second tab's form) sends nothing and says why.
    refused = page.request.post(
        f"{live_url}/webhooks/{webhook_id}/deliveries/{delivery_id}/retry",
        form={"csrf_token": _csrf(page)},
    )
    assert refused.ok and "only a failed delivery can be retried" in _text(refused)
    assert _status(services, delivery_id) == "delivered"
    assert _deliver(services) == 0 and len(receiver.to("/flaky")) == 3


def test_a_refused_url_creates_nothing_and_a_deleted_endpoint_keeps_its_log_and_takes_no_event(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, receiver: Receiver
) -> None:
    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/webhooks")
    page.fill("#new-webhook-url", "ftp://x")
    page.fill("#new-webhook-description", "kept as sent")
    page.check("#new-webhook-events input[value='fine_tuning.job.failed']")
    with page.expect_response(lambda r: r.request.method == "POST") as answer:
        page.click("#create-webhook")
    assert answer.value.status == 400
    expect(page.locator("#notice")).to_have_text(
        "No endpoint was registered: url must be an absolute http:// or https:// URL with a host"
    )
    expect(page.locator("#new-webhook-url")).to_have_value("ftp://x")
    expect(page.locator("#new-webhook-description")).to_have_value("kept as sent")
    expect(
        page.locator("#new-webhook-events input[value='fine_tuning.job.failed']")
    ).to_be_checked()
    expect(page.locator("#webhook-secret")).to_have_count(0)
    bad_event = page.request.post(
        f"{live_url}/webhooks",
        form={"csrf_token": _csrf(page), "url": receiver.url, "event_types": "job.done"},
    )
    assert bad_event.status == 400
    assert "No endpoint was registered: event_types.0: Input should be" in _text(bad_event)
    assert _endpoints(services, tenant_a.tenant_id) == []

    # Two endpoints; the one deleted had a test event pending, which fails with it.
    _register(page, live_url, receiver.url + "/gone")
    _register(page, live_url, receiver.url + "/kept")
    (gone, *_), (kept, *_) = _endpoints(services, tenant_a.tenant_id)
    page.request.post(f"{live_url}/webhooks/{gone}/test", form={"csrf_token": _csrf(page)})
    page.goto(f"{live_url}/webhooks")
    dialogs: list[str] = []

    def confirm(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", confirm)
    _row(page, gone).get_by_role("button", name="Delete").click()
    page.wait_for_url(f"{live_url}/webhooks?notice=deleted")
    assert dialogs and receiver.url + "/gone" in dialogs[0]
    expect(page.locator("#notice")).to_contain_text("The endpoint was deleted")
    assert _listed(page) == [kept]
    assert [e[4] for e in _endpoints(services, tenant_a.tenant_id)] == [True, False]

    # Its log still reads, saying it was deleted, with nothing to send or retry.
    page.goto(f"{live_url}/webhooks/{gone}")
    expect(page.locator("#webhook-deleted")).to_contain_text("This endpoint was deleted")
    expect(page.locator("#send-test")).to_have_count(0)
    [test] = _log(page)
    assert test[:5] == ["webhook.test", gone, "failed", "0", "the endpoint was deleted"]
    assert test[7] == ""  # no Retry
    for action in ("test", "delete"):
        again = page.request.post(
            f"{live_url}/webhooks/{gone}/{action}", form={"csrf_token": _csrf(page)}
        )
        assert again.ok and "this endpoint was deleted" in _text(again), action

    # A job cancelled now writes its event for the live endpoint only.
    base_id = make_base(services.engine, "tiny-webhooks").id
    file_id = make_file(services.engine, tenant_a.tenant_id).id
    [job] = enqueue_jobs(services.engine, tenant_a.tenant_id, base_id, file_id, 1)
    JobQueue(services.engine).request_cancel(job)
    assert [d[:3] for d in _deliveries(services) if d[2] == job] == [
        (kept, "fine_tuning.job.cancelled", job)
    ]
    page.goto(f"{live_url}/webhooks/{kept}")
    expect(page.locator(f"#deliveries a[href='/jobs/{job}']")).to_have_text(job)
    page.goto(f"{live_url}/webhooks/{gone}")
    assert len(_log(page)) == 1


def test_the_delivery_log_pages_twenty_at_a_time_newest_first(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    with services.engine.begin() as conn:
        endpoint = webhooks.create_endpoint(conn, tenant_a.tenant_id, "https://example.com/h")
    made = []
    for _ in range(DELIVERIES_PAGE + 3):
        with services.engine.begin() as conn:  # one transaction each: each its own time
            made.append(webhooks.enqueue_test(conn, endpoint).id)
    newest_first = made[::-1]

    def shown() -> list[str]:
        return [
            str(d)
            for d in page.locator("#deliveries tbody tr").evaluate_all(
                "rows => rows.map(r => r.dataset.delivery)"
            )
        ]

    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/webhooks/{endpoint.id}")
    assert shown() == newest_first[:DELIVERIES_PAGE]
    page.click("#older-deliveries")
    page.wait_for_url(
        f"{live_url}/webhooks/{endpoint.id}?after={newest_first[DELIVERIES_PAGE - 1]}"
    )
    assert shown() == newest_first[DELIVERIES_PAGE:]
    expect(page.locator("#older-deliveries")).to_have_count(0)
    missing = page.goto(f"{live_url}/webhooks/{endpoint.id}?after=msg_nobody")
    assert missing is not None and missing.status == 404


def _failed_delivery(
    client: TestClient, services: Services, keys: TenantKeys, receiver: Receiver
) -> tuple[str, str]:
    """An endpoint of the tenant's (through the REST API) with one failed delivery."""
    created = client.post("/v1/webhooks", json={"url": receiver.url}, headers=keys.headers())
    webhook_id = str(created.json()["id"])
    test = client.post(f"/v1/webhooks/{webhook_id}/test", headers=keys.headers())
    receiver.answers = [500]
    webhooks.deliver_due(services.engine, retry_schedule=[], timeout=5, allow_private=True)
    delivery_id = str(test.json()["id"])
    assert _status(services, delivery_id) == "failed"
    return webhook_id, delivery_id


def _posts(webhook_id: str, delivery_id: str) -> list[tuple[str, dict[str, str | float | bool]]]:
    """Every post the pages take, each with a form that would change something."""
    return [
        ("/webhooks", {"url": "https://example.com/mine", "description": "x"}),
        (f"/webhooks/{webhook_id}/test", {}),
        (f"/webhooks/{webhook_id}/deliveries/{delivery_id}/retry", {}),
        (f"/webhooks/{webhook_id}/delete", {}),
    ]


@pytest.mark.parametrize("role", ["member", "reader"])
def test_a_member_or_a_reader_sees_no_webhooks_link_and_is_refused_the_pages_and_posts(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    receiver: Receiver,
    role: str,
) -> None:
    webhook_id, delivery_id = _failed_delivery(client, services, tenant_a, receiver)
    before = (_endpoints(services, tenant_a.tenant_id), _deliveries(services))
    sign_in(page, live_url, getattr(tenant_a, role))
    expect(page.locator("nav a[href='/queue']")).to_be_visible()
    expect(page.locator("nav a[href='/webhooks']")).to_have_count(0)
    for path in ("/webhooks", f"/webhooks/{webhook_id}"):
        shown = page.goto(f"{live_url}{path}")
        assert shown is not None and shown.status == 403, path
        expect(page.locator("#forbidden")).to_contain_text(ADMINS_ONLY)
        expect(page.locator("#forbidden")).to_contain_text("needs an API key with the admin role")

    page.goto(f"{live_url}/jobs")
    token = _csrf(page)
    for path, form in _posts(webhook_id, delivery_id):
        refused = page.request.post(
            f"{live_url}{path}", form={"csrf_token": token, **form}, max_redirects=0
        )
        assert refused.status == 403 and ADMINS_ONLY in _text(refused), path
    assert (_endpoints(services, tenant_a.tenant_id), _deliveries(services)) == before


def test_another_tenants_admin_gets_the_not_found_page_for_an_endpoint_and_its_posts(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    receiver: Receiver,
) -> None:
    webhook_id, delivery_id = _failed_delivery(client, services, tenant_a, receiver)
    before = (_endpoints(services, tenant_a.tenant_id), _deliveries(services))
    sign_in(page, live_url, tenant_b.admin)
    expect(page.locator("nav a[href='/webhooks']")).to_be_visible()
    page.goto(f"{live_url}/webhooks")
    expect(page.locator("#webhooks-empty")).to_be_visible()  # tenant-a's endpoint not listed
    token = _csrf(page)
    shown = page.goto(f"{live_url}/webhooks/{webhook_id}")
    assert shown is not None and shown.status == 404
    expect(page.locator("#not-found")).to_be_visible()
    for path, form in _posts(webhook_id, delivery_id)[1:]:
        refused = page.request.post(
            f"{live_url}{path}", form={"csrf_token": token, **form}, max_redirects=0
        )
        assert refused.status == 404, path
    assert (_endpoints(services, tenant_a.tenant_id), _deliveries(services)) == before
    assert _endpoints(services, tenant_b.tenant_id) == []


def test_an_admins_webhook_posts_without_the_pages_csrf_token_are_refused(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    receiver: Receiver,
) -> None:
    webhook_id, delivery_id = _failed_delivery(client, services, tenant_a, receiver)
    before = (_endpoints(services, tenant_a.tenant_id), _deliveries(services))
    sign_in(page, live_url, tenant_a.admin)
    expect(page.locator("nav a[href='/webhooks']")).to_be_visible()
    for path, form in _posts(webhook_id, delivery_id):
        refused = page.request.post(f"{live_url}{path}", form=form, max_redirects=0)
        assert refused.status == 403 and "security token (CSRF)" in _text(refused), path
        wrong = page.request.post(
            f"{live_url}{path}", form={"csrf_token": "0" * 64, **form}, max_redirects=0
        )
        assert wrong.status == 403, path
    assert (_endpoints(services, tenant_a.tenant_id), _deliveries(services)) == before
