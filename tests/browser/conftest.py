"""Browser tests: the dashboard in real headless Chromium (Debian's `chromium`, driven by
Playwright for Python through `executable_path`), against the real API on a real socket, real
PostgreSQL, a real celery worker and, where a job must train, a real trainer on the tiny base.

A missing browser is a failure, not a skip: `bash scripts/test.sh` installs it as root
(`apt-get install chromium`); elsewhere install it, or leave the tier out with `-m 'not browser'`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright

from tests.api_harness import TenantKeys

CHROMIUM = Path(os.environ.get("LORAFORGE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 15_000
# `expect(...)` does not use the context's default timeout (below): its own is 5 s unless set,
# short for a page's round trip to the API on a busy machine.
expect.set_options(timeout=TIMEOUT_MS)


# Package scope: Playwright's sync API runs an event loop of its own, which is gone before
# the tests that run their own loops (the operator's) start.
@pytest.fixture(scope="package")
def playwright_instance() -> Iterator[Playwright]:
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="package")
def browser(playwright_instance: Playwright) -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium "
            "(apt-get install chromium, which scripts/bootstrap.sh does as root), "
            "or LORAFORGE_CHROMIUM naming another Chromium binary"
        )
    browser = playwright_instance.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
    )
    yield browser
    browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    yield context
    context.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def sign_in(page: Page, url: str, key: str) -> None:
    page.goto(f"{url}/sign-in")
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/jobs$"))


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def upload(client: TestClient, keys: TenantKeys, data: bytes, name: str = "train.jsonl") -> str:
    response = client.post(
        "/v1/files",
        headers=keys.headers(),
        files={"file": (name, data, "application/jsonl")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])
