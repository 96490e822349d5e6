"""The New-job form's sweep section, in a real browser: a member names a sweep and gives up to
three hyperparameters comma-separated values; the form submits the grid as
`POST /v1/fine_tuning/sweeps` does (one job per point, each tagged `sweep=<name>`, the swept
fields' own values unused, the other fields in every job) and lands on the jobs table searched
for the sweep, whose Compare link shows the sweep's jobs side by side. A row half filled, a
sweep without a name or without rows, a bad name, a hyperparameter chosen twice, a point the API
refuses and too many points are refused with what to change, the form as typed and the section
still open, and nothing created; a reader gets no form; a DPO sweep over beta makes one DPO job
per beta."""

from __future__ import annotations

import itertools
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import text

from control_plane import jobs
from control_plane.dashboard.routes.new_job import SWEEP_ROWS, sweepable
from control_plane.hyperparameters import Hyperparameters
from control_plane.records import JobRecord
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import jsonl, sign_in
from tests.factories import ADDITION_CHATS, enqueue_jobs, make_base, make_file
from tests.integration.test_dpo_jobs import PAIRS

pytestmark = pytest.mark.browser

BASE = "tiny-llama"
DATASET = "#dataset-result input[name=training_file]"
SECTION = "#sweep-section"


@pytest.fixture
def base(services: Services) -> str:
    """The jobs' base, registered after another one: the form's select must pick it."""
    make_base(services.engine, "decoy-base")
    return make_base(services.engine, BASE).id


def tenant_jobs(services: Services, tenant_id: str) -> list[JobRecord]:
    with services.engine.connect() as conn:
        found, more = jobs.list_jobs(conn, tenant_id, after=None, limit=100)
    assert not more
    return found


def job_count(services: Services) -> int:
    with services.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM jobs")).scalar_one())


def open_form(page: Page, live_url: str, keys: TenantKeys, records: list[dict[str, Any]]) -> str:
    """Signed in as a member, the New-job form with `records` chosen as the dataset (validated
    as it is chosen), the base picked: the dataset's file id."""
    sign_in(page, live_url, keys.member)
    page.goto(f"{live_url}/jobs/new")
    page.set_input_files(
        "#dataset",
        files=[{"name": "data.jsonl", "mimeType": "application/jsonl", "buffer": jsonl(records)}],
    )
    expect(page.locator("#dataset-ok")).to_contain_text(f"{len(records)} examples")
    page.select_option("#model", BASE)
    return str(page.locator(DATASET).get_attribute("value"))


def fill_sweep(page: Page, name: str, rows: list[tuple[str, str]]) -> None:
    """Open the sweep section (closed until then) and type the name and the rows, the rows
    not given left empty."""
    section = page.locator(SECTION)
    if not section.evaluate("details => details.open"):
        section.locator("summary").click()
    page.fill("#sweep_name", name)
    for row in range(1, SWEEP_ROWS + 1):
        param, values = rows[row - 1] if row <= len(rows) else ("", "")
        page.select_option(f"#sweep_param_{row}", param)
        page.fill(f"#sweep_values_{row}", values)


def submit(page: Page) -> int:
    """Submit the form: the status of the page the browser lands on."""
    with page.expect_navigation() as navigation:
        page.click("#submit-job")
    response = navigation.value
    assert response is not None
    return response.status


def test_a_sweep_from_the_form_makes_one_job_per_point_and_opens_the_table_searched_for_it(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, base: str
) -> None:
    # A job of the tenant's outside the sweep: the table searched for the sweep leaves it out.
    (outside,) = enqueue_jobs(
        services.engine,
        tenant_a.tenant_id,
        base,
        make_file(services.engine, tenant_a.tenant_id).id,
        1,
    )
    file_id = open_form(page, live_url, tenant_a, ADDITION_CHATS)
    page.fill("#hp-n_epochs", "2")
    page.fill("#hp-batch_size", "4")
    page.fill("#hp-lora_dropout", "0.05")
    page.fill("#hp-learning_rate_multiplier", "3")  # swept: this value is not used
    page.fill("#hp-lora_rank", "32")  # swept too

    # The section is folded away until opened; it offers what can be swept, not the method.
    expect(page.locator("#sweep_name")).to_be_hidden()
    offered = page.locator("#sweep_param_1 option").evaluate_all("os => os.map(o => o.value)")
    assert offered == ["", *sweepable()]
    assert {"learning_rate_multiplier", "lora_rank", "dpo_beta"} <= set(offered)
    assert "method" not in offered and "target_modules" not in offered
    fill_sweep(
        page, "lr-rank", [("learning_rate_multiplier", "0.5, 1,2"), ("lora_rank", " 8 , 16")]
    )
    assert submit(page) == 200
    expect(page).to_have_url(f"{live_url}/jobs?q=sweep%3Dlr-rank")
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(6)
    shown = {str(r.get_attribute("id")).removeprefix("job-") for r in rows.all()}

    # Stored: one job per point of the grid, the swept fields the grid's values, the others
    # as typed in every job, each tagged with the sweep alone.
    made = [j for j in tenant_jobs(services, tenant_a.tenant_id) if j.id != outside]
    assert {j.id for j in made} == shown and len(made) == 6
    points = list(itertools.product([0.5, 1.0, 2.0], [8, 16]))
    swept = ("learning_rate_multiplier", "lora_rank")
    assert sorted(tuple(j.hyperparameters[n] for n in swept) for j in made) == sorted(points)
    for job in made:
        lr, rank = (job.hyperparameters[n] for n in swept)
        assert job.hyperparameters == Hyperparameters(
            n_epochs=2, batch_size=4, lora_dropout=0.05, learning_rate_multiplier=lr, lora_rank=rank
        ).model_dump(mode="json")
        assert job.hyperparameters["learning_rate_multiplier"] != 3
        assert job.hyperparameters["lora_rank"] != 32
        assert job.user_metadata == {"sweep": "lr-rank"}
        assert (job.base_model_id, job.training_file_id) == (base, file_id)

    # The table's Compare link: the six jobs, with the two swept columns.
    link = page.locator("a#compare-jobs")
    expect(link).to_be_visible()
    href = urlsplit(str(link.get_attribute("href")))
    assert href.path == "/jobs/compare" and parse_qs(href.query) == {"q": ["sweep=lr-rank"]}
    link.click()
    page.wait_for_url(re.compile(r".*/jobs/compare\?"))
    compared = page.locator("#compare-table tbody tr")
    expect(compared).to_have_count(6)
    assert {str(r.get_attribute("data-job-id")) for r in compared.all()} == shown
    columns = page.locator("#compare-table thead th[data-param]")
    assert sorted(str(th.get_attribute("data-param")) for th in columns.all()) == [
        "learning_rate_multiplier",
        "lora_rank",
    ]
    for job in made:
        row = page.locator(f'#compare-table tbody tr[data-job-id="{job.id}"]')
        for name in ("learning_rate_multiplier", "lora_rank"):
            expect(row.locator(f'td[data-param="{name}"]')).to_have_text(
                str(job.hyperparameters[name])
            )


# pydantic's own dump of its errors, which a refusal on the page must not read as.
PYDANTIC_DUMP = re.compile(r"validation error for|errors\.pydantic\.dev|\[type=|Value error, ")


# What is typed in the sweep section (its name, its rows), and what the refusal says.
REFUSED = [
    pytest.param(
        "lr",
        [("learning_rate_multiplier", "")],
        ["Sweep row 1: choose a hyperparameter and give its values, separated by commas."],
        id="a row without values",
    ),
    pytest.param(
        "lr",
        [("learning_rate_multiplier", "0.5, 1"), ("", "8, 16")],
        ["Sweep row 2: choose a hyperparameter and give its values, separated by commas."],
        id="values without a hyperparameter",
    ),
    pytest.param(
        "",
        [("learning_rate_multiplier", "0.5, 1")],
        ["A sweep needs a name and at least one hyperparameter with its values."],
        id="rows without a name",
    ),
    pytest.param(
        "lr",
        [],
        ["A sweep needs a name and at least one hyperparameter with its values."],
        id="a name without rows",
    ),
    pytest.param(
        "lr grid",
        [("learning_rate_multiplier", "0.5, 1")],
        ["name", "should match pattern"],
        id="a name with a space",
    ),
    pytest.param(
        "lr",
        [("lora_rank", "8"), ("learning_rate_multiplier", "0.5"), ("lora_rank", "16")],
        ["Sweep: lora_rank is chosen in two rows; give all its values in one."],
        id="a hyperparameter in two rows",
    ),
    pytest.param(
        "ranks",
        [("lora_rank", "8, 2000")],
        ["grid point 2 of 2 (lora_rank=", "2000", "no job of the sweep was created"],
        id="a point the API refuses",
    ),
    pytest.param(
        "big",
        [
            ("learning_rate_multiplier", "0.5, 1, 2, 4, 8"),
            ("lora_rank", "4, 8, 16, 32"),
            ("n_epochs", "1, 2, 3, 4"),
        ],
        ["the grid has 80 points: at most 64 jobs a request"],
        id="more than 64 points",
    ),
]


@pytest.mark.parametrize(("name", "rows", "says"), REFUSED)
def test_a_sweep_the_form_refuses_keeps_what_was_typed_and_creates_nothing(
    name: str,
    rows: list[tuple[str, str]],
    says: list[str],
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    base: str,
) -> None:
    file_id = open_form(page, live_url, tenant_a, ADDITION_CHATS)
    page.fill("#hp-n_epochs", "2")
    fill_sweep(page, name, rows)
    assert submit(page) == 400
    expect(page).to_have_url(f"{live_url}/jobs/new")
    assert job_count(services) == 0

    # The form as typed: the dataset, the base, the fields, the sweep's name and rows.
    expect(page.locator(DATASET)).to_have_value(file_id)
    expect(page.locator("#model")).to_have_value(BASE)
    expect(page.locator("#hp-n_epochs")).to_have_value("2")
    expect(page.locator("#sweep_name")).to_have_value(name)
    for row in range(1, SWEEP_ROWS + 1):
        param, values = rows[row - 1] if row <= len(rows) else ("", "")
        expect(page.locator(f"#sweep_param_{row}")).to_have_value(param)
        expect(page.locator(f"#sweep_values_{row}")).to_have_value(values)

    # What to change, in a sentence, where the section is open on the rows (the page is
    # rendered by the server: nothing to wait for).
    error = page.locator("#job-form-error")
    expect(error).to_be_visible()
    for words in says:
        expect(error).to_contain_text(words)
    assert not PYDANTIC_DUMP.search(error.inner_text()), error.inner_text()
    assert page.locator(SECTION).evaluate("details => details.open"), "the section is closed"
    expect(page.locator("#sweep_values_1")).to_be_visible()


def test_a_readers_key_gets_no_form_and_so_no_sweep(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, base: str
) -> None:
    sign_in(page, live_url, tenant_a.reader)
    response = page.goto(f"{live_url}/jobs/new")
    assert response is not None and response.ok
    expect(page.locator("#reader-notice")).to_contain_text("Your key can read, not start jobs")
    for absent in ("#job-form", SECTION, "#sweep_name", "#submit-job"):
        expect(page.locator(absent)).to_have_count(0)

    # Nor does the form's route take a sweep from the reader's session.
    token = page.evaluate("JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token']")
    refused = page.request.post(
        f"{live_url}/jobs/new",
        form={
            "csrf_token": str(token),
            "model": BASE,
            "training_file": "file-x",
            "sweep_name": "lr",
            "sweep_param_1": "learning_rate_multiplier",
            "sweep_values_1": "0.5, 1",
        },
        max_redirects=0,
    )
    assert refused.status == 403, (refused.status, refused.text())
    assert job_count(services) == 0


def test_a_dpo_sweep_over_beta_makes_one_dpo_job_per_beta(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, base: str
) -> None:
    file_id = open_form(page, live_url, tenant_a, PAIRS)
    expect(page.locator("#hp-dpo_beta")).to_be_hidden()  # shown for DPO only
    page.select_option("#hp-method", "dpo")
    page.fill("#hp-dpo_beta", "0.5")  # swept: this value is not used
    page.fill("#hp-n_epochs", "2")
    fill_sweep(page, "betas", [("dpo_beta", "0.05, 0.2, 0.4")])
    assert submit(page) == 200
    expect(page).to_have_url(f"{live_url}/jobs?q=sweep%3Dbetas")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(3)

    made = tenant_jobs(services, tenant_a.tenant_id)
    assert sorted(j.hyperparameters["dpo_beta"] for j in made) == [0.05, 0.2, 0.4]
    for job in made:
        beta = job.hyperparameters["dpo_beta"]
        assert job.hyperparameters == Hyperparameters(
            method="dpo", dpo_beta=beta, n_epochs=2
        ).model_dump(mode="json")
        assert job.user_metadata == {"sweep": "betas"}
        assert (job.base_model_id, job.training_file_id) == (base, file_id)
