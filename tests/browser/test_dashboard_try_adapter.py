"""The adapter page's "Try it" box in a real browser, against the real interactive executor on
the tiny test base: a member asks a version and its base at once and reads, side by side, the
very replies, finish reasons and token counts that `POST /v1/chat/completions` answers for the
same chat, without the page reloading or the form losing what was typed; the replies show as
they are sampled, and "Stop" stops the executor sampling them; a version whose base no
executor holds is refused in the box with the reason; a reader sees no form and its forged
post is refused; and a field the box cannot take is named with why, with nothing asked."""

from __future__ import annotations

import html
import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, Response, expect
from sqlalchemy import text

from control_plane import trainers
from control_plane.api.routes import chat, chat_stream
from control_plane.dashboard.render import environment
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.factories import register_test_base
from tests.tinker_harness import chat_let_go, publish_adapter_version, tinker_settings

pytestmark = pytest.mark.browser

SYSTEM = "Answer briefly."
MESSAGE = "Name a colour.\nOne word, please."
ASKED_MS = 180_000  # a chat sampled on the CPU, two at once


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # The executor writes a streamed chat's text after every token.
    return tinker_settings(tmp_path).model_copy(update={"chat_stream_every_seconds": 0.0})


def _open_box(page: Page, live_url: str, key: str) -> None:
    """Signed in with `key`, on the page of the adapter `bot`."""
    sign_in(page, live_url, key)
    page.goto(f"{live_url}/adapters/bot")


def _box(
    page: Page, live_url: str, services: Services, tenant: TenantKeys, base: str, adapter: Path
) -> str:
    """A version of `bot` on `base` published, and its page open for the tenant's member: the
    version's model."""
    model = publish_adapter_version(services, tenant.tenant_id, base, adapter, 4)
    _open_box(page, live_url, tenant.member)
    return model


def _calls(services: Services) -> int:
    with services.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM interactive_calls")).scalar_one())


def _csrf(page: Page) -> str:
    return str(
        page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    )


def _ask(page: Page) -> Response:
    """Submit the box; its answer's response, once the page has shown all of it."""
    with page.expect_response(
        lambda r: r.url.endswith("/try") and r.request.method == "POST", timeout=ASKED_MS
    ) as answered:
        page.click("#try-button")
    expect(page.locator("#try-result")).to_have_attribute("data-state", "done", timeout=ASKED_MS)
    return answered.value


def _api(
    live_url: str,
    key: str,
    model: str,
    max_tokens: int = 64,
    system: str | None = SYSTEM,
    **asked: Any,
) -> dict[str, Any]:
    """What the openai-shaped API answers for the box's chat (greedy; `asked`: more fields)."""
    said = [{"role": "user", "content": MESSAGE}]
    answered = httpx.post(
        f"{live_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model,
            "messages": said if system is None else [{"role": "system", "content": system}, *said],
            "max_completion_tokens": max_tokens,
            "temperature": 0,
            **asked,
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

    _open_box(page, live_url, tenant_a.member)
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
    _open_box(page, live_url, tenant_a.member)
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
    model = _box(page, live_url, services, tenant_a, executor, peft_adapter)
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


# Every text the page's adapter reply shows, as it changes, and whether it was still sampled.
_WATCH = """() => {
  window.__shown = [];
  new MutationObserver(() => {
    const side = document.querySelector('#try-adapter');
    const reply = side && side.querySelector('pre.reply');
    if (reply) window.__shown.push([side.classList.contains('sampling'), reply.textContent]);
  }).observe(document.querySelector('#try-result'),
             {childList: true, subtree: true, characterData: true});
}"""


@pytest.mark.usefixtures("paced")
def test_the_replies_show_as_they_are_sampled_and_end_as_the_api_answers(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    executor: str,
    peft_adapter: Path,
) -> None:
    model = _box(page, live_url, services, tenant_a, executor, peft_adapter)
    page.fill("#try-system", SYSTEM)
    page.fill("#try-message", MESSAGE)
    page.fill("#try-max-tokens", "48")
    page.evaluate(_WATCH)
    answered = _ask(page)
    assert answered.headers["content-type"].startswith("application/x-ndjson")

    api = _api(live_url, tenant_a.member, model, max_tokens=48)
    whole = api["choices"][0]["message"]["content"]
    assert len(whole) > 8, whole  # a reply long enough to come in pieces
    expect(page.locator("#try-adapter pre.reply")).to_have_text(whole, use_inner_text=True)
    shown: list[tuple[bool, str]] = page.evaluate("window.__shown")
    sampling = [text for still, text in shown if still]
    # While sampled, the reply grew in pieces, each the beginning of the whole reply.
    pieces = sorted({text for text in sampling if text}, key=len)
    assert len(pieces) >= 2 and pieces[0] != whole, shown
    assert all(whole.startswith(text) for text in sampling), (sampling, whole)
    # It ends as the API answers the same chat, the base's side too.
    expect(page.locator("#try-adapter .finish")).to_have_text(api["choices"][0]["finish_reason"])
    expect(page.locator("#try-adapter .usage")).to_have_attribute(
        "data-completion", str(api["usage"]["completion_tokens"])
    )
    base = _api(live_url, tenant_a.member, executor, max_tokens=48)
    assert (
        page.locator("#try-base pre.reply").text_content()
        == (base["choices"][0]["message"]["content"])
    )
    expect(page.locator(".try-answer.sampling")).to_have_count(0)
    expect(page.locator("#try-stop")).to_be_hidden()
    expect(page.locator("#try-button")).to_be_enabled()


@pytest.mark.usefixtures("paced")
def test_stop_keeps_what_was_sampled_and_the_executor_stops_sampling(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    executor: str,
    peft_adapter: Path,
) -> None:
    """A chat UI's stop: the executor, shared with every tenant, does not sample the rest of
    the reply (512 tokens, paced, would take seconds)."""
    _box(page, live_url, services, tenant_a, executor, peft_adapter)
    page.fill("#try-message", MESSAGE)
    page.fill("#try-max-tokens", "512")
    # Greedy, so the reply cannot end before the stop: the tiny base's greedy reply to this
    # chat is a few newlines, then text that never reaches a stop token in 512 tokens (a draw
    # at temperature 1 ends on one now and then, before or just after its first text).
    page.fill("#try-temperature", "0")
    page.uncheck("#try-compare")
    page.click("#try-button")
    expect(page.locator("#try-stop")).to_be_visible()
    expect(page.locator("#try-button")).to_be_disabled()
    page.wait_for_function(
        "() => (document.querySelector('#try-adapter.sampling pre.reply')"
        " || {textContent: ''}).textContent.length > 0",
        timeout=ASKED_MS,
    )
    page.click("#try-stop")

    expect(page.locator("#try-result")).to_have_attribute("data-state", "done")
    shown = page.locator("#try-adapter")
    expect(shown.locator(".stopped")).to_have_text("stopped: the rest was not sampled")
    assert shown.locator("pre.reply").text_content()  # what came is kept
    expect(page.locator("#try-stop")).to_be_hidden()
    expect(page.locator("#try-button")).to_be_enabled()
    expect(page.locator("#try-message")).to_have_value(MESSAGE)

    # The chat stops early on the executor, is metered for what was sampled, and let go.
    row = chat_let_go(services)
    assert row.status == "completed" and row.stream_left_at is not None, row
    assert 0 < row.usage["sampled_tokens"] < 256, row.usage


def _once_none_waits(services: Services) -> list[tuple[str, Any]]:
    """Each chat's status and request once none waits for an executor (at most 15 s)."""
    deadline = time.monotonic() + 15
    while True:
        with services.engine.connect() as conn:
            rows = conn.execute(text("SELECT status, request FROM interactive_calls")).all()
        if all(row.status != "pending" for row in rows):
            return [(row.status, row.request) for row in rows]
        assert time.monotonic() < deadline, "a stopped chat still waits for an executor"
        time.sleep(0.1)


def test_stop_while_the_chats_wait_for_an_executor_withdraws_them(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, peft_adapter: Path
) -> None:
    """Stopped before any executor took them (the one that holds the base is busy), the box's
    chats are withdrawn at once, not sampled for no one when it comes to them."""
    _box(page, live_url, services, tenant_a, _idle_base(services), peft_adapter)
    page.fill("#try-message", MESSAGE)
    page.click("#try-button")
    expect(page.locator(".try-answer.sampling")).to_have_count(2)
    deadline = time.monotonic() + 30
    while _calls(services) < 2:  # both asked, neither taken
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page.click("#try-stop")
    expect(page.locator(".try-answer .stopped")).to_have_count(2)
    expect(page.locator("#try-button")).to_be_enabled()

    assert _once_none_waits(services) == [("failed", {})] * 2


def _idle_base(services: Services) -> str:
    """A base whose one executor is reported but never takes anything: its name."""
    base = register_test_base(services.engine, "tiny-idle")
    with services.engine.begin() as conn:
        trainers.report(
            conn,
            trainers.TrainerReport(
                "exec-idle", "h", 1, "cpu", resident_base=base.name, kind="interactive"
            ),
        )
    return base.name


def test_stop_while_the_chats_are_still_being_asked_withdraws_them(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    peft_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stopped while the chats' rows are being written (a slow database: each ask held 1.5 s
    after it committed), the chats are withdrawn once asked, not left waiting."""
    ask = chat._ask

    def slow(*args: Any) -> Any:
        asked = ask(*args)
        time.sleep(1.5)
        return asked

    monkeypatch.setattr(chat, "_ask", slow)
    _box(page, live_url, services, tenant_a, _idle_base(services), peft_adapter)
    page.fill("#try-message", MESSAGE)
    page.click("#try-button")
    deadline = time.monotonic() + 30
    while _calls(services) < 2:  # both asked, their asks not yet returned
        assert time.monotonic() < deadline
        time.sleep(0.02)
    page.click("#try-stop")
    expect(page.locator(".try-answer .stopped")).to_have_count(2)
    assert _once_none_waits(services) == [("failed", {})] * 2


def test_the_box_keeps_its_connection_open_while_its_chats_wait_and_says_none_was_taken(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    peft_adapter: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While no executor takes its chats, the answer sends a blank line every keep-alive period
    (a proxy's idle timeout does not cut it); once the chats' wait is over, each side says so."""
    monkeypatch.setattr(chat, "TAKE_SECONDS", 2.0)
    monkeypatch.setattr(chat_stream, "KEEPALIVE_SECONDS", 0.25)
    _box(page, live_url, services, tenant_a, _idle_base(services), peft_adapter)
    form = {"csrf_token": _csrf(page), "version": "1", "message": MESSAGE}
    form |= {"max_tokens": "8", "temperature": "0", "compare": "on"}
    answered = page.request.post(
        f"{live_url}/adapters/bot/try",
        form=form,
        headers={"Accept": "application/x-ndjson"},
        timeout=ASKED_MS,
    )
    lines = answered.text().split("\n")
    events = [json.loads(line) for line in lines if line.strip()]
    assert [e["event"] for e in events] == ["answers", "answer", "answer", "end"]
    first_answer = lines.index(next(line for line in lines if '"event": "answer"' in line))
    assert lines[1:first_answer].count("") >= 4  # 2 s of waiting, a blank line every 0.25 s
    for answer in events[1:3]:
        assert "executor_busy" in answer["html"] and "was withdrawn" in answer["html"]
    with services.engine.connect() as conn:
        rows = conn.execute(text("SELECT status FROM interactive_calls")).scalars().all()
    assert rows == ["failed", "failed"]


def test_a_session_signed_out_meanwhile_asks_to_sign_in_again(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, peft_adapter: Path
) -> None:
    _box(page, live_url, services, tenant_a, _idle_base(services), peft_adapter)
    page.fill("#try-message", MESSAGE)
    page.context.clear_cookies()
    page.click("#try-button")
    page.wait_for_url("**/sign-in**")
    expect(page.locator("#try-result")).to_have_count(0)
    assert _calls(services) == 0


def test_the_box_answers_a_post_without_the_script_whole_and_its_stream_in_order(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    executor: str,
    peft_adapter: Path,
) -> None:
    """The form posted without the page's script (no Accept for the stream) is answered with
    the whole fragment; the script's stream is `answers`, each side's text, its `answer`
    (the same reply), `end`."""
    model = _box(page, live_url, services, tenant_a, executor, peft_adapter)
    form: dict[str, str | float | bool] = {
        "csrf_token": _csrf(page),
        "version": "1",
        "message": MESSAGE,
        "system": SYSTEM,
        "max_tokens": "24",
        "temperature": "0",
    }
    whole = _api(live_url, tenant_a.member, model, max_tokens=24)["choices"][0]["message"]
    posted = page.request.post(f"{live_url}/adapters/bot/try", form=form, timeout=ASKED_MS)
    assert posted.status == 200 and posted.headers["content-type"].startswith("text/html")
    assert whole["content"] in html.unescape(posted.text())

    streamed = page.request.post(
        f"{live_url}/adapters/bot/try",
        form=form,
        headers={"Accept": "application/x-ndjson"},
        timeout=ASKED_MS,
    )
    assert streamed.status == 200
    events = [json.loads(line) for line in streamed.text().splitlines() if line.strip()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "answers" and kinds[-2:] == ["answer", "end"], kinds
    assert set(kinds[1:-2]) <= {"text"}
    assert 'class="try-answer sampling" id="try-adapter"' in events[0]["html"]
    said = "".join(e["text"] for e in events if e["event"] == "text")
    assert said == whole["content"]
    assert all(e["side"] == "adapter" for e in events[1:-1])
    assert said in html.unescape(events[-2]["html"])
    assert 'class="finish"' in events[-2]["html"]


def _api_logprobs(live_url: str, key: str, model: str, max_tokens: int) -> list[dict[str, Any]]:
    """The content logprobs the API answers for the box's chat (no system message, greedy)
    with its five likeliest tokens a place."""
    body = _api(live_url, key, model, max_tokens, None, logprobs=True, top_logprobs=5)
    content: list[dict[str, Any]] = body["choices"][0]["logprobs"]["content"]
    return content


def _band(logprob: float) -> str:
    chance = math.exp(logprob)
    return next(
        (
            band
            for floor, band in ((0.9, "likely"), (0.5, "plausible"), (0.2, "doubtful"))
            if chance >= floor
        ),
        "unlikely",
    )


def test_token_probabilities_show_each_tokens_chance_as_the_api_answers_it(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    executor: str,
    peft_adapter: Path,
) -> None:
    """Asked with "Token probabilities", each side shows each token of its reply, shaded by how
    likely the model found it, its title the chance and the likeliest tokens in its place: the
    logprobs the API answers for the same chat. Streamed by the page's script and answered
    whole without it alike; not asked, none."""
    visible = environment().filters["visible"]  # a token's text as shown: its whitespace seen
    model = _box(page, live_url, services, tenant_a, executor, peft_adapter)
    page.fill("#try-message", MESSAGE)
    page.fill("#try-max-tokens", "12")
    page.check("#try-probabilities")
    _ask(page)
    for side, asked in (("adapter", model), ("base", executor)):
        api = _api_logprobs(live_url, tenant_a.member, asked, 12)
        shown = page.locator(f"#try-{side} .token-chances .tokens .token")
        expect(shown).to_have_count(len(api))
        logprobs = shown.evaluate_all("spans => spans.map(s => Number(s.dataset.logprob))")
        assert logprobs == pytest.approx([entry["logprob"] for entry in api], abs=1e-4), side
        classes = shown.evaluate_all("spans => spans.map(s => s.className)")
        assert classes == [f"token {_band(entry['logprob'])}" for entry in api]
        title = shown.first.get_attribute("title") or ""
        tenths = math.floor(1000 * math.exp(api[0]["logprob"]) + 1e-6)  # rounded down
        said = "<0.1%" if tenths < 1 else f"{tenths / 10:.1f}%"
        assert title.startswith(f"{visible(api[0]['token'])}: {said}"), title
        assert title.count("%") == 1 + 5, title  # its own chance and its five likeliest
        assert shown.all_text_contents() == [visible(e["token"]) for e in api]

    # Without the page's script, the whole fragment has them too; not asked, none.
    form = {"csrf_token": _csrf(page), "version": "1", "message": MESSAGE, "max_tokens": "12"}
    form |= {"temperature": "0", "probabilities": "on"}
    whole = page.request.post(f"{live_url}/adapters/bot/try", form=form, timeout=ASKED_MS)
    assert whole.status == 200
    assert (
        whole.text().count('class="token ')
        == len(_api_logprobs(live_url, tenant_a.member, model, 12)) + 4
    )  # and the four in the legend
    del form["probabilities"]
    plain = page.request.post(f"{live_url}/adapters/bot/try", form=form, timeout=ASKED_MS)
    assert plain.status == 200 and "token-chances" not in plain.text()
    page.uncheck("#try-probabilities")
    _ask(page)
    expect(page.locator(".token-chances")).to_have_count(0)
