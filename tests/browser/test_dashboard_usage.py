"""The usage page in a real browser, the platform operators' chargeback: a month's rows equal to
`control_plane.platform_usage` for the same window and to what is worked out by hand from jobs
moved through the real queue and interactive calls metered by the executors' own `finish` (a
90-minute run is 1.50 trainer hours; a run across a month's edge counts in each month only its
part, in the current one up to now), the totals under them, a tenant that used nothing left
out, a month that used nothing said so, the months linked either side, the CSV download holding
the same numbers, and every refusal (a viewer who is not a platform operator's admin, a month
to come or malformed) said on a page with no table."""

from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from sqlalchemy import text

from control_plane import interactive_calls
from control_plane.platform_usage import PlatformTenantUsage, platform_totals
from control_plane.queue import JobQueue
from control_plane.services import Services
from tests.api_harness import TenantKeys
from tests.browser.conftest import sign_in
from tests.factories import (
    ask_call,
    enqueue_jobs,
    interactive_model,
    interactive_session,
    make_base,
    make_file,
    make_tenant,
)

pytestmark = pytest.mark.browser

OPERATORS_ONLY = "Reading every tenant's usage (chargeback) is a platform operator's action"
HEADINGS = [
    "Trainer hours",
    "Jobs succeeded",
    "Trained tokens",
    "Training tokens",
    "Prompt tokens",
    "Sampled tokens",
    "Checkpoints",
]


@dataclass(frozen=True)
class Months:
    """The current month's first instant, the previous month's, and their names."""

    current: datetime
    previous: datetime

    @property
    def current_name(self) -> str:
        return f"{self.current:%Y-%m}"

    @property
    def previous_name(self) -> str:
        return f"{self.previous:%Y-%m}"


def _months() -> Months:
    current = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return Months(current, (current - timedelta(days=1)).replace(day=1))


def _retime_jobs(services: Services, times: dict[str, list[datetime]]) -> None:
    """Move each job's status changes, as the queue wrote them (in order, milliseconds apart),
    to the times given, so that the trainer time is exact."""
    with services.engine.begin() as conn:
        for job_id, when in times.items():
            changes = conn.execute(
                text(
                    "SELECT id FROM job_events WHERE job_id = :job "
                    "AND data -> 'status' IS NOT NULL ORDER BY id"
                ),
                {"job": job_id},
            ).scalars()
            ids = list(changes)
            assert len(ids) == len(when), job_id
            for event_id, at in zip(ids, when, strict=True):
                conn.execute(
                    text("UPDATE job_events SET created_at = :at WHERE id = :id"),
                    {"at": at, "id": event_id},
                )


def _answer_calls(services: Services, base_id: str, finished_at: datetime) -> None:
    """Run every pending interactive call on the base as an executor does (claim, `finish` with
    its answer, which meters it), then move their finish to `finished_at`."""
    with services.engine.begin() as conn:
        while (call := interactive_calls.claim_next(conn, "exec-1", base_id)) is not None:
            answer = {"sequences": [{"tokens": [5, 6, 7, 8]}]} if call.kind == "sample" else {}
            assert interactive_calls.finish(conn, call, "exec-1", answer)
        conn.execute(
            text("UPDATE interactive_calls SET finished_at = :at WHERE usage IS NOT NULL"),
            {"at": finished_at},
        )


@pytest.fixture
def months(services: Services, tenant_a: TenantKeys, tenant_b: TenantKeys) -> Months:
    """Last month: tenant-a's job ran 90 minutes and succeeded with 1,234,567 tokens and
    another ran 30 minutes and failed (2.00 trainer hours, one job); acme's began an hour
    before this month and is still running (1.00 hour last month, the rest in this one);
    bolt's session trained on 1,500 tokens and sampled 4 from a 3-token prompt. tenant-b used
    nothing."""
    engine = services.engine
    months = _months()
    base_id = make_base(engine, "tiny-usage").id
    acme = make_tenant(engine, "acme").id
    bolt = make_tenant(engine, "bolt").id
    billed, broken = enqueue_jobs(
        engine, tenant_a.tenant_id, base_id, make_file(engine, tenant_a.tenant_id).id, 2
    )
    (crossing,) = enqueue_jobs(engine, acme, base_id, make_file(engine, acme).id, 1)
    queue = JobQueue(engine, max_running_per_tenant=10)
    assert {getattr(queue.claim("w"), "id", None) for _ in range(3)} == {
        billed,
        broken,
        crossing,
    }
    assert queue.complete(billed, "w", trained_tokens=1_234_567) is not None
    assert queue.fail(broken, "w", code="oom", message="out of memory", retryable=False)
    day = months.previous + timedelta(days=1, hours=9)
    _retime_jobs(
        services,
        {
            billed: [day, day + timedelta(minutes=90)],
            broken: [day + timedelta(days=1), day + timedelta(days=1, minutes=30)],
            crossing: [months.current - timedelta(hours=1)],
        },
    )

    interactive_session(engine, bolt, "sess-bolt")
    model = interactive_model(engine, "sess-bolt", bolt, base_id, "m-bolt")
    datum = {"model_input": {"chunks": [{"tokens": list(range(750))}]}}
    trained = {"forward_backward_input": {"data": [datum, datum]}}
    ask_call(engine, model, bolt, base_id, "forward_backward", 0, trained)
    ask_call(
        engine, model, bolt, base_id, "sample", 1, {"prompt": {"chunks": [{"tokens": [1, 2, 3]}]}}
    )
    _answer_calls(services, base_id, months.previous + timedelta(days=3))
    return months


def _cells(u: PlatformTenantUsage) -> list[str]:
    """A row as the page writes it: hours to two decimals, counts thousands separated."""
    counts = (
        u.fine_tuning_jobs,
        u.fine_tuning_trained_tokens,
        u.training_tokens,
        u.prefill_tokens,
        u.sampled_tokens,
        u.checkpoints,
    )
    return [u.tenant, f"{u.trainer_seconds / 3600:,.2f}", *(f"{n:,}" for n in counts)]


def _shown(page: Page, rows: str) -> list[list[str]]:
    return [
        [re.sub(r"\s+", " ", c).strip() for c in row]
        for row in page.locator(rows).evaluate_all(
            "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText))"
        )
    ]


def _totals(services: Services, start: datetime, end: datetime) -> list[PlatformTenantUsage]:
    with services.engine.connect() as conn:
        return platform_totals(conn, start, end)


def test_last_month_is_each_tenants_usage_as_reported_and_as_worked_out_by_hand(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, months: Months
) -> None:
    sign_in(page, live_url, tenant_a.admin)
    page.click("nav a[href='/usage']")
    page.wait_for_url(f"{live_url}/usage")
    page.click("#previous-month")
    page.wait_for_url(f"{live_url}/usage?month={months.previous_name}")
    expect(page.locator("nav a[href='/usage']")).to_have_attribute("aria-current", "page")
    heads = page.locator("#usage thead tr").nth(1).locator("th").all_inner_texts()
    assert heads == HEADINGS

    by_hand = [
        ["acme", "1.00", "0", "0", "0", "0", "0", "0"],
        ["bolt", "0.00", "0", "0", "1,500", "3", "4", "0"],
        ["tenant-a", "2.00", "1", "1,234,567", "0", "0", "0", "0"],
    ]
    reported = _totals(services, months.previous, months.current)
    assert [_cells(u) for u in reported] == by_hand
    assert _shown(page, "#usage tbody tr") == by_hand  # tenant-b used nothing: left out
    rows = page.locator("#usage tbody tr").evaluate_all("rows => rows.map(r => r.dataset.tenant)")
    assert rows == ["acme", "bolt", "tenant-a"]
    assert _shown(page, "#usage tfoot tr") == [
        ["Total (3 tenants)", "3.00", "1", "1,234,567", "1,500", "3", "4", "0"]
    ]
    expect(page.locator("#usage tbody tr[data-tenant='tenant-a'] td span")).to_have_attribute(
        "title", "7,200 seconds"
    )

    # The CSV holds the same rows, with the fields' own names, exact seconds and no total.
    with page.expect_download() as downloading:
        page.click("#download-csv")
    download = downloading.value
    assert download.suggested_filename == f"loraforge-usage-{months.previous_name}.csv"
    header, *_ = csv.reader(io.StringIO(Path(download.path()).read_text()))
    assert header == [
        "tenant",
        "trainer_seconds",
        "fine_tuning_jobs",
        "fine_tuning_trained_tokens",
        "training_tokens",
        "prefill_tokens",
        "sampled_tokens",
        "checkpoints",
    ]
    written = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
    as_read = [
        {
            k: v if k == "tenant" else float(v) if k == "trainer_seconds" else int(v)
            for k, v in r.items()
        }
        for r in written
    ]
    assert as_read == [asdict(u) for u in reported]
    assert [(r["tenant"], r["trainer_seconds"]) for r in as_read] == [
        ("acme", 3600.0),
        ("bolt", 0.0),
        ("tenant-a", 7200.0),
    ]
    answer = page.request.get(f"{live_url}/usage.csv?month={months.previous_name}")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert answer.headers["content-disposition"] == (
        f'attachment; filename="loraforge-usage-{months.previous_name}.csv"'
    )

    # The month before used nothing: said so, with no table, and a way back.
    page.click("#previous-month")
    expect(page.locator("#usage-empty")).to_contain_text("No tenant used anything")
    expect(page.locator("#usage")).to_have_count(0)
    page.click("#next-month")
    page.wait_for_url(f"{live_url}/usage?month={months.previous_name}")
    page.click("#next-month")
    page.wait_for_url(f"{live_url}/usage?month={months.current_name}")
    expect(page.locator("#next-month")).to_have_count(0)


def test_the_current_month_counts_a_run_still_going_up_to_now(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, months: Months
) -> None:
    began = datetime.now(UTC)
    end = began.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    before = _totals(services, months.current, end)
    sign_in(page, live_url, tenant_a.admin)
    page.goto(f"{live_url}/usage")
    after = _totals(services, months.current, end)
    ended = datetime.now(UTC)

    # acme's run has gone on since this month began: its hours so far, between the report's
    # just before and just after the page, and between the hours elapsed then (each within
    # the two decimals' rounding).
    assert [u.tenant for u in before] == [u.tenant for u in after] == ["acme"]
    (shown,) = _shown(page, "#usage tbody tr")
    hours = float(shown[1].replace(",", ""))
    assert float(_cells(before[0])[1]) <= hours <= float(_cells(after[0])[1])
    elapsed = [(at - months.current).total_seconds() / 3600 for at in (began, ended)]
    assert elapsed[0] - 0.005 <= hours <= elapsed[1] + 0.005
    assert shown[0] == "acme" and shown[2:] == ["0"] * 6
    expect(page.locator("#next-month")).to_have_count(0)
    expect(page.locator("#previous-month")).to_have_attribute(
        "href", f"/usage?month={months.previous_name}"
    )
    expect(page.locator("#download-csv")).to_have_attribute(
        "href", f"/usage.csv?month={months.current_name}"
    )


def _following(month: datetime) -> str:
    return f"{(month + timedelta(days=32)).replace(day=1):%Y-%m}"


def test_a_month_to_come_or_malformed_is_refused_saying_why(
    live_url: str, page: Page, services: Services, tenant_a: TenantKeys, months: Months
) -> None:
    sign_in(page, live_url, tenant_a.admin)
    to_come = _following(months.current)
    for asked, reason in (
        (to_come, f"{to_come} has not begun, so nothing was used in it yet"),
        ("9999-12", "9999-12 has not begun"),
        ("2026-13", "'2026-13' is not a month: write it YYYY-MM"),
        ("2026-3", "'2026-3' is not a month"),
        ("0000-01", "'0000-01' is not a month"),
        ("march", "'march' is not a month"),
    ):
        shown = page.goto(f"{live_url}/usage?month={asked}")
        assert shown is not None and shown.status == 400, asked
        expect(page.locator("#forbidden")).to_contain_text(reason)
        expect(page.locator("#usage")).to_have_count(0)
        refused = page.request.get(f"{live_url}/usage.csv?month={asked}")
        assert refused.status == 400 and reason in html.unescape(refused.text()), asked


@pytest.mark.parametrize("viewer", ["tenant-b's admin", "tenant-a's member"])
def test_no_one_but_a_platform_operators_admin_sees_the_page_or_the_file(
    live_url: str,
    page: Page,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    months: Months,
    viewer: str,
) -> None:
    signed_out = page.goto(f"{live_url}/usage.csv")
    assert signed_out is not None and "/sign-in?next=" in page.url

    sign_in(page, live_url, tenant_b.admin if viewer.startswith("tenant-b") else tenant_a.member)
    expect(page.locator("nav a[href='/queue']")).to_be_visible()
    expect(page.locator("nav a[href='/usage']")).to_have_count(0)
    for query in ("", f"?month={months.previous_name}", "?month=march"):
        shown = page.goto(f"{live_url}/usage{query}")
        assert shown is not None and shown.status == 403, query
        expect(page.locator("#forbidden")).to_contain_text(OPERATORS_ONLY)
        expect(page.locator("#usage")).to_have_count(0)
        refused = page.request.get(f"{live_url}/usage.csv{query}")
        assert refused.status == 403, query
        assert OPERATORS_ONLY in html.unescape(refused.text())
        assert "acme" not in refused.text()
