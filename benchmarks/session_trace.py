"""What a session's Perfetto trace costs to download (`control_plane.session_traces`).

    python -m benchmarks.session_trace [--calls 100000] [--models 4] [--repeats 5]

A throwaway database (migrated to head) gets one session with `--models` training models and
`--calls` finished calls spread over them, a second apart, as a long training loop leaves them.
Then, `--repeats` times in alternating rounds: the trace built as its download builds it (the
session's calls read, then the trace), beside the read of the calls alone (the baseline: what
the database costs, so the trace's own cost is the difference). One JSON line, with the trace's
size.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sqlalchemy import text

from benchmarks.interactive import interactive_services
from benchmarks.queue import add_database_url_argument, emit_beside, machine_description, make_base
from control_plane import session_traces

_SETUP = [
    "INSERT INTO tenants (id, name) VALUES ('tenant-trace', 'trace-bench')",
    "INSERT INTO interactive_sessions (id, tenant_id) VALUES ('sess-trace', 'tenant-trace')",
    "INSERT INTO interactive_models (id, session_id, tenant_id, base_model_id, kind) "
    "SELECT 'imdl-trace-' || g, 'sess-trace', 'tenant-trace', :base, 'training' "
    "FROM generate_series(0, :models - 1) g",
    "INSERT INTO interactive_calls (id, model_id, tenant_id, base_model_id, seq, kind, status, "
    "claimed_by, created_at, started_at, finished_at) "
    "SELECT 'fut-trace-' || g, 'imdl-trace-' || (g % :models), 'tenant-trace', :base, "
    "g / :models, (ARRAY['forward_backward', 'optim_step', 'sample'])[1 + g % 3], 'completed', "
    "'executor-1', t, t + interval '50 milliseconds', t + interval '400 milliseconds' "
    "FROM generate_series(0, :calls - 1) g, "
    "LATERAL (SELECT now() - (:calls - g) * interval '1 second' AS t) s",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.session_trace", description=__doc__)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with interactive_services(args.database_url, lease_seconds=30) as (services, _):
        engine = services.engine
        machine = machine_description(engine)
        base = make_base(engine, "trace-bench-base")
        with engine.begin() as conn:
            for statement in _SETUP:
                conn.execute(
                    text(statement), {"base": base, "models": args.models, "calls": args.calls}
                )
        built: list[float] = []
        read: list[float] = []
        size = 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            with engine.connect() as conn:
                calls = session_traces.session_calls(conn, "tenant-trace", "sess-trace")
            read.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            with engine.connect() as conn:
                calls = session_traces.session_calls(conn, "tenant-trace", "sess-trace")
            size = len(session_traces.build("sess-trace", calls))
            built.append((time.perf_counter() - started) * 1000)
        emit_beside(
            "session_trace",
            statistics.median(built),
            "the session's calls read alone",
            statistics.median(read),
            machine,
            calls=args.calls,
            models=args.models,
            trace_bytes=size,
            repeats=args.repeats,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
