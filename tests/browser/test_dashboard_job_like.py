""" "New job like this": a job's page links writers to the New-job form filled in as that job
was submitted (base, dataset, adapter name, starting point, every hyperparameter); what the
form cannot carry over is said; the job submitted from it is the original with the change
made. No trainer: the jobs need not run (a parent version is published as a trainer would)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Page, expect

from control_plane import jobs, registry
from control_plane.records import JobRecord
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import jsonl, sign_in, upload
from tests.factories import ADDITION_CHATS, make_base

pytestmark = pytest.mark.browser

BASE = "tiny-llama"
# A job as a person would tune one: values off the defaults in the main fields and under
# "More settings", numbers, floats, switches on, a list of modules and a select.
TUNED = {
    "n_epochs": 2,
    "batch_size": 4,
    "learning_rate_multiplier": 2.5,
    "lora_rank": 8,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "v_proj"],
    "use_rslora": True,
    "lr_scheduler": "linear",
    "gradient_checkpointing": True,
    "seed": 7,
}
DATASET = "#dataset-result input[name=training_file]"


@pytest.fixture
def base(services: Services) -> str:
    """The jobs' base, registered after another one: the form's select must pick it, not take
    the first option."""
    make_base(services.engine, "decoy-base")
    return make_base(services.engine, BASE).name


def submit(client: TestClient, keys: TenantKeys, **body: Any) -> str:
    response = client.post("/v1/fine_tuning/jobs", headers=keys.headers(), json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def stored(services: Services, job_id: str) -> JobRecord:
    with services.engine.connect() as conn:
        job = jobs.get_job_unscoped(conn, job_id)
    assert job is not None
    return job


def wait_until_queued(services: Services, job_id: str, timeout: float = 30) -> None:
    """Until the celery worker has validated the job's files."""
    deadline = time.monotonic() + timeout
    while (status := stored(services, job_id).status) != "queued":
        assert status == "validating_files", status
        assert time.monotonic() < deadline, f"{job_id} stayed {status}"
        time.sleep(0.1)


def open_like(page: Page, live_url: str, job_id: str) -> None:
    """From the job's page, its "New job like this" link to the form it fills."""
    page.goto(f"{live_url}/jobs/{job_id}")
    page.click("#job-like-link")
    page.wait_for_url(re.compile(rf".*/jobs/new\?like={job_id}$"))
    expect(page.locator("#job-like")).to_contain_text(f"Filled in as {job_id} was submitted")
    expect(page.locator("#job-like a")).to_have_attribute("href", f"/jobs/{job_id}")


def submit_form(page: Page, original: str) -> str:
    """Submit the form; the new job's id (its page, another job's than `original`)."""
    page.click("#submit-job")
    page.wait_for_load_state()
    error = page.locator("#job-form-error")
    assert error.count() == 0, error.text_content()
    page.wait_for_url(re.compile(r".*/jobs/ftjob-[^/?]+$"))
    new_id = page.url.rsplit("/", 1)[1]
    assert new_id != original
    expect(page.locator("h1")).to_have_text(new_id)
    return new_id


def publish(
    services: Services,
    client: TestClient,
    keys: TenantKeys,
    base: str,
    work_dir: Path,
    name: str,
    hyperparameters: dict[str, Any],
) -> registry.AdapterVersionRecord:
    """A job submitted over the API with `hyperparameters`, claimed and published as `name`'s
    next version as a trainer publishes one, its lineage holding what the job stored."""
    job_id = submit(
        client,
        keys,
        model=base,
        training_file=upload(client, keys, jsonl(ADDITION_CHATS)),
        adapter_name=name,
        hyperparameters=hyperparameters,
    )
    wait_until_queued(services, job_id)
    job = services.queue.claim("trainer-1")
    assert job is not None and job.id == job_id
    adapter = work_dir / job.id
    adapter.mkdir()
    stored_hp = job.hyperparameters
    config = {
        "peft_type": "LORA",
        "r": stored_hp["lora_rank"],
        "lora_alpha": stored_hp["lora_alpha"],
        "target_modules": stored_hp["target_modules"],
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    published = registry.publish_job_adapter(
        services,
        job=job,
        worker_id="trainer-1",
        adapter_dir=adapter,
        lineage={
            "job_id": job.id,
            "tenant_id": job.tenant_id,
            "base_model": {"name": base},
            "hyperparameters": job.hyperparameters,
            "parent_version": None,
        },
        metrics={},
    )
    assert published is not None
    return published.version


def publish_parent(
    services: Services, client: TestClient, keys: TenantKeys, base: str, tmp_path: Path
) -> registry.AdapterVersionRecord:
    """`parent@1`: a job with lora_rank 8 (and alpha 16 on two modules), published."""
    shape = {"lora_rank": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    version = publish(services, client, keys, base, tmp_path, "parent", shape)
    assert version.model_id == "parent@1"
    assert version.lineage["hyperparameters"]["lora_rank"] == 8
    return version


def test_a_job_like_another_is_the_original_with_the_one_change_made(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    base: str,
) -> None:
    file_id = upload(client, tenant_a, jsonl(ADDITION_CHATS))
    original = submit(
        client,
        tenant_a,
        model=base,
        training_file=file_id,
        adapter_name="sums",
        hyperparameters=TUNED,
    )
    sign_in(page, live_url, tenant_a.member)
    open_like(page, live_url, original)

    # Every field as the job was submitted.
    expect(page.locator("#model")).to_have_value(base)
    expect(page.locator("#adapter_name")).to_have_value("sums")
    expect(page.locator("#continue_from")).to_have_value("")
    expect(page.locator(DATASET)).to_have_value(file_id)
    expect(page.locator("#hp-n_epochs")).to_have_value("2")
    expect(page.locator("#hp-batch_size")).to_have_value("4")
    expect(page.locator("#hp-learning_rate_multiplier")).to_have_value("2.5")
    expect(page.locator("#hp-lora_rank")).to_have_value("8")
    expect(page.locator("#hp-lora_dropout")).to_have_value("0.05")
    expect(page.locator("#hp-target_modules")).to_have_value("q_proj, v_proj")
    expect(page.locator("#hp-use_rslora")).to_be_checked()
    expect(page.locator("#hp-use_dora")).not_to_be_checked()
    expect(page.locator("#hp-gradient_checkpointing")).to_be_checked()
    expect(page.locator("#hp-lr_scheduler")).to_have_value("linear")
    expect(page.locator("#hp-seed")).to_have_value("7")
    expect(page.locator("#hp-method")).to_have_value("supervised")
    # Nothing to say but where it came from.
    expect(page.locator("#job-like")).not_to_contain_text("deleted")
    expect(page.locator("#job-like")).not_to_contain_text("validation file")

    page.fill("#hp-n_epochs", "4")
    clone = submit_form(page, original)

    was, now = stored(services, original), stored(services, clone)
    assert now.hyperparameters == {**was.hyperparameters, "n_epochs": 4}
    assert was.hyperparameters["n_epochs"] == 2  # the change was the one made
    assert (now.base_model_id, now.training_file_id, now.adapter_name) == (
        was.base_model_id,
        file_id,
        "sums",
    )
    assert now.validation_file_id is None and now.parent_version_id is None
    # As the API answers it, too.
    answered = client.get(f"/v1/fine_tuning/jobs/{clone}", headers=tenant_a.headers()).json()
    assert answered["model"] == base and answered["training_file"] == file_id


def test_a_job_like_a_continued_one_continues_from_the_same_version_and_submits(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    base: str,
    tmp_path: Path,
) -> None:
    parent = publish_parent(services, client, tenant_a, base, tmp_path)
    file_id = upload(client, tenant_a, jsonl(ADDITION_CHATS))
    continued = submit(
        client,
        tenant_a,
        model=base,
        training_file=file_id,
        continue_from="parent@1",
        hyperparameters={"n_epochs": 2, "lora_rank": 8},
    )
    was = stored(services, continued)
    assert was.parent_version_id == parent.id
    assert was.hyperparameters["lora_rank"] == 8 and was.hyperparameters["lora_alpha"] == 16

    sign_in(page, live_url, tenant_a.member)
    open_like(page, live_url, continued)
    expect(page.locator("#continue_from")).to_have_value("parent@1")
    expect(page.locator("#hp-lora_rank")).to_have_value("8")
    expect(page.locator("#hp-lora_alpha")).to_have_value("16.0")
    expect(page.locator("#hp-target_modules")).to_have_value("q_proj, v_proj")
    expect(page.locator(DATASET)).to_have_value(file_id)

    # The form sends "8" and "16.0", as typed: the parent's 8 and 16.0, not another shape.
    page.fill("#hp-n_epochs", "5")
    clone = submit_form(page, continued)
    now = stored(services, clone)
    assert now.parent_version_id == parent.id
    assert now.hyperparameters == {**was.hyperparameters, "n_epochs": 5}


def test_what_the_form_cannot_carry_over_is_said(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    base: str,
) -> None:
    # A job whose training file was deleted (once the job was over: a cancelled one).
    gone = upload(client, tenant_a, jsonl(ADDITION_CHATS))
    orphan = submit(client, tenant_a, model=base, training_file=gone, adapter_name="orphan")
    cancelled = client.post(f"/v1/fine_tuning/jobs/{orphan}/cancel", headers=tenant_a.headers())
    assert cancelled.status_code == 200, cancelled.text
    deleted = client.delete(f"/v1/files/{gone}", headers=tenant_a.headers())
    assert deleted.status_code == 200, deleted.text
    # A job with a validation file.
    kept = upload(client, tenant_a, jsonl(ADDITION_CHATS))
    validated = submit(
        client,
        tenant_a,
        model=base,
        training_file=kept,
        validation_file=upload(client, tenant_a, jsonl(ADDITION_CHATS[:4]), "eval.jsonl"),
    )

    sign_in(page, live_url, tenant_a.member)
    open_like(page, live_url, orphan)
    expect(page.locator("#job-like")).to_contain_text("its training file was deleted")
    assert page.locator(DATASET).count() == 0
    expect(page.locator("#adapter_name")).to_have_value("orphan")
    expect(page.locator("#job-like")).not_to_contain_text("validation file")
    page.click("#submit-job")  # no dataset chosen: refused, as any form without one
    expect(page.locator("#job-form-error")).to_contain_text("Choose a dataset first")

    open_like(page, live_url, validated)
    expect(page.locator("#job-like")).to_contain_text("its validation file is not carried over")
    expect(page.locator("#job-like")).not_to_contain_text("deleted")
    expect(page.locator(DATASET)).to_have_value(kept)


def test_a_job_like_one_whose_parent_version_was_deleted_says_so(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    base: str,
    tmp_path: Path,
) -> None:
    """The version it continued from, deleted once the job was over: the form says so rather
    than silently starting a fresh LoRA."""
    publish_parent(services, client, tenant_a, base, tmp_path)
    continued = submit(
        client,
        tenant_a,
        model=base,
        training_file=upload(client, tenant_a, jsonl(ADDITION_CHATS)),
        continue_from="parent@1",
    )
    cancelled = client.post(f"/v1/fine_tuning/jobs/{continued}/cancel", headers=tenant_a.headers())
    assert cancelled.status_code == 200, cancelled.text
    deleted = client.delete("/v1/adapters/parent/versions/1", headers=tenant_a.headers())
    assert deleted.status_code == 200, deleted.text

    sign_in(page, live_url, tenant_a.member)
    open_like(page, live_url, continued)
    expect(page.locator("#continue_from")).to_have_value("")
    expect(page.locator("#job-like")).to_contain_text(
        "the adapter version it continued from was deleted"
    )


def test_readers_get_no_link_and_another_tenants_job_is_the_same_404_as_a_missing_one(
    live_url: str,
    page: Page,
    client: TestClient,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    base: str,
) -> None:
    own = submit(
        client,
        tenant_a,
        model=base,
        training_file=upload(client, tenant_a, jsonl(ADDITION_CHATS)),
    )
    theirs = submit(
        client,
        tenant_b,
        model=base,
        training_file=upload(client, tenant_b, jsonl(ADDITION_CHATS)),
        adapter_name="theirs",
    )
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/jobs/{own}")
    expect(page.locator("#job-summary")).to_be_visible()
    assert page.locator("#job-like-link").count() == 0

    page.context.clear_cookies()
    sign_in(page, live_url, tenant_a.member)
    page.goto(f"{live_url}/jobs/{own}")
    expect(page.locator("#job-like-link")).to_have_attribute("href", f"/jobs/new?like={own}")
    for like in (theirs, "ftjob-missing"):
        response = page.goto(f"{live_url}/jobs/new?like={like}")
        assert response is not None and response.status == 404
        expect(page.locator("#not-found")).to_be_visible()
        assert page.locator("#job-form").count() == 0
    missing = page.request.get(f"{live_url}/jobs/new?like=ftjob-missing")
    theirs_page = page.request.get(f"{live_url}/jobs/new?like={theirs}")
    assert missing.status == theirs_page.status == 404
    assert missing.text() == theirs_page.text()
    assert theirs not in theirs_page.text() and "theirs" not in theirs_page.text()


def test_an_adapters_versions_are_compared_by_the_jobs_that_trained_them(
    live_url: str,
    page: Page,
    client: TestClient,
    services: Services,
    tenant_a: TenantKeys,
    base: str,
    tmp_path: Path,
) -> None:
    """An adapter page with versions trained by jobs links to the comparison of those jobs,
    newest version first: a rerun with one change reads as that one column."""
    first = publish(services, client, tenant_a, base, tmp_path, "grid", {"n_epochs": 2})
    second = publish(services, client, tenant_a, base, tmp_path, "grid", {"n_epochs": 4})
    assert (first.model_id, second.model_id) == ("grid@1", "grid@2")
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/adapters/grid")
    page.click("#compare-versions")
    page.wait_for_url(re.compile(r".*/jobs/compare\?job=.*"))
    rows = page.locator("#compare-table tbody tr")
    expect(rows).to_have_count(2)
    assert [r.get_attribute("data-job-id") for r in rows.all()] == [second.job_id, first.job_id]
    headers = page.locator("#compare-table thead th[data-param]")
    expect(headers).to_have_text(["n_epochs"])
    expect(page.locator(f"tr[data-job-id='{second.job_id}'] td.adapter")).to_have_text("grid@2")

    # One version (another adapter): nothing to compare, no link.
    publish(services, client, tenant_a, base, tmp_path, "single", {})
    page.goto(f"{live_url}/adapters/single")
    expect(page.locator("h1")).to_have_text("single")
    assert page.locator("#compare-versions").count() == 0
