"""Early stopping in the dashboard. The page of a job a real trainer stopped early (on the
tiny base, trained on one word and evaluated on another) says at which step of how many it
stopped and which step's weights its adapter holds, live and once reloaded, and its loss chart
draws; a job that trained every step and kept its last says nothing of it; one that trained
every step but kept an earlier one, or stopped early at its lowest evaluation, says just that.
The New-job form offers the two settings with their help, refuses early stopping without
evaluations or an eval set in the API's words, and submits them as typed; "New job like this"
fills them in as the job was submitted, and says to hold examples out where the job's early
stopping watched a validation file the form cannot carry over."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Page, expect
from pydantic import ValidationError

from control_plane import registry, validation
from control_plane.hyperparameters import Hyperparameters
from control_plane.registry import AdapterVersionRecord
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import jsonl, sign_in, upload
from tests.browser.test_dashboard_job_like import open_like, stored, submit_form, wait_until_queued
from tests.browser.test_dashboard_training import chart_points, job_count, wait_for_points
from tests.factories import (
    ADDITION_CHATS,
    enqueue_jobs,
    make_base,
    make_file,
    register_test_base,
    tag_jobs,
)
from tests.integration.test_early_stopping import EVAL, HP, TRAIN
from tests.integration.test_sweep_stopping import evaluate
from tests.integration.test_trainer import metric_events, run_one
from tests.unit.test_early_stopping import reference
from workers.runner import JobRunner

pytestmark = pytest.mark.browser

BASE = "tiny-test"
FIELDS = ("early_stopping_patience", "early_stopping_threshold")
JOB_PAGE = re.compile(r".*/jobs/ftjob-[^/?]+$")


def train(
    services: Services,
    client: TestClient,
    keys: TenantKeys,
    work_dir: Path,
    records: list[dict[str, Any]],
    validation_records: list[dict[str, Any]],
    hp: Hyperparameters,
    page: Page | None = None,
    live_url: str = "",
    metadata: dict[str, str] | None = None,
) -> str:
    """A job submitted over the API with a validation file and `hp` (every checkpoint at an
    epoch's end), trained to success by a real trainer; with `page`, its job page is open
    (signed in as a member) before the trainer starts, to follow it live. Its id."""
    body = hp.model_dump(mode="json", exclude_defaults=True, exclude={"checkpoint_every_steps"})
    response = client.post(
        "/v1/fine_tuning/jobs",
        headers=keys.headers(),
        json={
            "model": BASE,
            "training_file": upload(client, keys, jsonl(records)),
            "validation_file": upload(client, keys, jsonl(validation_records), "eval.jsonl"),
            "adapter_name": "words",
            "hyperparameters": body,
            "metadata": metadata,
        },
    )
    assert response.status_code == 200, response.text
    job_id = str(response.json()["id"])
    wait_until_queued(services, job_id)
    if page is not None:
        sign_in(page, live_url, keys.member)
        page.goto(f"{live_url}/jobs/{job_id}")
        page.wait_for_selector("#loss-chart[data-ready=true]")
        assert chart_points(page) == 0  # every point must arrive live
        page.evaluate("window.__sameDocument = true")
    runner = JobRunner(services, "browser-trainer", work_dir=work_dir, heartbeat_seconds=0.5)
    assert run_one(runner) == "succeeded"
    return job_id


def version_of(services: Services, job_id: str) -> AdapterVersionRecord:
    with services.engine.connect() as conn:
        version = registry.version_for_job(conn, job_id)
    assert version is not None
    return version


def curve(services: Services, job_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The job's training steps and its evaluations, as its metrics events report them."""
    metrics = metric_events(services, job_id)
    return [m for m in metrics if "train_loss" in m], [m for m in metrics if "eval_loss" in m]


@pytest.fixture
def tiny_base(services: Services) -> str:
    return register_test_base(services.engine, BASE).name


def test_an_early_stopped_job_says_where_it_stopped_and_which_weights_it_kept(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    tiny_base: str,
    tmp_path: Path,
) -> None:
    job_id = train(services, client, tenant_a, tmp_path, TRAIN, EVAL, HP, page, live_url)

    # Where it stopped, of how many, and which evaluation it kept, from its own events.
    steps, evaluations = curve(services, job_id)
    stopped_at, planned = steps[-1]["step"], steps[-1]["total_steps"]
    losses = [e["eval_loss"] for e in evaluations]
    lowest = min(losses)
    kept = evaluations[losses.index(lowest)]["step"]
    stop, best = reference(losses, HP.early_stopping_patience, HP.early_stopping_threshold)
    # The scene: it stopped at the rule's evaluation, well before its last step, and keeps an
    # earlier step's weights than its last.
    assert [s["step"] for s in steps] == list(range(1, stopped_at + 1))
    assert stop is not None and evaluations[stop]["step"] == stopped_at < planned
    assert evaluations[best]["step"] == kept < stopped_at
    metrics = version_of(services, job_id).metrics
    assert metrics["early_stopped"] is True
    assert (metrics["steps"], metrics["weights_from_step"]) == (stopped_at, kept)
    assert metrics["final_eval_loss"] == lowest

    said = [
        f"Stopped early at step {stopped_at} of {planned}: its eval loss had not gone below "
        f"its lowest for {HP.early_stopping_patience} evaluations in a row",
        f"The adapter holds the weights of step {kept}, its lowest eval loss "
        f"({round(lowest, 4)}), not those of its last step.",
    ]
    # Live: the summary the stream redrew when the job succeeded, without a reload.
    paragraph = page.locator("#early-stopping")
    expect(page.locator("#job-status .status")).to_have_text("succeeded")
    for words in said:
        expect(paragraph).to_contain_text(words)
    wait_for_points(page, stopped_at - 1, timeout=30)
    assert page.evaluate("window.__sameDocument") is True
    expect(page.locator("#event-log")).to_contain_text(f"early stopping at step {stopped_at}:")

    # Drawn afresh: the same words, and the chart of every step it trained and evaluated.
    page.reload()
    for words in said:
        expect(paragraph).to_contain_text(words)
    expect(paragraph.locator("code")).to_have_text("early_stopping_patience")
    page.wait_for_selector("#loss-chart[data-ready=true]")
    drawn = {s["step"] for s in steps} | {e["step"] for e in evaluations}
    assert chart_points(page) == len(drawn) == stopped_at
    expect(page.locator("#loss-chart canvas").first).to_be_visible()
    expect(page.locator("#loss-chart .u-legend")).to_contain_text("eval loss")
    expect(page.locator("#chart-note")).to_be_empty()


def open_job(page: Page, live_url: str, keys: TenantKeys, job_id: str) -> None:
    """The finished job's page, its summary drawn (the succeeded job's adapter link)."""
    sign_in(page, live_url, keys.member)
    page.goto(f"{live_url}/jobs/{job_id}")
    expect(page.locator("#adapter-link")).to_be_visible()


def test_a_job_that_trained_every_step_says_nothing_of_early_stopping(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    tiny_base: str,
    tmp_path: Path,
) -> None:
    """Evaluated on its own training text, its eval loss falls at every evaluation: early
    stopping is set, but the job trains every step and publishes its last step's weights."""
    hp = HP.model_copy(update={"learning_rate_multiplier": 10, "n_epochs": 2})
    job_id = train(services, client, tenant_a, tmp_path, TRAIN, TRAIN[:4], hp)
    steps, evaluations = curve(services, job_id)
    losses = [e["eval_loss"] for e in evaluations]
    assert losses == sorted(losses, reverse=True)
    assert steps[-1]["step"] == steps[-1]["total_steps"] == len(steps)
    metrics = version_of(services, job_id).metrics
    assert metrics["early_stopped"] is False
    assert metrics["weights_from_step"] == metrics["steps"] == len(steps)

    open_job(page, live_url, tenant_a, job_id)
    expect(page.locator("#hyperparameters")).to_contain_text("early_stopping_patience")
    expect(page.locator("#early-stopping")).to_have_count(0)
    page.wait_for_selector("#loss-chart[data-ready=true]")
    assert chart_points(page) == len(steps)


def test_a_job_that_trained_every_step_but_kept_an_earlier_one_says_which_it_kept(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    tiny_base: str,
    tmp_path: Path,
) -> None:
    """Patience longer than the job: it trains every step, but its eval loss rose after its
    lowest, so its adapter holds that evaluation's weights; the page says so, and does not
    say it stopped early."""
    hp = HP.model_copy(update={"n_epochs": 2, "early_stopping_patience": 100})
    job_id = train(services, client, tenant_a, tmp_path, TRAIN, EVAL, hp)
    steps, evaluations = curve(services, job_id)
    losses = [e["eval_loss"] for e in evaluations]
    kept = evaluations[losses.index(min(losses))]["step"]
    assert steps[-1]["step"] == steps[-1]["total_steps"] > kept
    metrics = version_of(services, job_id).metrics
    assert metrics["early_stopped"] is False and metrics["weights_from_step"] == kept

    open_job(page, live_url, tenant_a, job_id)
    paragraph = page.locator("#early-stopping")
    expect(paragraph).to_contain_text(
        f"The adapter holds the weights of step {kept}, its lowest eval loss "
        f"({round(min(losses), 4)}), not those of its last step."
    )
    expect(paragraph).not_to_contain_text("Stopped early")


def test_a_job_stopped_early_at_its_lowest_evaluation_says_it_kept_its_last_step(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    tiny_base: str,
    tmp_path: Path,
) -> None:
    """Its eval loss falls at every evaluation, but never by more than a threshold set out of
    reach: the job stops once its patience is spent, at its lowest evaluation, and its adapter
    holds its last step's weights."""
    hp = HP.model_copy(
        update={"learning_rate_multiplier": 10, "n_epochs": 2, "early_stopping_threshold": 100}
    )
    job_id = train(services, client, tenant_a, tmp_path, TRAIN, TRAIN[:4], hp)
    steps, evaluations = curve(services, job_id)
    stopped_at, planned = steps[-1]["step"], steps[-1]["total_steps"]
    losses = [e["eval_loss"] for e in evaluations]
    stop, best = reference(losses, hp.early_stopping_patience, hp.early_stopping_threshold)
    assert stop == best == len(losses) - 1 and losses == sorted(losses, reverse=True)
    assert evaluations[stop]["step"] == stopped_at < planned
    metrics = version_of(services, job_id).metrics
    assert metrics["early_stopped"] is True
    assert metrics["weights_from_step"] == metrics["steps"] == stopped_at

    open_job(page, live_url, tenant_a, job_id)
    paragraph = page.locator("#early-stopping")
    expect(paragraph).to_contain_text(f"Stopped early at step {stopped_at} of {planned}")
    expect(paragraph).to_contain_text(
        f"Its last step's eval loss ({round(losses[-1], 4)}) was its lowest: the adapter holds "
        "its weights."
    )
    expect(paragraph).not_to_contain_text("not those of its last step")


def test_a_job_that_trailed_its_sweep_says_it_stopped_on_its_sweeps_median(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    tiny_base: str,
    tmp_path: Path,
) -> None:
    """Two other jobs of its sweep evaluated far lower at every step: the job stops at its
    first evaluation, and its page says it trailed its sweep, not that its patience ran out."""
    engine = services.engine
    file_id = make_file(engine, tenant_a.tenant_id).id
    peers = enqueue_jobs(engine, tenant_a.tenant_id, make_base(engine).id, file_id, 2)
    for peer in peers:
        services.queue.request_cancel(peer)
        evaluate(engine, peer, {step: 0.01 for step in range(1, 30)})
    tag_jobs(engine, {"sweep": "s"}, *peers)
    hp = HP.model_copy(update={"early_stopping_patience": 0, "sweep_median_stopping": 1})
    job_id = train(services, client, tenant_a, tmp_path, TRAIN, EVAL, hp, metadata={"sweep": "s"})
    steps, _ = curve(services, job_id)
    assert steps[-1]["step"] == 1 < steps[-1]["total_steps"]
    assert version_of(services, job_id).metrics["stopped_by"] == "sweep_median_stopping"
    open_job(page, live_url, tenant_a, job_id)
    paragraph = page.locator("#early-stopping")
    expect(paragraph).to_contain_text(
        f"Stopped early at step 1 of {steps[-1]['total_steps']}: its lowest eval loss was above "
        "the median of the other jobs of its sweep at that step"
    )
    expect(paragraph).not_to_contain_text("evaluations in a row")


def validator_refusal(**hyperparameters: Any) -> str:
    """What the Hyperparameters validator says of these settings."""
    with pytest.raises(ValidationError) as refused:
        Hyperparameters(**hyperparameters)
    (error,) = refused.value.errors()
    return str(error["ctx"]["error"])


def eval_set_refusal(**hyperparameters: Any) -> str:
    """What the API's eval-set check says of these settings without a validation file."""
    with pytest.raises(validation.JobFileError) as refused:
        validation.check_eval_set(Hyperparameters(**hyperparameters), None)
    return refused.value.message


def test_the_new_job_form_offers_early_stopping_and_refuses_it_without_an_eval_set(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
) -> None:
    make_base(services.engine, "tiny-llama")
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/new")

    # The two settings, under "More settings", with their defaults, kinds and help.
    more = page.locator("details:has(summary:text-is('More settings'))")
    for name in FIELDS:
        info = Hyperparameters.model_fields[name]
        field = more.locator(f"#hp-{name}")
        expect(field).to_be_hidden()  # folded away until opened
        expect(field).to_have_attribute("type", "number")
        expect(field).to_have_attribute("step", "1" if info.annotation is int else "any")
        expect(field).to_have_value(str(info.default))
        expect(field).to_have_attribute("aria-describedby", f"help-{name}")
        expect(more.locator(f"label[for=hp-{name}]")).to_contain_text(f"default {info.default}")
        assert info.description
        expect(more.locator(f"#help-{name}")).to_have_text(info.description)

    page.set_input_files(
        "#dataset",
        files=[
            {"name": "sums.jsonl", "mimeType": "application/jsonl", "buffer": jsonl(ADDITION_CHATS)}
        ],
    )
    expect(page.locator("#dataset-ok")).to_contain_text(f"{len(ADDITION_CHATS)} examples")

    def fill(**typed: str) -> None:
        if not more.evaluate("details => details.open"):
            more.locator("summary").click()
        for name, value in typed.items():
            page.fill(f"#hp-{name}", value)
        page.click("#submit-job")
        page.wait_for_load_state()

    # Patience without evaluations: the validator's refusal, the form as typed, nothing queued.
    fill(early_stopping_patience="2", early_stopping_threshold="0.01")
    error = page.locator("#job-form-error")
    expect(error).to_contain_text(validator_refusal(early_stopping_patience=2))
    expect(page.locator("#hp-early_stopping_patience")).to_have_value("2")
    expect(page.locator("#hp-early_stopping_threshold")).to_have_value("0.01")
    assert job_count(services) == 0

    # Evaluations but nothing to evaluate (the form takes no validation file): refused too.
    fill(eval_every_steps="5")
    expect(error).to_contain_text(eval_set_refusal(early_stopping_patience=2, eval_every_steps=5))
    assert job_count(services) == 0

    # With some examples held out: submitted, the settings stored as typed.
    typed = {
        "eval_every_steps": "5",
        "eval_fraction": "0.25",
        "early_stopping_patience": "2",
        "early_stopping_threshold": "0.01",
    }
    fill(eval_fraction="0.25")
    expect(page).to_have_url(JOB_PAGE)  # not the form again, with a refusal
    job_id = page.url.rsplit("/", 1)[1]
    assert job_count(services) == 1
    job = stored(services, job_id)
    assert job.hyperparameters == Hyperparameters(**typed).model_dump(mode="json")
    assert job.validation_file_id is None
    for name in FIELDS:
        expect(page.locator("#hyperparameters tr.changed", has_text=name)).to_contain_text(
            str(job.hyperparameters[name])
        )


def test_a_job_like_one_with_early_stopping_fills_its_settings(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
) -> None:
    base = make_base(services.engine, "tiny-llama").name
    response = client.post(
        "/v1/fine_tuning/jobs",
        headers=tenant_a.headers(),
        json={
            "model": base,
            "training_file": upload(client, tenant_a, jsonl(ADDITION_CHATS)),
            "hyperparameters": {
                "eval_every_steps": 3,
                "eval_fraction": 0.25,
                "early_stopping_patience": 4,
                "early_stopping_threshold": 0.05,
            },
        },
    )
    assert response.status_code == 200, response.text
    original = str(response.json()["id"])
    was = stored(services, original).hyperparameters

    sign_in(page, live_url, tenant_a.member)
    open_like(page, live_url, original)
    for name in (*FIELDS, "eval_every_steps", "eval_fraction"):
        assert was[name] != Hyperparameters.model_fields[name].default, name
        expect(page.locator(f"#hp-{name}")).to_have_value(str(was[name]))

    # Submitted as filled in: the same settings.
    clone = submit_form(page, original)
    assert stored(services, clone).hyperparameters == was


def test_a_job_like_one_that_watched_a_validation_file_says_to_set_eval_fraction(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
) -> None:
    """The form takes no validation file: a job like one whose early stopping watched one says
    to hold examples out instead, is refused as it stands, and submits once it does."""
    base = make_base(services.engine, "tiny-llama").name
    watched = {"eval_every_steps": 3, "early_stopping_patience": 4}
    response = client.post(
        "/v1/fine_tuning/jobs",
        headers=tenant_a.headers(),
        json={
            "model": base,
            "training_file": upload(client, tenant_a, jsonl(ADDITION_CHATS)),
            "validation_file": upload(client, tenant_a, jsonl(ADDITION_CHATS[:4]), "eval.jsonl"),
            "hyperparameters": watched,
        },
    )
    assert response.status_code == 200, response.text
    original = str(response.json()["id"])
    was = stored(services, original).hyperparameters

    sign_in(page, live_url, tenant_a.member)
    open_like(page, live_url, original)
    expect(page.locator("#job-like")).to_contain_text(
        "its validation file is not carried over (the form takes none): set eval_fraction for "
        "early stopping to watch"
    )
    for name in watched:
        expect(page.locator(f"#hp-{name}")).to_have_value(str(was[name]))
    page.click("#submit-job")
    page.wait_for_load_state()
    expect(page.locator("#job-form-error")).to_contain_text(eval_set_refusal(**watched))
    assert job_count(services) == 1

    page.click("summary:text-is('More settings')")
    page.fill("#hp-eval_fraction", "0.25")
    page.click("#submit-job")
    expect(page).to_have_url(JOB_PAGE)  # not the form again, with a refusal
    clone = page.url.rsplit("/", 1)[1]
    assert clone != original
    now = stored(services, clone)
    assert now.hyperparameters == {**was, "eval_fraction": 0.25}
    assert now.validation_file_id is None
