"""The usage page, the platform operators' chargeback: what every tenant used in a UTC calendar
month, one row a tenant by name with the month's totals under them, and the same rows as CSV
for a spreadsheet or a billing system. The rows are `control_plane.platform_usage`'s, those
`GET /v1/usage` answers, so the page, the file and the REST report cannot disagree: trainer
time of the tenant's fine-tuning jobs (each run clipped to the month), the jobs that succeeded
in it with the tokens they trained on, and its interactive sessions' metered calls.

A month is `?month=YYYY-MM`, the current one when absent. A past month is the whole month; the
current one ends at the next hour boundary after now (the report's windows are on hour
boundaries), so a run still going counts up to now. A month to come, or one not written
YYYY-MM, is a 400 page saying so. Only a platform operator's admin sees the page or the file;
anyone else gets the 403 page with the reason.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Connection

from control_plane.api.deps import ServicesDep
from control_plane.dashboard.operators import refuse_unless_operator
from control_plane.dashboard.render import PageRefused, page
from control_plane.dashboard.sessions import CurrentSession, PageConn, Session
from control_plane.platform_usage import PlatformTenantUsage, platform_totals
from control_plane.services import Services

router = APIRouter()

READING = "Reading every tenant's usage (chargeback)"

# The CSV's columns, the rows' own field names, in the page's order. A tenant's name starts
# with a letter or a digit (`TenantName`), so no cell can read as a spreadsheet formula.
CSV_FIELDS = (
    "tenant",
    "trainer_seconds",
    "fine_tuning_jobs",
    "fine_tuning_trained_tokens",
    "training_tokens",
    "prefill_tokens",
    "sampled_tokens",
    "checkpoints",
)

_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")


@dataclass(frozen=True)
class Month:
    """A UTC calendar month as the report reads it: `[starting_on, ending_before)`, and the
    months either side to link to (`following` is None for the current month)."""

    name: str  # 2026-03
    starting_on: datetime
    ending_before: datetime
    preceding: str | None
    following: str | None

    @property
    def current(self) -> bool:
        return self.following is None


def _first_instant(index: int) -> datetime:
    """The first instant of the month `index` months after January of year 0."""
    year, month = divmod(index, 12)
    return datetime(year, month + 1, 1, tzinfo=UTC)


def choose_month(asked: str | None, now: datetime) -> Month:
    """The month `asked` (YYYY-MM; None or empty: the current one); PageRefused, saying why,
    for a month to come or one not written YYYY-MM."""
    this = now.year * 12 + now.month - 1
    if not asked:
        index = this
    else:
        matched = _MONTH.fullmatch(asked)
        if matched is None or matched[1] == "0000":
            raise PageRefused(
                f"{asked!r} is not a month: write it YYYY-MM, a UTC calendar month such as "
                f"{now:%Y-%m}."
            )
        index = int(matched[1]) * 12 + int(matched[2]) - 1
        if index > this:
            raise PageRefused(
                f"{asked} has not begun, so nothing was used in it yet: the latest month with "
                f"usage to show is the current one, {now:%Y-%m}."
            )
    start = _first_instant(index)
    if index == this:
        end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    else:
        end = _first_instant(index + 1)
    return Month(
        name=f"{start:%Y-%m}",
        starting_on=start,
        ending_before=end,
        preceding=f"{_first_instant(index - 1):%Y-%m}" if index > 12 else None,
        following=f"{_first_instant(index + 1):%Y-%m}" if index < this else None,
    )


def _total(rows: list[PlatformTenantUsage]) -> PlatformTenantUsage:
    return PlatformTenantUsage(
        tenant="",
        training_tokens=sum(r.training_tokens for r in rows),
        prefill_tokens=sum(r.prefill_tokens for r in rows),
        sampled_tokens=sum(r.sampled_tokens for r in rows),
        checkpoints=sum(r.checkpoints for r in rows),
        trainer_seconds=round(sum(r.trainer_seconds for r in rows), 3),
        fine_tuning_jobs=sum(r.fine_tuning_jobs for r in rows),
        fine_tuning_trained_tokens=sum(r.fine_tuning_trained_tokens for r in rows),
    )


def _month_rows(
    conn: Connection, session: Session, services: Services, month: str | None
) -> tuple[Month, list[PlatformTenantUsage]]:
    """Refused unless an operator's admin asks for a month that can be read; else its rows."""
    refuse_unless_operator(conn, session, services, READING)
    chosen = choose_month(month, datetime.now(UTC))
    return chosen, platform_totals(conn, chosen.starting_on, chosen.ending_before)


@router.get("/usage")
def usage_page(
    request: Request,
    session: CurrentSession,
    conn: PageConn,
    services: ServicesDep,
    month: str | None = None,
) -> Response:
    chosen, rows = _month_rows(conn, session, services, month)
    return page(request, "usage.html", session, month=chosen, rows=rows, total=_total(rows))


@router.get("/usage.csv")
def usage_csv(
    session: CurrentSession, conn: PageConn, services: ServicesDep, month: str | None = None
) -> Response:
    """The page's rows (not its total) as CSV, a header of the field names first."""
    chosen, rows = _month_rows(conn, session, services, month)
    written = io.StringIO()
    writer = csv.writer(written)
    writer.writerow(CSV_FIELDS)
    writer.writerows([getattr(row, field) for field in CSV_FIELDS] for row in rows)
    return Response(
        written.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="loraforge-usage-{chosen.name}.csv"',
            "Cache-Control": "no-store",
        },
    )
