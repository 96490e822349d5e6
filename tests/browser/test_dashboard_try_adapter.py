"""The adapter page's "Try it" box in a real browser, against the real interactive executor on
the tiny test base: a member asks a version and its base at once and reads, side by side, the
very replies, finish reasons and token counts that `POST /v1/chat/completions` answers for the
same chat, without the page reloading or the form losing what was typed; a version whose base
no executor holds is refused in the box with the reason; a reader sees no form and its forged
post is refused; and a field the box cannot take is named with why, with nothing asked."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, Response, expect
from sqlalchemy import text

from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.factories import register_test_base
from tests.tinker_harness import publish_adapter_version

pytestmark = pytest.mark.browser

SYSTEM = "Answer briefly."
MESSAGE = "Name a colour.\nOne word, please."
ASKED_MS = 180_000  # a chat sampled on the CPU, two at once


def _calls(services: Services) -> int:
    with services.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM interactive_calls")).scalar_one())


def _csrf(page: Page) -> str:
    return str(
        page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    )


def _ask(page: Page) -> Response:
    """Submit the box; the fragment's answer, once htmx has it."""
    with page.expect_response(
        lambda r: r.url.endswith("/try") and r.request.method == "POST", timeout=ASKED_MS
    ) as answered:
        page.click("#try-button")
    return answered.value


def _api(live_url: str, key: str, model: str, max_tokens: int = 64) -> dict[str, Any]:
    """What the openai-shaped API answers for the box's chat."""
    answered = httpx.post(
        f"{live_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model,
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": MESSAGE},
            ],
            "max_completion_tokens": max_tokens,
            "temperature": 0,
        },
        timeout=ASKED_MS / 1000,
    )
    assert answered.status_code == 200, answered.text
    body: dict[str, Any] = answered.json()
    return body


def test_a_member_asks_a_version_and_its_base_and_reads_what_the_api_answers(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    executor: str,
    peft_adapter: Path,
) -> None:
    publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    newest = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    assert newest == "bot@2"
    moved = httpx.put(
        f"{live_url}/v1/adapters/bot/aliases/prod",
        headers=tenant_a.headers("member"),
        json={"version": 1},
    )
    assert moved.status_code == 200, moved.text

    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/adapters/bot")
    # The newest version chosen; aliases beside their numbers; the defaults.
    expect(page.locator("#try-version")).to_have_value("2")
    assert page.locator("#try-version option").all_inner_texts() == ["bot@2", "bot@1 (prod)"]
    expect(page.locator("#try-max-tokens")).to_have_value("64")
    expect(page.locator("#try-temperature")).to_have_value("0")
    expect(page.locator("#try-compare")).to_be_checked()
    expect(page.locator("#try")).to_contain_text(executor)

    page.evaluate("window.__sameDocument = true")
    page.fill("#try-system", SYSTEM)
    page.fill("#try-message", MESSAGE)
    before = _calls(services)
    answered = _ask(page)
    assert answered.status == 200
    expect(page.locator("#try-adapter")).to_have_attribute("data-model", newest)
    expect(page.locator("#try-base")).to_have_attribute("data-model", executor)
    assert _calls(services) == before + 2  # the version and its base, one chat each

    # Each side is what the API answers for the same chat (greedy: the same tokens).
    for side, model in (("adapter", newest), ("base", executor)):
        api = _api(live_url, tenant_a.member, model)
        [choice] = api["choices"]
        shown = page.locator(f"#try-{side}")
        assert shown.locator("pre.reply").text_content() == choice["message"]["content"], side
        expect(shown.locator(".finish")).to_have_text(choice["finish_reason"])
        usage = shown.locator(".usage")
        for field in ("prompt", "completion", "total"):
            expect(usage).to_have_attribute(f"data-{field}", str(api["usage"][f"{field}_tokens"]))
        assert api["usage"]["completion_tokens"] > 0
    adapter_reply = page.locator("#try-adapter pre.reply").text_content()
    assert adapter_reply != page.locator("#try-base pre.reply").text_content()  # it is applied

    # Side by side, in one answer; the page never reloaded and kept what was typed.
    adapter_box = page.locator("#try-adapter").bounding_box()
    base_box = page.locator("#try-base").bounding_box()
    assert adapter_box is not None and base_box is not None
    assert adapter_box["x"] < base_box["x"] and abs(adapter_box["y"] - base_box["y"]) < 2
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator("#try-message")).to_have_value(MESSAGE)
    expect(page.locator("#try-system")).to_have_value(SYSTEM)
    expect(page.locator("#try-button")).to_be_enabled()


def test_a_version_whose_base_no_executor_holds_is_refused_in_the_box_with_the_reason(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, peft_adapter: Path
) -> None:
    base = register_test_base(services.engine, "tiny-unserved")
    publish_adapter_version(services, tenant_a.tenant_id, base.name, peft_adapter, 4)
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/adapters/bot")
    page.fill("#try-message", MESSAGE)
    answered = _ask(page)
    assert answered.status == 200  # a refusal is the fragment's, never a 500
    for side in ("adapter", "base"):
        shown = page.locator(f"#try-{side}")
        expect(shown.locator(".refusal")).to_contain_text(
            "no interactive executor holds base 'tiny-unserved' now"
        )
        expect(shown.locator(".refusal")).to_contain_text("loraforge interactive --base")
        expect(shown.locator(".refusal-code")).to_have_text("no_executor")
        expect(shown.locator("pre.reply")).to_have_count(0)
    expect(page.locator("#try-message")).to_have_value(MESSAGE)
    assert _calls(services) == 0


def test_a_reader_sees_no_box_and_its_forged_post_is_refused(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    peft_adapter: Path,
) -> None:
    base = register_test_base(services.engine, "tiny-unserved")
    publish_adapter_version(services, tenant_a.tenant_id, base.name, peft_adapter, 4)
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/adapters/bot")
    expect(page.locator("#try-form")).to_have_count(0)
    expect(page.locator("#try-reader")).to_contain_text("needs a member or admin key")
    form: dict[str, str | float | bool] = {
        "csrf_token": _csrf(page),
        "version": "1",
        "message": "hi",
        "max_tokens": "4",
        "temperature": "0",
        "compare": "on",
    }
    refused = page.request.post(f"{live_url}/adapters/bot/try", form=form, max_redirects=0)
    assert refused.status == 403
    assert "needs a member or admin key" in html.unescape(refused.text())
    assert "try-adapter" not in refused.text()

    # A member's post without the page's token, and another tenant's, are refused as well.
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_a.member)
    unsigned = {k: v for k, v in form.items() if k != "csrf_token"}
    refused = page.request.post(f"{live_url}/adapters/bot/try", form=unsigned, max_redirects=0)
    assert refused.status == 403 and "CSRF" in refused.text()
    page.context.clear_cookies()
    sign_in(page, live_url, tenant_b.admin)
    form["csrf_token"] = _csrf(page)
    missing = page.request.post(f"{live_url}/adapters/bot/try", form=form, max_redirects=0)
    assert missing.status == 404
    assert _calls(services) == 0


def test_a_field_the_box_cannot_take_is_named_with_why_and_nothing_is_asked(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    executor: str,
    peft_adapter: Path,
) -> None:
    model = publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/adapters/bot")
    page.evaluate("window.__sameDocument = true")
    before = _calls(services)

    # No message, and max tokens 0: both named, nothing asked, the fields as they were.
    page.fill("#try-max-tokens", "0")
    assert _ask(page).status == 200
    errors = page.locator("#try-errors li")
    expect(errors).to_have_count(2)
    expect(errors.nth(0)).to_have_text("Message: type the message to send")
    expect(errors.nth(1)).to_have_text("Max tokens: a whole number from 1 to 512")
    expect(page.locator("#try-max-tokens")).to_have_value("0")
    assert _calls(services) == before

    # Past the box's cap, and a temperature out of range.
    page.fill("#try-message", MESSAGE)
    page.fill("#try-max-tokens", "513")
    page.fill("#try-temperature", "2.5")
    assert _ask(page).status == 200
    expect(errors).to_have_count(2)
    expect(errors.nth(0)).to_contain_text("Max tokens: a whole number from 1 to 512")
    expect(errors.nth(1)).to_contain_text("Temperature: a number from 0 to 2")
    expect(page.locator("#try-message")).to_have_value(MESSAGE)
    assert _calls(services) == before

    # A version the adapter does not have (the page was old): said, nothing asked.
    form: dict[str, str | float | bool] = {
        "csrf_token": _csrf(page),
        "version": "9",
        "message": "hi",
        "max_tokens": "4",
        "temperature": "0",
    }
    unknown = page.request.post(f"{live_url}/adapters/bot/try", form=form)
    assert unknown.status == 200
    assert "bot has no version 9" in unknown.text()
    assert _calls(services) == before

    # Fixed, and not compared: the version alone is asked, once.
    page.fill("#try-max-tokens", "4")
    page.fill("#try-temperature", "0")
    page.uncheck("#try-compare")
    assert _ask(page).status == 200
    expect(page.locator("#try-adapter")).to_have_attribute("data-model", model)
    expect(page.locator("#try-errors")).to_have_count(0)
    expect(page.locator("#try-base")).to_have_count(0)
    sampled = page.locator("#try-adapter .usage").get_attribute("data-completion")
    assert sampled is not None and 1 <= int(sampled) <= 4
    assert _calls(services) == before + 1
    assert page.evaluate("window.__sameDocument") is True
