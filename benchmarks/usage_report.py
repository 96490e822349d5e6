"""What the usage reports cost beside a large history of metered calls.

    python -m benchmarks.usage_report [--calls 1000000] [--tenants 1000] [--repeats 15]

A throwaway database (migrated to head) gets `--tenants` tenants, one session and one model
each, and `--calls` metered interactive calls finished over the last 30 days: half of them the
first tenant's (a heavy tenant), the rest spread over the others, each a forward_backward's
training tokens, a sample's prompt and sampled tokens or a save's checkpoint. Then, each read
`--repeats` times in alternating rounds beside a baseline:

- `tenant_report_light` / `tenant_report_heavy`: a tenant's hourly report over 14 days
  (`usage.buckets`, the SDK's `get_billing_usage`) for a light tenant and for the heavy one,
  beside the same statement with index scans off (what it would cost without
  `ix_interactive_calls_tenant_usage`: a read of every metered call);
- `platform_report`: every tenant's totals over 30 days (`usage.tenant_totals`, `/v1/usage`),
  beside one pass summing every metered call of the window by tenant.

One JSON line each (median ms beside the baseline's), with the plan's top nodes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, text

from benchmarks.interactive import interactive_services
from benchmarks.queue import (
    add_database_url_argument,
    emit_beside,
    machine_description,
    make_base,
    progress,
)
from control_plane import usage

_FILL = text(
    """
    INSERT INTO interactive_calls (id, model_id, tenant_id, base_model_id, seq, kind, request,
                                   status, finished_at, usage)
    SELECT 'fut-bench-' || g, m.id, m.tenant_id, :base, g,
           (ARRAY['forward_backward', 'sample', 'save_weights'])[1 + g % 3], '{}'::jsonb,
           'completed', now() - (g % 43200) * interval '1 minute',
           CASE g % 3
             WHEN 0 THEN jsonb_build_object('training_tokens', 100 + g % 900)
             WHEN 1 THEN jsonb_build_object('prefill_tokens', 50 + g % 200,
                                            'sampled_tokens', 10 + g % 300)
             ELSE '{"checkpoints": 1}'::jsonb
           END
    FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) g
    JOIN interactive_models m ON m.id = CASE WHEN g % 2 = 0 THEN 'imdl-bench-0'
                                        ELSE 'imdl-bench-' || (1 + g % (CAST(:tenants AS integer) - 1)) END
    """
)


# `tenant-bench-<g>` named `bench-<g, five digits>`, g from 0: the usage benchmarks' tenants.
BENCH_TENANTS = text(
    "INSERT INTO tenants (id, name) SELECT 'tenant-bench-' || g, 'bench-' || "
    "lpad(g::text, 5, '0') FROM generate_series(0, CAST(:n AS integer) - 1) g"
)


def _setup(engine: Engine, tenants: int, calls: int) -> None:
    base = make_base(engine, "usage-bench-base")
    with engine.begin() as conn:
        conn.execute(BENCH_TENANTS, {"n": tenants})
        conn.execute(
            text(
                "INSERT INTO interactive_sessions (id, tenant_id) SELECT 'sess-bench-' || g, "
                "'tenant-bench-' || g FROM generate_series(0, CAST(:n AS integer) - 1) g"
            ),
            {"n": tenants},
        )
        conn.execute(
            text(
                "INSERT INTO interactive_models (id, session_id, tenant_id, base_model_id, kind) "
                "SELECT 'imdl-bench-' || g, 'sess-bench-' || g, 'tenant-bench-' || g, :base, "
                "'training' FROM generate_series(0, CAST(:n AS integer) - 1) g"
            ),
            {"n": tenants, "base": base},
        )
    step = 100_000
    for first in range(0, calls, step):
        with engine.begin() as conn:
            conn.execute(
                _FILL,
                {
                    "first": first,
                    "last": min(first + step, calls) - 1,
                    "base": base,
                    "tenants": tenants,
                },
            )
        progress(f"{min(first + step, calls):,} calls")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE interactive_calls"))


# The platform's totals in one pass over every metered call of the window (one hash aggregate),
# where the report reads each tenant's own range of the index.
_ONE_PASS = text(
    """
    SELECT t.id, t.name,
           sum((c.usage ->> 'training_tokens')::bigint), sum((c.usage ->> 'prefill_tokens')::bigint),
           sum((c.usage ->> 'sampled_tokens')::bigint), sum((c.usage ->> 'checkpoints')::bigint)
    FROM interactive_calls c JOIN tenants t ON t.id = c.tenant_id
    WHERE c.usage IS NOT NULL AND c.finished_at >= :start AND c.finished_at < :end
    GROUP BY t.id, t.name ORDER BY t.name
    """
)


def _timed(engine: Engine, read: Callable[[Connection], Any], indexed: bool) -> float:
    with engine.begin() as conn:
        if not indexed:
            conn.execute(text("SET LOCAL enable_indexscan = off"))
            conn.execute(text("SET LOCAL enable_bitmapscan = off"))
            conn.execute(text("SET LOCAL enable_indexonlyscan = off"))
        started = time.perf_counter()
        read(conn)
        return (time.perf_counter() - started) * 1000


def _plan(engine: Engine, sql: str, params: dict[str, Any]) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(text("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql), params)
        return [row[0] for row in rows][:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.usage_report", description=__doc__)
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with interactive_services(args.database_url, lease_seconds=30) as (services, _):
        engine = services.engine
        machine = machine_description(engine)
        _setup(engine, args.tenants, args.calls)
        hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        fortnight = (hour - timedelta(days=14), hour + timedelta(hours=1))
        month = (hour - timedelta(days=30), hour + timedelta(hours=1))

        def one_pass(conn: Connection) -> Any:
            return conn.execute(_ONE_PASS, {"start": month[0], "end": month[1]}).all()

        reads: dict[str, tuple[Callable[[Connection], Any], str, dict[str, Any]]] = {
            "tenant_report_light": (
                lambda c: usage.buckets(c, "tenant-bench-7", *fortnight),
                str(usage._BUCKETS),
                {"tenant": "tenant-bench-7", "start": fortnight[0], "end": fortnight[1]},
            ),
            "tenant_report_heavy": (
                lambda c: usage.buckets(c, "tenant-bench-0", *fortnight),
                str(usage._BUCKETS),
                {"tenant": "tenant-bench-0", "start": fortnight[0], "end": fortnight[1]},
            ),
            "platform_report": (
                lambda c: usage.tenant_totals(c, *month),
                str(usage._TENANTS),
                {"start": month[0], "end": month[1]},
            ),
        }
        for name, (read, sql, params) in reads.items():
            ours: list[float] = []
            theirs: list[float] = []
            _timed(engine, read, True)  # warm
            # The platform's report beside one pass over the window's calls (its statement with
            # index scans off would scan the table once per tenant); the tenant's beside itself
            # reading every metered call.
            baseline = one_pass if name == "platform_report" else read
            for _ in range(args.repeats):
                ours.append(_timed(engine, read, True))
                theirs.append(_timed(engine, baseline, name == "platform_report"))
            progress(
                f"{name}: {statistics.median(ours):.1f} against {statistics.median(theirs):.1f} ms"
            )
            emit_beside(
                name,
                statistics.median(ours),
                (
                    "every metered call of the window summed in one pass"
                    if name == "platform_report"
                    else "the same statement with index scans off (every metered call read)"
                ),
                statistics.median(theirs),
                machine,
                calls=args.calls,
                tenants=args.tenants,
                repeats=args.repeats,
                plan=_plan(engine, sql, params),
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
