"""What a page of tenants costs the platform's operators (`GET /v1/tenants`,
`control_plane.tenants.list_tenants`) as the backlog and the history grow.

    python -m benchmarks.tenants [--database-url URL]

1,000 tenants; first 1,000 queued jobs (one tenant holding half), then 100,000 queued and
100,000 finished ones (succeeded, failed, cancelled) beside them. At each size, one JSON line
per page (the first 100 tenants by name, and the 100 after the 500th), beside its baseline in
the same process: the page's statement (its rows read off `tenant_queue_stats`) against the same
page with each tenant's jobs counted by status over `jobs` (what a listing without the queue's
bookkeeping rows would run); `list_tenants_p50_ms` is the whole call, records built. `flat` compares the largest size's
page with the smallest's. Every run checks that the two agree.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from sqlalchemy import Connection, Engine, text

from benchmarks.queue import (
    add_database_url_argument,
    admin_server,
    bench_database,
    emit,
    emit_beside,
    machine_description,
    make_base,
    make_file_row,
    make_tenant,
    percentile,
    progress,
)
from control_plane import db, tenants

TENANTS = 1_000
PAGE = 100
SAMPLES = 30

# The page's tenants counted over `jobs` (ix_jobs_tenant_created_id finds each tenant's jobs).
_COUNTED = text(
    "SELECT t.name, j.status, count(j.id) FROM "
    "(SELECT id, name FROM tenants WHERE name > :after ORDER BY name LIMIT :limit) t "
    "LEFT JOIN jobs j ON j.tenant_id = t.id GROUP BY t.name, j.status"
)


def _add_jobs(
    engine: Engine, tenant_ids: list[str], base_id: str, file_id: str, queued: int, finished: int
) -> None:
    """`queued` queued jobs, half of them the first tenant's and the rest spread over the tenants,
    and `finished` finished ones spread over them, older than any queued job."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, "
                "hyperparameters, created_at, run_after) "
                "SELECT 'ftjob-' || :tag || '-' || g, "
                "(CAST(:ids AS text[]))[1 + CASE WHEN g % 2 = 0 THEN 0 ELSE g % :tenants END], "
                "CASE WHEN g <= :finished THEN "
                "(ARRAY['succeeded', 'failed', 'cancelled'])[1 + g % 3] ELSE 'queued' END, "
                ":base, :file, '{}'::jsonb, timestamptz '2026-01-01' + g * interval '1 ms', "
                "timestamptz '2026-01-01' FROM generate_series(1, :n) AS g"
            ),
            {
                "tag": f"{queued}-{finished}",
                "tenants": TENANTS,
                "ids": tenant_ids,
                "finished": finished,
                "base": base_id,
                "file": file_id,
                "n": queued + finished,
            },
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
        conn.execute(text("VACUUM ANALYZE tenant_queue_stats"))


def _p50(engine: Engine, run: Any) -> tuple[float, Any]:
    values, result = [], None
    with engine.connect() as conn:
        for _ in range(SAMPLES):
            started = time.perf_counter()
            result = run(conn)
            values.append((time.perf_counter() - started) * 1000)
    return percentile(values, 50), result


def _measure(engine: Engine, size: str, machine: str) -> dict[str, float]:
    medians: dict[str, float] = {}
    for label, after in (("first", None), ("after_500", "tenant-0499")):

        def ours(conn: Connection, after: str | None = after) -> Any:
            query = tenants.page_query(after, PAGE)
            return conn.execute(query).all()

        def listed(conn: Connection, after: str | None = after) -> Any:
            return tenants.list_tenants(conn, after=after, limit=PAGE)[0]

        def counted(conn: Connection, after: str | None = after) -> Any:
            return conn.execute(_COUNTED, {"after": after or "", "limit": PAGE}).all()

        p50, _ = _p50(engine, ours)
        baseline_p50, rows = _p50(engine, counted)
        listed_p50, page = _p50(engine, listed)
        by_status: dict[tuple[str, str], int] = {(r[0], r[1]): r[2] for r in rows if r[1]}
        for o in page:
            assert o.queued == by_status.get((o.tenant.name, "queued"), 0), o
            assert o.succeeded == by_status.get((o.tenant.name, "succeeded"), 0), o
        emit_beside(
            f"tenants_page_{label}",
            p50,
            "the same page counting each tenant's jobs by status over jobs",
            baseline_p50,
            machine,
            backlog=size,
            tenants=TENANTS,
            page=PAGE,
            list_tenants_p50_ms=round(listed_p50, 3),
        )
        medians[label] = p50
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tenants", description=__doc__)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with admin_server(args.database_url) as admin_url, bench_database(admin_url) as url:
        engine = db.make_engine(url, pool_size=2)
        machine = machine_description(engine)
        base_id = make_base(engine, "bench-base")
        ids = [make_tenant(engine, f"tenant-{n:04d}") for n in range(TENANTS)]
        file_id = make_file_row(engine, ids[0])
        _add_jobs(engine, ids, base_id, file_id, 1_000, 0)
        progress(f"1,000 tenants, 1,000 queued; {machine}")
        small = _measure(engine, "1,000 queued", machine)
        _add_jobs(engine, ids, base_id, file_id, 100_000, 100_000)
        progress("101,000 queued and 100,000 finished")
        large = _measure(engine, "101,000 queued + 100,000 finished", machine)
        for label in small:
            emit(
                {
                    "name": f"tenants_page_{label}_flat",
                    "p50_ms_smallest": round(small[label], 3),
                    "p50_ms_largest": round(large[label], 3),
                    "ratio": round(large[label] / small[label], 4),
                    "machine": machine,
                }
            )
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
