"""The tenants page in a real browser, the platform operators' own: every tenant paged by name
with its jobs counted as the database holds them, limits set and returned to the default from a
row's form (`PATCH /v1/tenants/{name}`'s function), a tenant onboarded from the page whose key
is shown once and signs in, and every refusal (a name taken or malformed, a limit out of range,
a viewer who is not a platform operator's admin, a post without its CSRF token) said on a page
with nothing written."""

from __future__ import annotations

import html
import re
from collections import Counter
from datetime import UTC
from typing import Any

import pytest
from playwright.sync_api import APIResponse, Locator, Page, expect
from sqlalchemy import text

from control_plane.dashboard.routes.tenants import TENANTS_PAGE
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.factories import enqueue_jobs, make_base, make_file, make_tenant

pytestmark = pytest.mark.browser

BAD_LIMITS = (
    "Nothing changed for tenant-b: a running limit is a whole number from 0 to 10,000, a "
    "priority cap one from -100 to 100, an interactive models cap one from 1 to 10,000 and a "
    "checkpoint storage cap a size from 1 byte, in bytes or with a decimal unit (500M, 20G, "
    "1T); leave a field empty for the platform's default."
)
OPERATORS_ONLY = "Administering tenants (their limits and keys) is a platform operator's action"


def _csrf(page: Page) -> str:
    return str(
        page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    )


def _row(page: Page, name: str) -> Locator:
    return page.locator(f"#tenants tbody tr[data-tenant='{name}']")


def _cells(page: Page, name: str) -> list[str]:
    """The row's cells before its form: name, running / limit, queued, succeeded, failed,
    cancelled, max priority, max interactive models, max checkpoint storage, last served, live
    keys."""
    cells = _row(page, name).locator("td").all_inner_texts()
    return [re.sub(r"\s+", " ", c).strip() for c in cells[:11]]


def _listed(page: Page) -> list[str]:
    return [
        str(n)
        for n in page.locator("#tenants tbody tr").evaluate_all(
            "rows => rows.map(r => r.dataset.tenant)"
        )
    ]


def _limits(services: Services, name: str) -> tuple[Any, ...] | None:
    with services.engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT max_running_jobs, max_priority, max_interactive_models, "
                "max_checkpoint_bytes FROM tenants WHERE name = :n"
            ),
            {"n": name},
        ).one_or_none()
    return tuple(row) if row is not None else None


def _tenants(services: Services) -> list[tuple[Any, ...]]:
    """Every tenant with its limits and its keys, by name: what a refusal must leave alone."""
    with services.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                text(
                    "SELECT t.name, t.max_running_jobs, t.max_priority, t.max_interactive_models, "
                    "t.max_checkpoint_bytes, "
                    "(SELECT count(*) FROM api_keys k WHERE k.tenant_id = t.id) "
                    "FROM tenants t ORDER BY t.name"
                )
            )
        ]


def _jobs_by_status(services: Services) -> dict[str, Counter[str]]:
    with services.engine.connect() as conn:
        names = conn.execute(text("SELECT name FROM tenants")).scalars().all()
        statuses = conn.execute(
            text("SELECT t.name, j.status FROM jobs j JOIN tenants t ON t.id = j.tenant_id")
        ).all()
    counted: dict[str, Counter[str]] = {name: Counter() for name in names}
    for name, status in statuses:
        counted[name][status] += 1
    return counted


def _last_served(services: Services) -> dict[str, str]:
    """When the queue last served each tenant, as the page's tables write times."""
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT t.name, s.last_served_at FROM tenants t "
                "LEFT JOIN tenant_queue_stats s ON s.tenant_id = t.id"
            )
        ).all()
    return {name: at.astimezone(UTC).strftime("%b %d %H:%M:%S") if at else "—" for name, at in rows}


def _save_limits(
    page: Page, name: str, running: str, priority: str, interactive: str, storage: str
) -> None:
    row = _row(page, name)
    row.locator("input[name=max_running_jobs]").fill(running)
    row.locator("input[name=max_priority]").fill(priority)
    row.locator("input[name=max_interactive_models]").fill(interactive)
    row.locator("input[name=max_checkpoint_bytes]").fill(storage)
    with page.expect_navigation():
        row.get_by_role("button", name="Save").click()


def _text(response: APIResponse) -> str:
    """A page's text as a person reads it (`'` is `&#39;` in the markup)."""
    return html.unescape(response.text())


def test_an_operator_sees_every_tenant_counted_pages_past_fifty_and_sets_its_limits(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    engine = services.engine
    default = services.settings.max_running_jobs_per_tenant
    default_interactive = services.settings.max_interactive_models_per_tenant
    base_id = make_base(engine, "tiny-tenants").id
    acme = make_tenant(engine, "acme", max_running_jobs=3)
    for tenant_id, count in ((acme.id, 5), (tenant_b.tenant_id, 2)):
        enqueue_jobs(engine, tenant_id, base_id, make_file(engine, tenant_id).id, count)
    # Jobs in every state the page counts: running, succeeded, failed, cancelling, cancelled.
    claimed = [services.queue.claim(f"trainer-{n}") for n in range(4)]
    done, failed, cancelling, _ = [job for job in claimed if job is not None]
    assert services.queue.complete(done.id, done.lease_owner or "") is not None
    assert services.queue.fail(
        failed.id, failed.lease_owner or "", code="boom", message="boom", retryable=False
    )
    services.queue.request_cancel(cancelling.id)
    with engine.connect() as conn:
        queued = conn.execute(text("SELECT id FROM jobs WHERE status = 'queued' LIMIT 1")).scalar()
    services.queue.request_cancel(str(queued))
    counted = _jobs_by_status(services)
    assert sum(c["failed"] + c["cancelled"] + c["succeeded"] for c in counted.values()) == 3

    sign_in(page, live_url, tenant_a.admin)
    page.click("nav a[href='/tenants']")
    page.wait_for_url(f"{live_url}/tenants")
    assert _listed(page) == ["acme", "tenant-a", "tenant-b"]
    served = _last_served(services)
    assert served["tenant-a"] == "—" and served["acme"] != "—"  # acme's jobs were claimed
    for name, jobs in counted.items():
        limit = "3" if name == "acme" else f"{default} (default)"
        assert _cells(page, name) == [
            name,
            f"{jobs['running'] + jobs['cancelling']} / {limit}",
            str(jobs["queued"]),
            str(jobs["succeeded"]),
            str(jobs["failed"]),
            str(jobs["cancelled"]),
            "none (default)",
            f"{default_interactive} (default)",
            "none (default)",
            served[name],
            "0" if name == "acme" else "3",  # the harness's admin, member and reader keys
        ], name
    expect(page.locator("#next-tenants")).to_have_count(0)

    # Fifty-five more: fifty a page, by name, each once, the next page linked from the first.
    for n in range(55):
        make_tenant(engine, f"team-{n:02d}")
    names = sorted([*counted, *(f"team-{n:02d}" for n in range(55))])
    page.reload()
    expect(page.locator("#tenants tbody tr")).to_have_count(TENANTS_PAGE)
    assert _listed(page) == names[:TENANTS_PAGE]
    page.click("#next-tenants")
    page.wait_for_url(re.compile(rf".*/tenants\?after={names[TENANTS_PAGE - 1]}$"))
    assert _listed(page) == names[TENANTS_PAGE:]
    expect(page.locator("#next-tenants")).to_have_count(0)

    # A row's form on the second page sets its limits; the page it comes back to is the same.
    row = _row(page, "tenant-b")
    expect(row.locator("input[name=max_running_jobs]")).to_have_value("")
    _save_limits(page, "tenant-b", "7", "12", "5", "20G")
    page.wait_for_url(re.compile(r".*notice=limits-saved&tenant=tenant-b&after=.*"))
    expect(page.locator("#notice")).to_contain_text("New limits saved for tenant-b")
    assert _limits(services, "tenant-b") == (7, 12, 5, 20 * 10**9)
    assert _cells(page, "tenant-b")[1] == f"{counted['tenant-b']['running']} / 7"
    assert _cells(page, "tenant-b")[6:9] == ["12", "5", "20 GB"]
    expect(row.locator("input[name=max_running_jobs]")).to_have_value("7")
    expect(row.locator("input[name=max_priority]")).to_have_value("12")
    expect(row.locator("input[name=max_interactive_models]")).to_have_value("5")
    expect(row.locator("input[name=max_checkpoint_bytes]")).to_have_value("20G")

    # Emptied, the running limit is the platform's default again (NULL); the caps stay. A cap
    # in plain bytes is shown to read and kept exact in the form.
    _save_limits(page, "tenant-b", "", "12", "5", "1234567")
    expect(row.locator("input[name=max_running_jobs]")).to_have_value("")
    assert _limits(services, "tenant-b") == (None, 12, 5, 1_234_567)
    assert _cells(page, "tenant-b")[1].endswith(f"/ {default} (default)")
    assert _cells(page, "tenant-b")[8] == "1.23 MB"
    expect(row.locator("input[name=max_checkpoint_bytes]")).to_have_value("1234567")
    _save_limits(page, "tenant-b", "0", "", "", "")
    expect(row.locator("input[name=max_priority]")).to_have_value("")
    expect(row.locator("input[name=max_interactive_models]")).to_have_value("")
    expect(row.locator("input[name=max_checkpoint_bytes]")).to_have_value("")
    assert _limits(services, "tenant-b") == (0, None, None, None)
    assert _cells(page, "tenant-b")[6:9] == [
        "none (default)",
        f"{default_interactive} (default)",
        "none (default)",
    ]
    assert _limits(services, "acme") == (3, None, None, None)  # no other row moved


def test_an_operator_creates_a_tenant_whose_key_is_shown_once_and_signs_in_as_it(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/tenants")
    page.fill("#new-tenant-name", "acme")
    page.fill("#new-tenant-running", "2")
    page.fill("#new-tenant-priority", "5")
    page.fill("#new-tenant-interactive", "4")
    page.fill("#new-tenant-checkpoint-bytes", "1.5T")
    page.click("#create-tenant")
    expect(page.locator("#tenant-created h1")).to_have_text("Tenant acme created")
    expect(page.locator("#tenant-created")).to_contain_text("will not be shown again")
    expect(page.locator("#tenant-created")).to_contain_text(
        "loaded interactive models: 4; checkpoint storage: 1.5 TB."
    )
    key = page.locator("#new-key").inner_text()
    assert key.startswith("lf-")
    assert page.url == f"{live_url}/tenants"  # answered in place: the key is in no address
    assert _limits(services, "acme") == (2, 5, 4, 15 * 10**11)

    # Back on the list, the tenant has one live key and the key itself is nowhere.
    page.click("#back-to-tenants")
    assert _cells(page, "acme")[1:] == ["0 / 2", "0", "0", "0", "0", "5", "4", "1.5 TB", "—", "1"]
    assert key not in page.content()

    # The key signs in as the new tenant's admin, who is no platform operator.
    page.context.clear_cookies()
    sign_in(page, live_url, key)
    expect(page.locator("nav details summary")).to_have_text("acme (admin)")
    expect(page.locator("nav a[href='/tenants']")).to_have_count(0)

    # A name taken: the REST API's refusal on the page, the form as sent, nothing written.
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_a.admin)
    before = _tenants(services)
    page.goto(f"{live_url}/tenants")
    page.fill("#new-tenant-name", "tenant-b")
    page.fill("#new-tenant-running", "9")
    page.click("#create-tenant")
    expect(page.locator("#notice")).to_have_text(
        "No tenant was created: a tenant named 'tenant-b' already exists; pick another name"
    )
    expect(page.locator("#new-tenant-name")).to_have_value("tenant-b")
    expect(page.locator("#new-tenant-running")).to_have_value("9")
    expect(page.locator("#new-key")).to_have_count(0)
    assert _tenants(services) == before


def test_limits_or_a_name_the_rest_body_refuses_are_a_notice_and_change_nothing(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    with services.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE tenants SET max_running_jobs = 3, max_priority = 4, "
                "max_interactive_models = 5, max_checkpoint_bytes = 7000 WHERE name = :n"
            ),
            {"n": "tenant-b"},
        )
    before = _tenants(services)
    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/tenants")
    row = _row(page, "tenant-b")

    # The browser holds back a limit out of range...
    running = row.locator("input[name=max_running_jobs]")
    running.fill("20000")
    row.get_by_role("button", name="Save").click()
    assert running.evaluate("el => el.validity.rangeOverflow")
    assert page.url == f"{live_url}/tenants"
    # ...and the server refuses it from a browser that does not.
    running.evaluate("el => { el.removeAttribute('min'); el.removeAttribute('max'); }")
    row.get_by_role("button", name="Save").click()
    page.wait_for_url(re.compile(r".*notice=bad-limits&tenant=tenant-b$"))
    expect(page.locator("#notice")).to_have_text(BAD_LIMITS)
    expect(running).to_have_value("3")
    interactive = row.locator("input[name=max_interactive_models]")
    interactive.fill("0")
    row.get_by_role("button", name="Save").click()
    assert interactive.evaluate("el => el.validity.rangeUnderflow")
    assert page.url.endswith("notice=bad-limits&tenant=tenant-b")  # not posted again
    interactive.fill("5")
    storage = row.locator("input[name=max_checkpoint_bytes]")
    expect(storage).to_have_value("7K")
    storage.fill("20 gigs")
    row.get_by_role("button", name="Save").click()
    assert storage.evaluate("el => el.validity.patternMismatch")
    assert page.url.endswith("notice=bad-limits&tenant=tenant-b")  # not posted again
    for sent in (
        ("-1", "", "", ""),
        ("10001", "", "", ""),
        ("1.5", "", "", ""),
        ("ten", "", "", ""),
        ("", "101", "", ""),
        ("", "-101", "", ""),
        ("", "", "0", ""),
        ("", "", "10001", ""),
        ("", "", "many", ""),
        ("", "", "", "0"),
        ("", "", "", "-20G"),
        ("", "", "", "20 gigs"),
        ("", "", "", "0.5"),
        ("", "", "", "1000001T"),
    ):
        refused = page.request.post(
            f"{live_url}/tenants/tenant-b/limits",
            form={
                "csrf_token": _csrf(page),
                "max_running_jobs": sent[0],
                "max_priority": sent[1],
                "max_interactive_models": sent[2],
                "max_checkpoint_bytes": sent[3],
            },
        )
        assert refused.ok and BAD_LIMITS in _text(refused), sent
    missing = page.request.post(
        f"{live_url}/tenants/nobody/limits",
        form={"csrf_token": _csrf(page), "max_running_jobs": "1", "max_priority": "1"},
    )
    assert missing.status == 404

    # A new tenant with a malformed name or a limit out of range: held back by the browser, and
    # from one that does not, the REST API's message on the page and nothing made.
    page.fill("#new-tenant-name", "no spaces")
    page.click("#create-tenant")
    assert page.eval_on_selector("#new-tenant-name", "el => el.validity.patternMismatch")
    page.eval_on_selector("#new-tenant-form", "form => { form.noValidate = true; }")
    page.click("#create-tenant")
    expect(page.locator("#notice")).to_contain_text(
        "No tenant was created: name: String should match pattern"
    )
    page.eval_on_selector("#new-tenant-form", "form => { form.noValidate = true; }")
    page.fill("#new-tenant-name", "acme")
    page.fill("#new-tenant-running", "10001")
    page.click("#create-tenant")
    expect(page.locator("#notice")).to_have_text(
        "No tenant was created: max_running_jobs: Input should be less than or equal to 10000"
    )
    page.eval_on_selector("#new-tenant-form", "form => { form.noValidate = true; }")
    page.fill("#new-tenant-running", "")
    page.fill("#new-tenant-interactive", "0")
    page.click("#create-tenant")
    expect(page.locator("#notice")).to_have_text(
        "No tenant was created: max_interactive_models: Input should be greater than or equal to 1"
    )
    expect(page.locator("#new-tenant-interactive")).to_have_value("0")
    page.eval_on_selector("#new-tenant-form", "form => { form.noValidate = true; }")
    page.fill("#new-tenant-interactive", "")
    page.fill("#new-tenant-checkpoint-bytes", "20 gigs")
    page.click("#create-tenant")
    expect(page.locator("#notice")).to_have_text(
        "No tenant was created: max_checkpoint_bytes: '20 gigs' is not a size: give bytes, or a "
        "number with K, M, G or T (decimal: 20G is 20,000,000,000 bytes)"
    )
    expect(page.locator("#new-tenant-checkpoint-bytes")).to_have_value("20 gigs")
    page.eval_on_selector("#new-tenant-form", "form => { form.noValidate = true; }")
    page.fill("#new-tenant-checkpoint-bytes", "0")
    page.click("#create-tenant")
    expect(page.locator("#notice")).to_have_text(
        "No tenant was created: max_checkpoint_bytes: Input should be greater than or equal to 1"
    )
    assert _tenants(services) == before


@pytest.mark.parametrize("viewer", ["tenant-b's admin", "tenant-a's member"])
def test_no_one_but_a_platform_operators_admin_sees_the_page_or_may_post_to_it(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    viewer: str,
) -> None:
    before = _tenants(services)
    sign_in(page, live_url, tenant_b.admin if viewer.startswith("tenant-b") else tenant_a.member)
    expect(page.locator("nav a[href='/queue']")).to_be_visible()
    expect(page.locator("nav a[href='/tenants']")).to_have_count(0)
    shown = page.goto(f"{live_url}/tenants")
    assert shown is not None and shown.status == 403
    expect(page.locator("#forbidden")).to_contain_text(OPERATORS_ONLY)
    expect(page.locator("#tenants")).to_have_count(0)

    page.goto(f"{live_url}/jobs")
    token = _csrf(page)
    for path, form in (
        ("/tenants/tenant-b/limits", {"max_running_jobs": "0", "max_priority": "100"}),
        ("/tenants", {"name": "mine-now", "max_running_jobs": "", "max_priority": ""}),
    ):
        refused = page.request.post(f"{live_url}{path}", form={"csrf_token": token, **form})
        assert refused.status == 403 and OPERATORS_ONLY in _text(refused), path
    assert _tenants(services) == before


def test_an_operators_posts_without_the_pages_csrf_token_are_refused(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    before = _tenants(services)
    sign_in(page, live_url, tenant_a.admin)
    expect(page.locator("nav a[href='/tenants']")).to_be_visible()
    for path, form in (
        ("/tenants/tenant-b/limits", {"max_running_jobs": "0", "max_priority": "100"}),
        ("/tenants", {"name": "forged", "max_running_jobs": "", "max_priority": ""}),
    ):
        refused = page.request.post(f"{live_url}{path}", form=form)
        assert refused.status == 403 and "security token (CSRF)" in _text(refused), path
        wrong = page.request.post(f"{live_url}{path}", form={"csrf_token": "0" * 64, **form})
        assert wrong.status == 403, path
    assert _tenants(services) == before
