"""What the notification of a finished interactive call costs the transactions that finish calls.

    python -m benchmarks.finish_notify [--calls 4000] [--threads 1,4] [--rounds 3]

Revision 0033's trigger notifies `loraforge_interactive_done` whenever an update finishes a call
(the API's polls wake on it). PostgreSQL orders the commits of notifying transactions, so the
question is whether executors answering calls at once commit more slowly. Here `--calls` calls
are finished one transaction each (`UPDATE ... SET status = 'completed'`, as an executor's
answer moves them), by 1 and by 4 threads, with the trigger on and then off (`ALTER TABLE ...
DISABLE TRIGGER`), in alternating rounds on one throwaway database, one API-like LISTEN
connection open throughout. One JSON line per thread count: the commits a second with the
notification beside those without.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import psycopg
from sqlalchemy import Engine, text

from benchmarks.queue import (
    add_database_url_argument,
    admin_server,
    bench_database,
    emit_beside,
    machine_description,
    progress,
)
from control_plane import db
from control_plane.api.call_wakeups import CHANNEL

_SCENE = (
    "INSERT INTO tenants (id, name) VALUES ('t-bench', 'bench')",
    "INSERT INTO base_models (id, name, source, source_kind) VALUES ('b-bench', 'b', 'x', 'dir')",
    "INSERT INTO interactive_sessions (id, tenant_id) VALUES ('s-bench', 't-bench')",
    "INSERT INTO interactive_models (id, session_id, tenant_id, base_model_id, kind, lora_config) "
    "VALUES ('m-bench', 's-bench', 't-bench', 'b-bench', 'sampler', '{}')",
    "INSERT INTO interactive_calls (id, model_id, tenant_id, base_model_id, seq, kind, request, "
    "status) SELECT 'c' || g, 'm-bench', 't-bench', 'b-bench', g, 'sample', '{}', 'running' "
    "FROM generate_series(0, :last) g",
)


def _round(engine: Engine, calls: int, threads: int, notify: bool) -> float:
    """Commits a second finishing `calls` calls from `threads` threads, a call a transaction."""
    switch = "ENABLE" if notify else "DISABLE"
    with engine.begin() as conn:
        conn.execute(
            text(f"ALTER TABLE interactive_calls {switch} TRIGGER tr_interactive_calls_finished")
        )
        conn.execute(text("UPDATE interactive_calls SET status = 'running'"))
    share = calls // threads

    def finish(first: int) -> None:
        for index in range(first, first + share):
            with engine.begin() as conn:
                conn.execute(
                    text("UPDATE interactive_calls SET status = 'completed' WHERE id = :id"),
                    {"id": f"c{index}"},
                )

    workers = [threading.Thread(target=finish, args=(k * share,)) for k in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return share * threads / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finish_notify", description=__doc__)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--rounds", type=int, default=3)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.threads.split(",")]
    with admin_server(args.database_url) as admin_url, bench_database(admin_url) as url:
        engine = db.make_engine(url, pool_size=max(counts) + 2)
        machine = machine_description(engine)
        with engine.begin() as conn:
            for statement in _SCENE:
                conn.execute(text(statement), {"last": args.calls - 1})
        with psycopg.connect(db.libpq_url(url), autocommit=True) as listener:
            listener.execute(f"LISTEN {CHANNEL}")  # an API process's, as in production
            for threads in counts:
                rates: dict[bool, list[float]] = {True: [], False: []}
                for index in range(args.rounds):  # alternating: the machine's load drifts
                    for notify in (True, False):
                        rates[notify].append(_round(engine, args.calls, threads, notify))
                        progress(
                            f"{threads} threads, round {index}, notify {notify}: "
                            f"{rates[notify][-1]:.0f} commits/s"
                        )
                    for _ in listener.notifies(timeout=0):
                        pass  # drained, as the API's listener would
                ours, theirs = (statistics.median(rates[n]) for n in (True, False))
                emit_beside(
                    "finish_notify_commits",
                    1000 / ours,
                    "the same finishes with the trigger disabled (no notification)",
                    1000 / theirs,
                    machine,
                    threads=threads,
                    calls=args.calls,
                    commits_per_s=round(ours, 1),
                    baseline_commits_per_s=round(theirs, 1),
                    statistic="median over rounds: p50_ms the ms a finished call's commit costs "
                    "(1000 / commits a second, all threads together)",
                )
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
