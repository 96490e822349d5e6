"""What every tenant used in a window, for the platform's operators to charge back: its
interactive sessions' calls (`control_plane.usage`) and its fine-tuning jobs
(`control_plane.job_usage`), one row a tenant by name; tenants that used nothing are left out.
`GET /v1/usage` and the dashboard's usage page read it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from control_plane import job_usage, usage


@dataclass(frozen=True)
class PlatformTenantUsage:
    tenant: str
    training_tokens: int
    prefill_tokens: int
    sampled_tokens: int
    checkpoints: int
    trainer_seconds: float
    fine_tuning_jobs: int
    fine_tuning_trained_tokens: int


def platform_totals(
    conn: Connection, starting_on: datetime, ending_before: datetime
) -> list[PlatformTenantUsage]:
    calls = {t.tenant_name: t for t in usage.tenant_totals(conn, starting_on, ending_before)}
    jobs = {t.tenant_name: t for t in job_usage.job_totals(conn, starting_on, ending_before)}
    return [
        _row(name, calls.get(name), jobs.get(name)) for name in sorted(calls.keys() | jobs.keys())
    ]


def _row(
    name: str, calls: usage.TenantUsage | None, jobs: job_usage.TenantJobUsage | None
) -> PlatformTenantUsage:
    return PlatformTenantUsage(
        tenant=name,
        training_tokens=calls.training_tokens if calls else 0,
        prefill_tokens=calls.prefill_tokens if calls else 0,
        sampled_tokens=calls.sampled_tokens if calls else 0,
        checkpoints=calls.checkpoints if calls else 0,
        trainer_seconds=round(jobs.trainer_seconds, 3) if jobs else 0.0,
        fine_tuning_jobs=jobs.fine_tuning_jobs if jobs else 0,
        fine_tuning_trained_tokens=jobs.fine_tuning_trained_tokens if jobs else 0,
    )
