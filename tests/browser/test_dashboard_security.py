"""The dashboard's security promises, in a real browser: the session cookie, CSP, CSRF,
escaping, tenancy and roles."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import BrowserContext, Page, expect

from control_plane import tenants
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import jsonl, sign_in, upload
from tests.factories import ADDITION_CHATS

pytestmark = pytest.mark.browser

XSS = "<img src=x onerror=alert(1)>.jsonl"


def create_job(
    client: TestClient, keys: TenantKeys, base: str, file_id: str, **extra: object
) -> str:
    response = client.post(
        "/v1/fine_tuning/jobs",
        headers=keys.headers(),
        json={"model": base, "training_file": file_id, **extra},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def test_a_wrong_key_is_a_clear_message_and_the_session_cookie_is_signed_httponly_strict(
    live_url: str, page: Page, context: BrowserContext, tenant_a: TenantKeys
) -> None:
    page.goto(f"{live_url}/jobs")
    page.wait_for_url(re.compile(r".*/sign-in\?next=%2Fjobs$"))
    page.fill("#api_key", "lf-not-a-key")
    page.click("button[type=submit]")
    expect(page.locator("#sign-in-error")).to_contain_text("unknown or revoked")

    sign_in(page, live_url, tenant_a.admin)
    expect(page.locator("#jobs-empty")).to_contain_text("Start a job")
    cookie = next(c for c in context.cookies() if c["name"] == "lf_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert tenant_a.admin not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # nothing readable by script

    page.click("summary:has-text('tenant-a')")
    page.click("#sign-out")
    page.wait_for_url(re.compile(r".*/sign-in$"))
    page.goto(f"{live_url}/jobs")
    page.wait_for_url(re.compile(r".*/sign-in\?next=.*"))


def test_a_revoked_keys_session_ends_at_the_next_request(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    sign_in(page, live_url, tenant_a.member)
    with services.engine.begin() as conn:
        principal = tenants.authenticate(conn, services.settings.secret_key, tenant_a.member)
        assert principal is not None
        assert tenants.revoke_api_key(conn, tenant_a.tenant_id, principal.key_id)
    page.goto(f"{live_url}/adapters")
    page.wait_for_url(re.compile(r".*/sign-in\?next=%2Fadapters$"))


def test_pages_carry_a_strict_csp_and_refuse_framing(live_url: str) -> None:
    response = httpx.get(f"{live_url}/sign-in")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "frame-ancestors 'none'" in csp
    assert response.headers["x-frame-options"] == "DENY"


def test_an_xss_file_name_renders_as_text_and_no_dialog_fires(
    live_url: str, page: Page, client: TestClient, tenant_a: TenantKeys, base_name: str
) -> None:
    file_id = upload(client, tenant_a, jsonl(ADDITION_CHATS), name=XSS)
    job_id = create_job(client, tenant_a, base_name, file_id, adapter_name="xss-check")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/jobs/{job_id}")
    expect(page.locator("#training-file .filename")).to_have_text(XSS)
    assert page.locator("#training-file img").count() == 0

    page.goto(f"{live_url}/jobs/new")
    page.set_input_files(
        "#dataset", files=[{"name": XSS, "mimeType": "application/jsonl", "buffer": b"{oops\n"}]
    )
    expect(page.locator("#dataset-error .filename")).to_have_text(XSS)
    assert page.locator("#dataset-result img").count() == 0
    assert dialogs == []


def test_a_state_changing_request_without_the_csrf_token_is_refused(
    live_url: str, page: Page, client: TestClient, tenant_a: TenantKeys, base_name: str
) -> None:
    job_id = create_job(
        client, tenant_a, base_name, upload(client, tenant_a, jsonl(ADDITION_CHATS))
    )
    sign_in(page, live_url, tenant_a.admin)
    # The browser sends its session cookie (same site), but not the page's token.
    refused = page.request.post(f"{live_url}/jobs/{job_id}/cancel", form={"x": "1"})
    assert refused.status == 403
    forged = page.request.post(f"{live_url}/jobs/{job_id}/cancel", form={"csrf_token": "0" * 64})
    assert forged.status == 403
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant_a.headers()).json()
    assert job["status"] not in ("cancelled", "cancelling")


def test_another_tenants_ids_are_the_same_404_as_missing_ones(
    live_url: str,
    page: Page,
    client: TestClient,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base_name: str,
) -> None:
    theirs = create_job(
        client, tenant_b, base_name, upload(client, tenant_b, jsonl(ADDITION_CHATS))
    )
    sign_in(page, live_url, tenant_a.admin)
    for path in (f"/jobs/{theirs}", "/jobs/job-missing", "/adapters/nothing-here"):
        response = page.goto(f"{live_url}{path}")
        assert response is not None and response.status == 404
        expect(page.locator("#not-found")).to_contain_text("belongs to someone else")
    missing = page.request.get(f"{live_url}/jobs/job-missing")
    theirs_page = page.request.get(f"{live_url}/jobs/{theirs}")
    assert missing.status == theirs_page.status == 404
    assert missing.text() == theirs_page.text()


def test_a_reader_sees_no_cancel_button_and_the_server_refuses_it_anyway(
    live_url: str, page: Page, client: TestClient, tenant_a: TenantKeys, base_name: str
) -> None:
    job_id = create_job(
        client, tenant_a, base_name, upload(client, tenant_a, jsonl(ADDITION_CHATS))
    )
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/jobs/{job_id}")
    expect(page.locator("#job-summary")).to_be_visible()
    assert page.locator("#cancel-job").count() == 0
    token = page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    refused = page.request.post(f"{live_url}/jobs/{job_id}/cancel", form={"csrf_token": token})
    assert refused.status == 403
    assert "reader role" in refused.text()
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenant_a.headers()).json()
    assert job["status"] not in ("cancelled", "cancelling")
    page.goto(f"{live_url}/jobs/new")
    expect(page.locator("#reader-notice")).to_be_visible()
    assert page.locator("#job-form").count() == 0


def test_sign_in_needs_its_form_token_and_never_redirects_off_site(
    live_url: str, tenant_a: TenantKeys
) -> None:
    with httpx.Client(base_url=live_url) as client:
        form = client.get("/sign-in")
        token = form.cookies["lf_signin"]
        assert f'value="{token}"' in form.text
        forged = client.post(
            "/sign-in", data={"api_key": tenant_a.admin, "signin": "forged", "next": "/jobs"}
        )
        assert forged.status_code == 403 and "lf_session" not in forged.cookies
        for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
            client.cookies.set("lf_signin", token)
            signed_in = client.post(
                "/sign-in", data={"api_key": tenant_a.admin, "signin": token, "next": target}
            )
            assert signed_in.status_code == 303
            assert signed_in.headers["location"] == "/jobs"
            client.cookies.delete("lf_session")
