"""The dashboard with a real trainer on the tiny test base: start a job from the New-job page,
watch it train without reloading, follow it to its adapter, move an alias; cancel a running
job from its page."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Page, expect
from sqlalchemy import text

from control_plane import base_catalog
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import jsonl, sign_in, upload
from tests.factories import ADDITION_CHATS
from tests.fixtures.testbase import TEST_BASE_PATH
from workers.runner import JobRunner

pytestmark = pytest.mark.browser

BASE = "tiny-test"


@pytest.fixture
def tiny_base(services: Services) -> str:
    with services.engine.begin() as conn:
        base_catalog.register_base_model(
            conn,
            base_catalog.NewBaseModel(name=BASE, source=str(TEST_BASE_PATH), source_kind="dir"),
        )
    return BASE


class Trainer:
    """A real trainer (the runner `loraforge worker` runs in its Ray actors) in a thread,
    started when the test says so."""

    def __init__(self, services: Services, work_dir: Path) -> None:
        self.runner = JobRunner(
            services, "browser-trainer", work_dir=work_dir, heartbeat_seconds=0.5
        )
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=lambda: self.runner.run_forever(self.stop, idle_wait=0.2), daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(60)


@pytest.fixture
def trainer(services: Services, tmp_path: Path) -> Iterator[Trainer]:
    trainer = Trainer(services, tmp_path / "trainer")
    yield trainer
    trainer.close()


def job_count(services: Services) -> int:
    with services.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM jobs")).scalar_one())


def train_steps(services: Services) -> int:
    with services.engine.connect() as conn:
        query = "SELECT count(*) FROM job_events WHERE data ? 'train_loss'"
        return int(conn.execute(text(query)).scalar_one())


def chart_points(page: Page) -> int:
    return int(page.get_attribute("#loss-chart", "data-points") or 0)


def wait_for_points(page: Page, more_than: int, timeout: float = 60) -> int:
    """Polled from here: `wait_for_function` compiles its predicate with eval, which the
    page's CSP forbids."""
    deadline = time.monotonic() + timeout
    while (points := chart_points(page)) <= more_than:
        assert time.monotonic() < deadline, f"the chart stayed at {points} points"
        page.wait_for_timeout(100)
    return points


def test_start_watch_and_promote_a_job_from_the_browser(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tiny_base: str,
    trainer: Trainer,
) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    sign_in(page, live_url, tenant_a.member)
    page.click("a[href='/jobs/new']")

    # A broken dataset: the line and the reason, and nothing stored or queued.
    broken = jsonl(ADDITION_CHATS[:3]) + b'{"messages": "not a list"}\n'
    page.set_input_files(
        "#dataset",
        files=[{"name": "broken.jsonl", "mimeType": "application/jsonl", "buffer": broken}],
    )
    expect(page.locator("#dataset-error-line")).to_have_text("4")
    expect(page.locator("#dataset-error-reason")).not_to_be_empty()
    page.click("#submit-job")
    expect(page.locator("#job-form-error")).to_contain_text("Choose a dataset first")
    assert job_count(services) == 0

    # A good one: its counts; then the form with a few hyperparameters changed.
    good = jsonl(ADDITION_CHATS)
    page.set_input_files(
        "#dataset", files=[{"name": "sums.jsonl", "mimeType": "application/jsonl", "buffer": good}]
    )
    expect(page.locator("#dataset-ok")).to_contain_text("16 examples")
    page.select_option("#model", BASE)
    page.fill("#adapter_name", "sums")
    page.fill("#hp-n_epochs", "6")  # 96 steps of one example
    page.fill("#hp-batch_size", "1")
    page.fill("#hp-learning_rate_multiplier", "5")
    page.fill("#hp-lora_rank", "8")
    page.fill("#hp-max_seq_length", "64")
    page.click("#submit-job")
    page.wait_for_load_state()
    assert page.locator("#job-form-error").count() == 0, page.locator(
        "#job-form-error"
    ).text_content()
    page.wait_for_url(re.compile(r".*/jobs/ftjob-[^/]+$"))
    assert job_count(services) == 1
    page.evaluate("window.__sameDocument = true")
    page.wait_for_selector("#loss-chart[data-ready=true]")
    assert chart_points(page) == 0  # nothing trained yet: every point must arrive live

    # Only now does a trainer pick it up: the page follows the job as it trains.
    trainer.start()
    expect(page.locator("#job-status .status")).to_have_text("succeeded", timeout=300_000)
    steps = train_steps(services)
    assert steps == 96
    wait_for_points(page, steps - 1, timeout=30)
    assert page.evaluate("window.__sameDocument") is True  # never reloaded
    expect(page.locator("#timeline")).to_contain_text("running")
    assert page.locator("#event-log li").count() > steps
    expect(page.locator("#checkpoints")).to_be_visible()

    # Its adapter version; an alias moved there, with the confirmation and the history row.
    page.click("#adapter-link a")
    page.wait_for_url(re.compile(r".*/adapters/sums#v1$"))
    expect(page.locator("#v1 .pull code")).to_have_text("loraforge pull sums@1")
    # The path the tinker SDK samples it by, or starts an interactive run from.
    expect(page.locator("#tinker-1")).to_have_text("tinker://adapters/sums@1")
    expect(page.locator("#v1")).to_contain_text(tiny_base)
    page.fill("#alias-name", "prod")
    page.select_option("#alias-version", "1")
    page.click("#move-alias-button")
    expect(page.locator("#alias-moved")).to_contain_text("prod")
    assert any("Point this alias" in d for d in dialogs)
    history = page.locator("#alias-history tbody tr").first
    expect(history).to_contain_text("prod")
    expect(history.locator("td").nth(3)).to_have_text("1")
    expect(page.locator("#v1 .alias")).to_have_text("prod")


@pytest.fixture
def running_job_page(
    live_url: str,
    page: Page,
    client: TestClient,
    tenant_a: TenantKeys,
    tiny_base: str,
    trainer: Trainer,
) -> str:
    """A long job submitted, the trainer started, and its page open (signed in as a member)
    once the page shows it running; its id."""
    file_id = upload(client, tenant_a, jsonl(ADDITION_CHATS * 4))
    response = client.post(
        "/v1/fine_tuning/jobs",
        headers=tenant_a.headers(),
        json={
            "model": tiny_base,
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 100, "batch_size": 1, "max_seq_length": 64},
        },
    )
    job_id = response.json()["id"]
    trainer.start()
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/{job_id}")
    expect(page.locator("#job-status .status")).to_have_text("running", timeout=120_000)
    return str(job_id)


def test_cancel_a_running_job_from_its_page(page: Page, running_job_page: str) -> None:
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#cancel-job")
    expect(page.locator("#notice")).to_contain_text("Cancel")
    expect(page.locator("#job-status .status")).to_have_text("cancelled", timeout=30_000)
    assert page.locator("#cancel-job").count() == 0


def test_pause_a_running_job_from_its_page_and_resume_it(
    page: Page, services: Services, running_job_page: str
) -> None:
    """The job page's Pause: the running job stops at its next step with a checkpoint and the
    page shows it `paused` without a reload; Resume queues it again and the trainer goes on
    from that checkpoint."""
    job_id = running_job_page
    assert page.locator("#resume-job").count() == 0
    page.click("#pause-job")
    expect(page.locator("#notice")).to_contain_text("Pause requested")
    expect(page.locator("#job-status .status")).to_have_text("paused", timeout=30_000)
    expect(page.locator("#resume-job")).to_be_visible()
    assert page.locator("#pause-job").count() == 0
    with services.engine.connect() as conn:
        checkpoints = conn.execute(
            text("SELECT count(*) FROM job_checkpoints WHERE job_id = :id"), {"id": job_id}
        ).scalar_one()
    assert checkpoints >= 1  # it paused at a checkpoint

    page.click("#resume-job")
    expect(page.locator("#notice")).to_contain_text("queued again")
    expect(page.locator("#job-status .status")).to_have_text("running", timeout=60_000)
    expect(page.locator("#event-log")).to_contain_text("resumed from step", timeout=60_000)


MARK_SUMMARY = "document.getElementById('job-summary').dataset.seen = 'yes'"
SUMMARY_REDRAWN = "() => !document.getElementById('job-summary').dataset.seen"


def test_a_press_on_pause_held_while_the_summary_moves_pauses_the_job(
    page: Page, running_job_page: str
) -> None:
    """The summary is redrawn live as the job trains, and a browser dispatches no click when
    the element pressed leaves the page before the release: a press held across a redraw lost
    the click (Pause did nothing). A redraw now waits for the release."""
    page.evaluate(MARK_SUMMARY)
    page.wait_for_function(SUMMARY_REDRAWN, timeout=30_000)  # redraws arrive
    page.evaluate(MARK_SUMMARY)
    began = time.monotonic()
    page.wait_for_function(SUMMARY_REDRAWN, timeout=30_000)
    every = time.monotonic() - began

    box = page.locator("#pause-job").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.evaluate(MARK_SUMMARY)
    points = int(page.get_attribute("#loss-chart", "data-points") or 0)
    page.mouse.down()
    time.sleep(max(2.0, 3 * every))  # redraws arrive meanwhile
    assert page.evaluate("document.getElementById('job-summary').dataset.seen") == "yes"
    # The stream went on meanwhile: the chart, which is not a redraw, took new points.
    assert int(page.get_attribute("#loss-chart", "data-points") or 0) > points
    page.mouse.up()
    expect(page.locator("#notice")).to_contain_text("Pause requested")
    expect(page.locator("#job-status .status")).to_have_text("paused", timeout=30_000)


def test_a_dpo_job_from_the_form_shows_how_often_the_preferred_reply_wins(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    tiny_base: str,
    trainer: Trainer,
) -> None:
    from tests.integration.test_dpo_recipe import PAIRS

    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/new")
    page.set_input_files(
        "#dataset",
        files=[{"name": "prefs.jsonl", "mimeType": "application/jsonl", "buffer": jsonl(PAIRS)}],
    )
    expect(page.locator("#dataset-ok")).to_contain_text("8 examples")
    page.select_option("#model", BASE)
    page.select_option("#hp-method", "dpo")
    page.fill("#hp-dpo_beta", "0.5")
    page.fill("#hp-n_epochs", "3")
    page.fill("#hp-batch_size", "4")
    page.fill("#hp-learning_rate_multiplier", "10")
    page.fill("#hp-lora_rank", "8")
    page.fill("#hp-max_seq_length", "64")
    page.click("#submit-job")
    page.wait_for_url(re.compile(r".*/jobs/ftjob-[^/]+$"))
    trainer.start()
    expect(page.locator("#job-status .status")).to_have_text("succeeded", timeout=120_000)
    # The live panel, redrawn by the stream as the job trained: the last step's preference.
    expect(page.locator("#job-preference-accuracy")).to_have_text("100.0%")
    margin = float(page.locator("#job-reward-margin").inner_text())
    assert margin > 0.5
