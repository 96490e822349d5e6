"""Compare jobs, in a real browser: `/jobs/compare` (the jobs given by id, or a metadata search
such as a sweep's `sweep=lr-grid`) shows one row per job with the hyperparameters and metadata
that differ between them, each job's last train loss, best eval loss and trained tokens, and
draws their loss curves side by side from `/jobs/compare/metrics.json`; the jobs table links a
metadata search there. Refusals say what to do; another tenant's job is not found."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from playwright.sync_api import APIResponse, Page, expect
from sqlalchemy import text

from control_plane.events import add_event, metric_events_in_bulk
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.factories import enqueue_jobs, make_base, make_file

pytestmark = pytest.mark.browser

DASH = "—"
MAX_COMPARED = 12


# --------------------------------------------------------------------------- helpers


def new_jobs(services: Services, keys: TenantKeys, count: int) -> list[str]:
    """`count` queued jobs of the tenant with the default hyperparameters, each created a
    second after the one before (so that "newest first" is one order): their ids, oldest
    first."""
    engine = services.engine
    base_id = make_base(engine, f"base-{secrets.token_hex(4)}").id
    file_id = make_file(engine, keys.tenant_id).id
    ids = enqueue_jobs(engine, keys.tenant_id, base_id, file_id, count)
    with engine.begin() as conn:
        for age, job_id in zip(range(count, 0, -1), ids, strict=True):
            conn.execute(
                text(
                    "UPDATE jobs SET created_at = now() - make_interval(secs => :age) WHERE id = :id"
                ),
                {"age": age, "id": job_id},
            )
    return ids


def set_job(
    services: Services,
    job_id: str,
    *,
    hyperparameters: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    status: str | None = None,
    fine_tuned_model: str | None = None,
    trained_tokens: int | None = None,
) -> None:
    """Change a job's row: hyperparameters merged over its own, its metadata replaced."""
    with services.engine.begin() as conn:
        if hyperparameters:
            conn.execute(
                text(
                    "UPDATE jobs SET hyperparameters = hyperparameters || CAST(:hp AS jsonb) WHERE id = :id"
                ),
                {"hp": json.dumps(hyperparameters), "id": job_id},
            )
        if metadata is not None:
            conn.execute(
                text("UPDATE jobs SET user_metadata = CAST(:m AS jsonb) WHERE id = :id"),
                {"m": json.dumps(metadata), "id": job_id},
            )
        if status is not None:
            finished = "now()" if status in ("succeeded", "failed", "cancelled") else "NULL"
            conn.execute(
                text(f"UPDATE jobs SET status = :status, finished_at = {finished} WHERE id = :id"),
                {"status": status, "id": job_id},
            )
        if fine_tuned_model is not None or trained_tokens is not None:
            conn.execute(
                text(
                    "UPDATE jobs SET fine_tuned_model = :model, trained_tokens = :tokens "
                    "WHERE id = :id"
                ),
                {"model": fine_tuned_model, "tokens": trained_tokens, "id": job_id},
            )


def log_metrics(services: Services, job_id: str, points: list[dict[str, float]]) -> None:
    """The job's metric events, in this order (as a trainer writes them), with a log line and
    a status change among them."""
    with services.engine.begin() as conn, metric_events_in_bulk(conn, [job_id]):
        add_event(conn, job_id, "Job started", type="status", data={"status": "running"})
        for point in points:
            add_event(conn, job_id, f"step {point['step']}", type="metrics", data=point)
        add_event(conn, job_id, "Saved a checkpoint")


@dataclass(frozen=True)
class Curves:
    """What a job's events say its comparison shows."""

    train: list[tuple[float, float]]
    eval: list[tuple[float, float]]

    @classmethod
    def of(cls, points: list[dict[str, float]]) -> Curves:
        def series(key: str) -> list[tuple[float, float]]:
            return sorted((p["step"], p[key]) for p in points if key in p)

        return cls(series("train_loss"), series("eval_loss"))

    @property
    def last_train(self) -> str:
        return f"{self.train[-1][1]:.4f}" if self.train else DASH

    @property
    def best_eval(self) -> str:
        return f"{min(v for _, v in self.eval):.4f}" if self.eval else DASH


def compare_url(
    live_url: str, *, jobs: Sequence[str] = (), q: str | None = None, json_: bool = False
) -> str:
    params = [("job", j) for j in jobs] + ([("q", q)] if q is not None else [])
    path = "/jobs/compare/metrics.json" if json_ else "/jobs/compare"
    return f"{live_url}{path}" + (f"?{urlencode(params)}" if params else "")


def row_ids(page: Page) -> list[str]:
    return [
        str(row.get_attribute("data-job-id"))
        for row in page.locator("#compare-table tbody tr").all()
    ]


def params_shown(page: Page) -> list[str]:
    return [
        str(th.get_attribute("data-param"))
        for th in page.locator("#compare-table thead th[data-param]").all()
    ]


def cell(page: Page, job_id: str, selector: str) -> str:
    return (
        page.locator(f'#compare-table tbody tr[data-job-id="{job_id}"] {selector}')
        .inner_text()
        .strip()
    )


def legend_labels(page: Page, chart: str) -> list[str]:
    """The labels of a chart's uPlot legend, the x series' first."""
    return [
        t.strip() for t in page.locator(f"{chart} .u-legend tr.u-series .u-label").all_inner_texts()
    ]


def labelled_by(labels: list[str], job_ids: list[str]) -> bool:
    """Whether each label starts with its job's id, one label per job, in order."""
    assert len(labels) == len(job_ids) and all(
        label.startswith(job_id) for label, job_id in zip(labels, job_ids, strict=True)
    ), (labels, job_ids)
    return True


def words(value: str) -> str:
    return re.sub(r"\s+", " ", value).strip()


def error_text(page: Page, url: str) -> str:
    """The page's refusal: a 400 and the text of `#compare-error`."""
    response = page.goto(url)
    assert response is not None and response.status == 400, (url, response and response.status)
    message = page.locator("#compare-error")
    expect(message).to_be_visible()
    return words(message.inner_text())


def json_error(page: Page, url: str, status: int) -> APIResponse:
    response = page.request.get(url)
    assert response.status == status, (url, response.status, response.text())
    return response


# --------------------------------------------------------------------------- a sweep


def test_a_sweep_compared_from_the_jobs_table_shows_what_differs_and_draws_each_loss(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    """A reader filters the jobs table by a sweep's metadata, follows "Compare" and sees the
    sweep's three jobs, newest first, with exactly the columns that differ, the losses their
    events hold, and a chart of one train-loss series per job (and one of eval loss, which one
    of them has)."""
    sweep = {"sweep": "lr-grid", "team": "nlp"}
    oldest, middle, newest = new_jobs(services, tenant_a, 3)
    (elsewhere,) = new_jobs(services, tenant_a, 1)  # another sweep: not compared
    set_job(services, elsewhere, metadata={"sweep": "other", "team": "nlp"})
    # Another tenant's sweep by the same name, newer than all of tenant-a's: never shown.
    for job_id in new_jobs(services, tenant_b, 2):
        set_job(
            services,
            job_id,
            metadata={**sweep, "lr": "9"},
            hyperparameters={"learning_rate_multiplier": 9.5},
        )

    lrs = {oldest: 0.5, middle: 1.5, newest: 2.5}
    for job_id, lr in lrs.items():
        set_job(
            services,
            job_id,
            hyperparameters={"learning_rate_multiplier": lr},
            metadata={**sweep, "lr": str(lr)},
        )
    set_job(services, oldest, status="succeeded", fine_tuned_model="lr-grid@1", trained_tokens=980)
    set_job(
        services, newest, status="succeeded", fine_tuned_model="lr-grid@3", trained_tokens=1_234_567
    )
    points = {
        # The last event is an evaluation alone: the last train loss is step 4's; the best eval
        # loss is step 3's, not the last one.
        oldest: [
            {"step": 1, "train_loss": 2.71828},
            {"step": 2, "train_loss": 1.98765},
            {"step": 3, "train_loss": 1.41421, "eval_loss": 0.91234},
            {"step": 4, "train_loss": 1.23456},
            {"step": 5, "eval_loss": 0.95012},
        ],
        middle: [{"step": s, "train_loss": 3.0 / s + 0.00007} for s in range(1, 5)],
        newest: [{"step": s, "train_loss": 2.5 / (s + 1) + 0.00003} for s in range(1, 7)],
    }
    for job_id, job_points in points.items():
        log_metrics(services, job_id, job_points)
    curves = {job_id: Curves.of(p) for job_id, p in points.items()}

    sign_in(page, live_url, tenant_a.reader)
    # A search that is not a metadata filter offers no comparison.
    assert page.locator("#compare-jobs").count() == 0
    page.goto(f"{live_url}/jobs?{urlencode({'q': newest})}")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(1)
    assert page.locator("#compare-jobs").count() == 0
    page.goto(f"{live_url}/jobs?{urlencode({'q': 'lr-grid'})}")  # an adapter name
    assert page.locator("#compare-jobs").count() == 0

    search = "sweep=lr-grid team=nlp"
    page.goto(f"{live_url}/jobs?{urlencode({'q': search})}")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(3)
    link = page.locator("a#compare-jobs")
    expect(link).to_be_visible()
    href = urlsplit(str(link.get_attribute("href")))
    assert href.path == "/jobs/compare" and parse_qs(href.query) == {"q": [search]}, href
    link.click()
    page.wait_for_url(re.compile(r".*/jobs/compare\?"))

    order = [newest, middle, oldest]
    assert row_ids(page) == order
    assert page.locator("#compare-truncated").count() == 0
    for job_id in order:
        expect(
            page.locator(f'tr[data-job-id="{job_id}"] td.job a[href="/jobs/{job_id}"]')
        ).to_have_count(1)
    assert [cell(page, j, "td.status") for j in order] == ["succeeded", "queued", "succeeded"]
    assert [cell(page, j, "td.adapter") for j in order] == ["lr-grid@3", DASH, "lr-grid@1"]
    assert [cell(page, j, "td.trained-tokens") for j in order] == ["1,234,567", DASH, "980"]

    # Exactly the differing columns: not n_epochs (equal), nor the sweep's shared metadata.
    assert sorted(params_shown(page)) == ["learning_rate_multiplier", "metadata.lr"]
    for job_id in order:
        row = page.locator(f'#compare-table tbody tr[data-job-id="{job_id}"]')
        assert sorted(
            str(td.get_attribute("data-param")) for td in row.locator("td[data-param]").all()
        ) == [
            "learning_rate_multiplier",
            "metadata.lr",
        ]
        assert cell(page, job_id, 'td[data-param="learning_rate_multiplier"]') == str(lrs[job_id])
        assert cell(page, job_id, 'td[data-param="metadata.lr"]') == str(lrs[job_id])
        assert cell(page, job_id, "td.last-train-loss") == curves[job_id].last_train
        assert cell(page, job_id, "td.best-eval-loss") == curves[job_id].best_eval
    assert cell(page, oldest, "td.last-train-loss") == "1.2346"  # the computation, checked once
    assert cell(page, oldest, "td.best-eval-loss") == "0.9123"
    # One job evaluated: nothing to mark as the lowest among them.
    expect(page.locator("#compare-table tbody tr.lowest")).to_have_count(0)
    common = words(page.locator("#compare-common").inner_text())
    assert "n_epochs 3" in common and "batch_size 8" in common
    assert "learning_rate_multiplier" not in common

    # The chart: one train-loss series per job, labelled by the job, in the table's order.
    chart = page.locator("#compare-chart")
    metrics = urlsplit(str(chart.get_attribute("data-metrics")))
    assert metrics.path == "/jobs/compare/metrics.json", metrics
    # The chart asks for the table's jobs by id, not the search again (a job joining the
    # search meanwhile would join the chart and not the table).
    assert parse_qs(metrics.query) == {"job": order}
    expect(page.locator("#compare-chart .u-legend tr.u-series")).to_have_count(1 + len(order))
    assert labelled_by(legend_labels(page, "#compare-chart")[1:], order)
    expect(page.locator("#compare-chart canvas")).to_have_count(1)
    # The metrics URL the chart reads answers these jobs, in this order.
    served = page.request.get(f"{live_url}{metrics.path}?{metrics.query}")
    assert served.ok and [j["id"] for j in served.json()["jobs"]] == order
    # An eval chart, since one job evaluated: its series include that job's.
    eval_chart = page.locator("#compare-eval-chart")
    expect(eval_chart).to_have_count(1)
    assert (
        urlsplit(str(eval_chart.get_attribute("data-metrics"))).path == "/jobs/compare/metrics.json"
    )
    expect(page.locator("#compare-eval-chart canvas")).to_have_count(1)
    eval_labels = legend_labels(page, "#compare-eval-chart")[1:]
    assert any(label.startswith(oldest) for label in eval_labels), eval_labels

    # Two jobs that never evaluated, given by id (in this order), one still queued: the eval
    # chart waits for a first evaluation, and says so.
    page.goto(compare_url(live_url, jobs=[middle, newest]))
    assert row_ids(page) == [middle, newest]
    expect(page.locator("#compare-chart .u-legend tr.u-series")).to_have_count(3)
    assert labelled_by(legend_labels(page, "#compare-chart")[1:], [middle, newest])
    expect(page.locator("#compare-eval-chart")).to_be_hidden()
    expect(page.locator("#compare-eval-chart + p.chart-note")).to_contain_text(
        "No job here has evaluated yet"
    )
    assert all(cell(page, j, "td.best-eval-loss") == DASH for j in (middle, newest))
    # Both over, neither evaluated: no eval chart at all.
    set_job(services, middle, status="cancelled")
    page.goto(compare_url(live_url, jobs=[middle, newest]))
    expect(page.locator("#compare-chart .u-legend tr.u-series")).to_have_count(3)
    assert page.locator("#compare-eval-chart").count() == 0


# --------------------------------------------------------------------------- by id, and the curves


def test_jobs_given_by_id_keep_their_order_and_metrics_json_sends_their_curves(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    """Jobs compared by id come in the order given, a repeated id once; a metadata key some
    lack is a column where they show "—"; metrics.json sends each job's curves as its events
    hold them, labelled by the job and the hyperparameters that differ."""
    first, second, third = new_jobs(services, tenant_a, 3)
    lrs = {first: 0.5, second: 1.5, third: 2.5}
    for job_id, lr in lrs.items():
        set_job(services, job_id, hyperparameters={"learning_rate_multiplier": lr})
    set_job(services, first, metadata={"team": "nlp", "lr": "a"})
    set_job(services, second, metadata={"team": "nlp"})
    points = {
        first: [{"step": s, "train_loss": round(3.0 / s + s * 0.001, 6)} for s in range(1, 31)]
        + [
            {"step": 10, "eval_loss": 1.5},
            {"step": 20, "eval_loss": 1.25},
            {"step": 30, "eval_loss": 1.3},
        ],
        second: [
            {"step": s, "train_loss": round(2.0 / s + 0.01 * (s % 3), 6)} for s in range(1, 21)
        ],
        third: [],  # nothing trained yet
    }
    # An eval point logged between train points, as a trainer does it.
    points[first].sort(key=lambda p: p["step"])
    for job_id, job_points in points.items():
        if job_points:
            log_metrics(services, job_id, job_points)
    curves = {job_id: Curves.of(p) for job_id, p in points.items()}

    sign_in(page, live_url, tenant_a.member)
    order = [second, third, first]
    page.goto(compare_url(live_url, jobs=[second, third, first, second]))
    assert row_ids(page) == order
    assert sorted(params_shown(page)) == [
        "learning_rate_multiplier",
        "metadata.lr",
        "metadata.team",
    ]
    assert [cell(page, j, 'td[data-param="metadata.team"]') for j in order] == ["nlp", DASH, "nlp"]
    assert [cell(page, j, 'td[data-param="metadata.lr"]') for j in order] == [DASH, DASH, "a"]
    assert [cell(page, j, "td.last-train-loss") for j in order] == [
        curves[j].last_train for j in order
    ]
    assert [cell(page, j, "td.best-eval-loss") for j in order] == [DASH, DASH, "1.2500"]
    assert cell(page, third, "td.last-train-loss") == DASH
    assert [cell(page, j, "td.trained-tokens") for j in order] == [DASH] * 3
    expect(page.locator("#compare-chart .u-legend tr.u-series")).to_have_count(4)
    expect(page.locator("#compare-eval-chart")).to_have_count(1)

    response = page.request.get(
        compare_url(live_url, jobs=[second, third, first, second], json_=True)
    )
    assert response.ok, response.text()
    body = response.json()
    assert [j["id"] for j in body["jobs"]] == order
    for sent in body["jobs"]:
        job_id, expected = sent["id"], curves[sent["id"]]
        for name, series in (("train", expected.train), ("eval", expected.eval)):
            assert sent[name]["steps"] == [s for s, _ in series], (job_id, name)
            assert sent[name]["values"] == pytest.approx([v for _, v in series], rel=1e-12), (
                job_id,
                name,
            )
        assert sent["downsampled"] is False
        label = sent["label"]
        assert label.startswith(job_id), label
        assert f"learning_rate_multiplier={lrs[job_id]}" in label[len(job_id) :], label
        assert "n_epochs" not in label and "batch_size" not in label, label
    # The same selection by metadata: newest first.
    by_team = page.request.get(compare_url(live_url, q="team=nlp", json_=True))
    assert by_team.ok and [j["id"] for j in by_team.json()["jobs"]] == [second, first]


# --------------------------------------------------------------------------- a long sweep


def test_a_search_matching_more_than_twelve_jobs_compares_the_twelve_newest(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    ours = new_jobs(services, tenant_a, MAX_COMPARED + 2)
    for job_id in ours:
        set_job(services, job_id, metadata={"sweep": "big"})
    for job_id in new_jobs(services, tenant_b, 3):  # newer, another tenant's: never counted
        set_job(services, job_id, metadata={"sweep": "big"})
    newest_first = ours[::-1][:MAX_COMPARED]

    sign_in(page, live_url, tenant_a.member)
    page.goto(compare_url(live_url, q="sweep=big"))
    assert row_ids(page) == newest_first
    expect(page.locator("#compare-truncated")).to_be_visible()
    assert params_shown(page) == []  # nothing differs
    expect(page.locator("#compare-chart .u-legend tr.u-series")).to_have_count(1 + MAX_COMPARED)
    response = page.request.get(compare_url(live_url, q="sweep=big", json_=True))
    assert response.ok and [j["id"] for j in response.json()["jobs"]] == newest_first

    # Twelve ids (one of them repeated): all twelve, nothing truncated.
    page.goto(compare_url(live_url, jobs=[*ours[:MAX_COMPARED], ours[0]]))
    assert row_ids(page) == ours[:MAX_COMPARED]
    assert page.locator("#compare-truncated").count() == 0


# --------------------------------------------------------------------------- refusals


def test_refusals_say_what_to_do_and_another_tenants_job_is_not_found(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys
) -> None:
    ours = new_jobs(services, tenant_a, MAX_COMPARED + 1)
    set_job(services, ours[0], metadata={"sweep": "solo"})
    (theirs,) = new_jobs(services, tenant_b, 1)
    set_job(services, theirs, metadata={"sweep": "solo"})  # matched for tenant-b, not for us
    unknown = "ftjob-nosuchjob0000000000000000"
    a, b = ours[0], ours[1]

    sign_in(page, live_url, tenant_a.member)
    # (what, the ids, the search, what the refusal must say)
    refusals: list[tuple[str, list[str], str | None, str]] = [
        ("one id", [a], None, r"(?i)\b(2|two)\b"),
        ("one id twice", [a, a], None, r"(?i)\b(2|two)\b"),
        ("thirteen ids", ours, None, rf"(?i)\b({MAX_COMPARED}|twelve)\b"),
        ("not key=value", [], "lr-grid", r"key=value"),
        ("one match", [], "sweep=solo", r"(?i)\b(1|one)\b"),
        ("nothing", [], None, r"(?i)\bjob"),
    ]
    for name, jobs, q, says in refusals:
        shown = error_text(page, compare_url(live_url, jobs=jobs, q=q))
        assert re.search(says, shown), (name, shown)
        assert page.locator("#compare-table").count() == 0, name
        refused = json_error(page, compare_url(live_url, jobs=jobs, q=q, json_=True), 400)
        message = refused.json()["error"]["message"]
        assert isinstance(message, str) and re.search(says, message), (name, message)
    # A q no job matches says so too (none matched).
    assert re.search(
        r"\b(0|no|none)\b", error_text(page, compare_url(live_url, q="sweep=none")), re.I
    )

    # Another tenant's job, or none at all: the dashboard's own "not found", word for word.
    not_found = page.request.get(f"{live_url}/jobs/{unknown}")
    assert not_found.status == 404
    for missing in (theirs, unknown):
        for ids in ([a, missing], [missing, a, b]):
            response = page.request.get(compare_url(live_url, jobs=ids))
            assert response.status == 404, (missing, response.status)
            assert response.text() == not_found.text()
            assert theirs not in response.text()
    assert page.request.get(f"{live_url}/jobs/{theirs}").text() == not_found.text()

    theirs_json = json_error(page, compare_url(live_url, jobs=[a, theirs], json_=True), 404)
    unknown_json = json_error(page, compare_url(live_url, jobs=[a, unknown], json_=True), 404)
    assert isinstance(theirs_json.json()["error"]["message"], str)
    assert "solo" not in theirs_json.text()
    assert theirs_json.text().replace(theirs, "ID") == unknown_json.text().replace(unknown, "ID")

    # Signed out: the page asks to sign in; the JSON tells nothing.
    page.context.clear_cookies()
    signed_out = page.request.get(compare_url(live_url, jobs=[a, b], json_=True), max_redirects=0)
    assert signed_out.status in (303, 401), signed_out.status
    assert a not in signed_out.text()


def test_the_best_eval_loss_is_the_lowest_evaluation_not_a_charts_bucket_mean(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys
) -> None:
    """A job with more points than a chart draws: its chart averages evaluations a few steps
    apart, but the table's best eval loss is its lowest evaluation."""
    long_job, short_job = new_jobs(services, tenant_a, 2)
    points: list[dict[str, float]] = [
        {"step": step, "train_loss": 2.0 - step / 1000} for step in range(1, 1200)
    ]
    # Evaluations at steps 10 and 11, 20 and 21, ...: 0.5 then 1.5, one bucket apart at most.
    for step in range(10, 1200, 10):
        points += [{"step": step, "eval_loss": 0.5}, {"step": step + 1, "eval_loss": 1.5}]
    points.sort(key=lambda p: p["step"])
    log_metrics(services, long_job, points)
    log_metrics(services, short_job, [{"step": 1, "train_loss": 1.0, "eval_loss": 0.75}])
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/jobs/compare?job={long_job}&job={short_job}")
    assert cell(page, long_job, "td.best-eval-loss") == "0.5000"
    assert cell(page, short_job, "td.best-eval-loss") == "0.7500"
    assert cell(page, long_job, "td.last-train-loss") == f"{2.0 - 1199 / 1000:.4f}"
    # The row of the lowest eval loss is marked, and only it: the long job's 0.5 (its chart's
    # means, which never reach 0.5, would have marked the short job's 0.75).
    marked = page.locator("#compare-table tbody tr.lowest")
    expect(marked).to_have_count(1)
    assert marked.get_attribute("data-job-id") == long_job
    expect(marked.locator("mark")).to_have_text("lowest eval loss")
    # ... while the chart's eval curve is the bucket means, which never reach 0.5.
    answer = page.request.get(
        f"{live_url}/jobs/compare/metrics.json?job={long_job}&job={short_job}"
    )
    curves = answer.json()["jobs"][0]
    assert curves["downsampled"] is True
    assert min(curves["eval"]["values"]) > 0.5


def test_a_comparison_follows_its_jobs_as_they_train_and_ends_when_they_are_over(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A running job's new steps redraw its row and the curves (at most every
    REFRESH_SECONDS); once every job is over the stream ends and the page says so. A
    comparison of jobs already over opens no stream."""
    from control_plane.dashboard.routes import compare as compare_routes

    monkeypatch.setattr(compare_routes, "REFRESH_SECONDS", 0.5)
    running, done = new_jobs(services, tenant_a, 2)
    set_job(services, running, status="running")
    set_job(services, done, status="succeeded")
    log_metrics(services, running, [{"step": 1, "train_loss": 2.0}])
    log_metrics(services, done, [{"step": 1, "train_loss": 1.0}, {"step": 2, "train_loss": 0.5}])
    sign_in(page, live_url, tenant_a.reader)
    page.goto(f"{live_url}/jobs/compare?job={running}&job={done}")
    chart = page.locator("#compare-chart")
    expect(chart).to_have_attribute("data-drawn", "1")
    assert cell(page, running, "td.last-train-loss") == "2.0000"
    expect(page.locator("#compare-note")).to_contain_text("follow the jobs")

    with services.engine.begin() as conn, metric_events_in_bulk(conn, [running]):
        add_event(conn, running, "step 2", type="metrics", data={"step": 2, "train_loss": 1.25})
    expect(page.locator(f"tr[data-job-id='{running}'] td.last-train-loss")).to_have_text("1.2500")
    expect(chart).to_have_attribute("data-drawn", "2")  # the curves read again, redrawn
    legend = page.locator("#compare-chart .u-legend tr.u-series").nth(1)
    assert legend.locator(".u-label").inner_text().startswith(running)

    set_job(services, running, status="succeeded")
    expect(page.locator("#compare-live")).to_have_attribute("data-finished", "true")
    expect(page.locator("#compare-note")).to_have_text("Every job here is over.")
    expect(page.locator(f"tr[data-job-id='{running}'] td.status")).to_have_text("succeeded")

    # Jobs already over: the page says so and opens no stream.
    streams: list[str] = []
    page.on(
        "request", lambda request: streams.append(request.url) if "stream" in request.url else None
    )
    page.goto(f"{live_url}/jobs/compare?job={running}&job={done}")
    expect(page.locator("#compare-live")).to_have_attribute("data-finished", "true")
    expect(chart).to_have_attribute("data-drawn", "1")
    assert streams == []


def stream_events(page: Page, live_url: str, stream_url: str) -> list[tuple[str, str]]:
    """A comparison's stream read to its end over the page's session: (event, data) each."""
    answer = page.request.get(f"{live_url}{stream_url}", timeout=60_000)
    assert answer.status == 200
    found: list[tuple[str, str]] = []
    for block in answer.text().split("\n\n"):
        lines = block.splitlines()
        names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
        if names:
            data = "\n".join(
                line.removeprefix("data: ") for line in lines if line.startswith("data:")
            )
            found.append((names[0], data))
    return found


def test_a_stream_sends_what_changed_before_it_connected_and_says_when_a_job_is_gone(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page's table has a version in its stream's address: a change made before the stream
    connected (or while it reconnected) is sent at once, jobs over included; an unchanged table
    is not sent again; a job deleted meanwhile ends the stream with `gone` (an EventSource
    ended without a word would reconnect for ever)."""
    from control_plane.dashboard.routes import compare as compare_routes

    monkeypatch.setattr(compare_routes, "REFRESH_SECONDS", 0.2)
    first, second = new_jobs(services, tenant_a, 2)
    set_job(services, first, status="running")
    set_job(services, second, status="running")
    sign_in(page, live_url, tenant_a.reader)
    page.goto(compare_url(live_url, jobs=[first, second]))
    stream_url = str(page.locator("#compare-live").get_attribute("data-stream"))
    assert parse_qs(urlsplit(stream_url).query)["job"] == [first, second]
    page.goto(f"{live_url}/jobs")  # the page's own stream closed

    # Both finish before the stream (re)connects: the table it sends says so, then `end`.
    log_metrics(services, first, [{"step": 1, "train_loss": 0.25}])
    set_job(services, first, status="succeeded")
    set_job(services, second, status="failed")
    events = stream_events(page, live_url, stream_url)
    assert [name for name, _ in events] == ["table", "curves", "end"]
    assert "succeeded" in events[0][1] and "failed" in events[0][1] and "0.2500" in events[0][1]

    # Drawn as it now is (a fresh page's address): nothing to send but the end.
    page.goto(compare_url(live_url, jobs=[first, second]))
    current = str(page.locator("#compare-live").get_attribute("data-stream"))
    assert current != stream_url
    assert [name for name, _ in stream_events(page, live_url, current)] == ["end"]

    # A job deleted: `gone`, whatever was drawn.
    with services.engine.begin() as conn:
        conn.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": second})
    assert [name for name, _ in stream_events(page, live_url, current)] == ["gone"]


def test_a_stream_of_jobs_that_keep_moving_still_ends_on_time(
    live_url: str,
    page: Page,
    services: Services,
    tenant_a: TenantKeys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job stepping more often than the refresh leaves the stream's watcher always woken:
    the stream still ends at its longest life (the browser then reconnects)."""
    import threading
    import time

    from control_plane.api import sse
    from control_plane.dashboard.routes import compare as compare_routes

    # Longer than the stream watch's tick (0.5 s): each refresh finds the watcher woken.
    monkeypatch.setattr(compare_routes, "REFRESH_SECONDS", 1.2)
    monkeypatch.setattr(sse, "MAX_STREAM_SECONDS", 3.0)
    first, second = new_jobs(services, tenant_a, 2)
    set_job(services, first, status="running")
    stop = threading.Event()

    def step() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            log_metrics(services, first, [{"step": n, "train_loss": 1.0 / n}])
            time.sleep(0.05)

    stepping = threading.Thread(target=step)
    stepping.start()
    try:
        sign_in(page, live_url, tenant_a.reader)
        started = time.monotonic()
        events = stream_events(
            page, live_url, f"/jobs/compare/stream?job={first}&job={second}&drawn=x"
        )
        lasted = time.monotonic() - started
    finally:
        stop.set()
        stepping.join()
    assert events[:2] == [("table", events[0][1]), ("curves", "")]
    assert len([name for name, _ in events if name == "table"]) >= 2  # it followed the steps
    assert lasted < 20, lasted  # ended (at about 3 s), where it streamed while the job moved
    assert all(name != "end" for name, _ in events)
