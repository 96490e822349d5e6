"""What webhooks cost (`control_plane.webhooks`, revision 0022).

    python -m benchmarks.webhooks [--cycles 300] [--rounds 4] [--deliveries 400]
        [--database-url URL]

One tenant, one base, a backlog of queued jobs; one claimer. One JSON line each, beside its
baseline measured in the same process:

- `webhook_finish_no_endpoint`: claim + complete latency (p50) with the finish's trigger on and
  no endpoint registered (what every platform pays), against the same cycles with the trigger
  disabled, in alternating rounds on one database;
- `webhook_finish_one_endpoint`: the same with one endpoint of the tenant taking every event
  (an outbox row written by each finish), against the trigger disabled;
- `webhook_delivery_rate`: deliveries posted and recorded per second by `deliver_due` passes to
  a receiver on 127.0.0.1 (each signed, taken and recorded in the database), against the same
  bodies posted with httpx alone (no signature, no database).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
from sqlalchemy import Engine, text

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
from control_plane import db, webhooks
from control_plane.queue import JobQueue
from tests.factories import enqueue_jobs


class _Quiet(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _cycles(queue: JobQueue, n: int) -> list[float]:
    values = []
    for _ in range(n):
        started = time.perf_counter()
        job = queue.claim("bench")
        assert job is not None
        queue.complete(job.id, "bench")
        values.append((time.perf_counter() - started) * 1000)
    return values


def _trigger(engine: Engine, on: bool) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(f"ALTER TABLE jobs {'ENABLE' if on else 'DISABLE'} TRIGGER webhook_job_finished")
        )


def _finish_rounds(
    engine: Engine, queue: JobQueue, cycles: int, rounds: int
) -> tuple[float, float]:
    """p50 of claim + complete with the trigger on, and off, in alternating rounds."""
    on: list[float] = []
    off: list[float] = []
    for _ in range(rounds):
        for enabled, into in ((True, on), (False, off)):
            _trigger(engine, enabled)
            into.extend(_cycles(queue, cycles))
    _trigger(engine, True)
    return percentile(on, 50), percentile(off, 50)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.webhooks", description=__doc__)
    parser.add_argument("--cycles", type=int, default=300, help="claim + complete cycles a round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--deliveries", type=int, default=400)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    with admin_server(args.database_url) as admin_url, bench_database(admin_url) as db_url:
        engine = db.make_engine(db_url, pool_size=2)
        machine = machine_description(engine)
        base_id = make_base(engine, "bench-base")
        tenant_id = make_tenant(engine, "hooked")
        file_id = make_file_row(engine, tenant_id)
        per_phase = 2 * args.cycles * args.rounds + 10
        enqueue_jobs(engine, tenant_id, base_id, file_id, 2 * per_phase + args.deliveries)
        with engine.begin() as conn:
            conn.execute(text("ANALYZE jobs"))
        queue = JobQueue(engine, max_running_per_tenant=10_000)
        _cycles(queue, 10)  # warm
        progress(f"{2 * per_phase} jobs queued; {machine}")
        on, off = _finish_rounds(engine, queue, args.cycles, args.rounds)
        emit_beside(
            "webhook_finish_no_endpoint",
            on,
            "the same claim + complete with the finish's webhook trigger disabled",
            off,
            machine,
            cycles=args.cycles * args.rounds,
        )
        with engine.begin() as conn:
            webhooks.create_endpoint(conn, tenant_id, url)
        on, off = _finish_rounds(engine, queue, args.cycles, args.rounds)
        with engine.connect() as conn:
            written = conn.execute(text("SELECT count(*) FROM webhook_deliveries")).scalar_one()
        emit_beside(
            "webhook_finish_one_endpoint",
            on,
            "the same claim + complete with the finish's webhook trigger disabled",
            off,
            machine,
            cycles=args.cycles * args.rounds,
            deliveries_written=written,
        )

        with engine.begin() as conn:
            conn.execute(text("DELETE FROM webhook_deliveries"))
        _cycles(queue, args.deliveries)
        started = time.perf_counter()
        delivered = 0
        while pass_delivered := webhooks.deliver_due(
            engine, retry_schedule=[5.0], timeout=10, allow_private=True
        ):
            delivered += pass_delivered
        ours_s = time.perf_counter() - started
        with engine.connect() as conn:
            bodies = [
                json.dumps(p)
                for p in conn.execute(text("SELECT payload FROM webhook_deliveries")).scalars()
            ]
        started = time.perf_counter()
        with httpx.Client(timeout=10) as http:
            for body in bodies:
                http.post(url, content=body, headers={"content-type": "application/json"})
        plain_s = time.perf_counter() - started
        emit(
            {
                "name": "webhook_delivery_rate",
                "deliveries": delivered,
                "per_second": round(delivered / ours_s, 1),
                "baseline": "the same bodies posted with httpx alone (no signature, no database)",
                "baseline_per_second": round(len(bodies) / plain_s, 1),
                "ratio": round((delivered / ours_s) / (len(bodies) / plain_s), 4),
                "machine": machine,
            }
        )
        engine.dispose()
    server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
