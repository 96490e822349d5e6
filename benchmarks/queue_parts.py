"""What the fair claim's parts cost its 8-claimer throughput, each taken out in turn.

    python -m benchmarks.queue_parts [--size 20000] [--rounds 6] [--cycles 120]
        [--claimers 8] [--database-url URL]

The issue's last target is the fair claim's 8-claimer throughput against the plain FIFO claim
(`python -m benchmarks.queue --scale`). This runs, in alternating rounds on twin databases
(claim + complete, 8 claimer threads or `--claimers`, 1,000 tenants with one holding half the
backlog, the same fill as `--scale`), the claim as it is against the same claim with a part
taken out:

- `loraforge`: `JobQueue.claim` as it is;
- `no_event`: its common claim without the job-started event;
- `line_head`: the claimable head of the first line that no claim holds, its tenant under its
  limit, and nothing else: no proof that it is the backlog's first (it is not when lines ahead
  of it are held), the same event and the same bookkeeping (the queue's triggers);
- `line_head_no_event`: that, without the event;
- `sync_commit`: the claim as it is, its transaction committed waiting for its WAL to reach
  the disk (the claim commits without waiting: `_LEASED_COMMIT` in control_plane/queue.py);
- `as_compiled`: the claim as it is, the driver getting its text as compiled, not stripped of
  comments and indentation (over psycopg's parse cache of 4,096 characters: parsed at every
  claim; `_driver_sql` in control_plane/queue.py);
- `procedural`: the common claim as a PL/pgSQL function of simple statements (the lines read
  once, then one job locked by primary key, its tenant's row, the update and the event), created
  in that side's database only: the same work without the one statement's CTEs and window sorts.
  Each of its statements reads a snapshot of its own, so a line passed because a claim in flight
  held its head no longer proves anything once that claim has committed: it hands such a claim
  to the queue's own (the walk of the front), which is counted (`fallbacks`);
- `plain_leased`: the plain claim committed as the claim commits, without waiting (the side
  of that name in `--scale`);
- `plain`: the plain FIFO claim with its partial index and no bookkeeping (the baseline).

The parts taken out are promises of the claim (the proof, the event): none of these variants
is one to ship. What is left in `line_head_no_event` is what keeping the line order costs.
One JSON line per side: its cycle's p50 and p99, its rate, against `plain` and against
`loraforge`, its CPU per cycle. Before them, `claim_text_parse`: psycopg's parse of the claim's
text per claim, stripped (within its parse cache) against as compiled (the `as_compiled` side's
text), the claimers' CPU alone.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from psycopg._queries import PostgresQuery
from psycopg.adapt import Transformer
from sqlalchemy import Dialect, TextClause, text
from sqlalchemy.dialects import postgresql

from benchmarks.queue import (
    SCALE_LIMIT,
    ScaleSide,
    _backlog,
    _fill,
    _round,
    _scale_schema,
    _warm,
    add_database_url_argument,
    admin_server,
    bench_database,
    emit,
    fair_claim,
    machine_description,
    percentile,
    plain_claim,
    plain_leased_claim,
    progress,
)
from control_plane import db
from control_plane import queue as job_queue
from control_plane.job_status import JobStatus
from control_plane.queue import JobQueue

CLAIMERS = 8


def _without_event(statement: str) -> str:
    """A claim statement without its `logged` step (the job-started event)."""
    start = statement.index("    logged AS (")
    end = statement.index("\n    )", start) + len("\n    )")
    return statement[:start].rstrip().rstrip(",") + statement[end:]


def _line_head(start_picked: str) -> TextClause:
    # The lines walked as the claim walks them (`queue_heads` in its front index's order, no
    # line of a tenant at its limit: revision 0013's `saturated`), without the proof.
    walk = job_queue._WALK.format(only="", first="", lines=job_queue.CLAIM_FRONT_LINES)
    return text(
        f"""
    WITH line AS MATERIALIZED (
        SELECT h.tenant_id, h.head_id,
               row_number() OVER (ORDER BY {job_queue._LINE_ORDER}) AS position
        FROM ({walk}) h
    ),
    picked AS (
        SELECT j.id, j.tenant_id FROM line JOIN jobs j ON j.id = line.head_id
        WHERE j.status = '{JobStatus.QUEUED}' AND j.run_after <= now()
        ORDER BY line.position
        LIMIT 1
        FOR UPDATE OF j SKIP LOCKED
    ),
    {start_picked}
    SELECT true AS proven, (SELECT tenant_id FROM picked) AS picked_tenant, claimed.*
    FROM (SELECT 1) AS one LEFT JOIN claimed ON true
    """
    )


# The common claim written as a function (the `procedural` side), for its database only.
_PROCEDURAL_CLAIM = """
CREATE OR REPLACE FUNCTION queue_claim_head(
  p_worker text, p_lease float8, p_prefer text, p_default_limit int, p_excluded text[],
  p_lines int,
  OUT proven boolean, OUT picked_tenant text, OUT synced boolean, OUT job jobs)
LANGUAGE plpgsql AS $$
DECLARE
  r record;
  t text[] := '{}'; b text[] := '{}'; hd text[] := '{}';
  pr int[] := '{}'; ru int[] := '{}'; se timestamptz[] := '{}';
  n int; i int;
  settled boolean; all_settled boolean := true;
  ready boolean; pos int := 0; ok boolean; dummy text;
BEGIN
  dummy := set_config('synchronous_commit', 'off', true);
  proven := false;
  SELECT s.default_max_running = p_default_limit INTO synced FROM queue_settings s;
  IF NOT coalesce(synced, false) THEN RETURN; END IF;
  FOR r IN
    SELECT h.tenant_id, h.base_model_id, h.head_id, -h.top_priority AS priority, h.running,
           coalesce(h.last_served_at, '-infinity') AS served
      FROM queue_heads h
     WHERE h.queued > 0 AND NOT h.saturated AND h.tenant_id <> ALL(p_excluded)
     ORDER BY h.top_priority DESC, h.running, h.last_served_at NULLS FIRST, h.head_created_at, h.head_id
     LIMIT p_lines + 1
  LOOP
    t := t || r.tenant_id; b := b || r.base_model_id; hd := hd || r.head_id;
    pr := pr || r.priority; ru := ru || r.running; se := se || r.served;
  END LOOP;
  n := coalesce(array_length(hd, 1), 0);
  IF n = 0 THEN proven := true; RETURN; END IF;
  FOR i IN 1 .. least(n, p_lines) LOOP
    settled := p_prefer IS NULL OR b[i] = p_prefer OR i = n
               OR ROW(pr[i + 1], ru[i + 1], se[i + 1]) > ROW(pr[i], ru[i], se[i]);
    IF settled AND (i = 1 OR (all_settled AND pr[i] = pr[1] AND ru[i] = ru[1]
                              AND NOT t[i] = ANY(t[1:i - 1]))) THEN
      SELECT j.run_after <= now() INTO ready FROM jobs j
       WHERE j.id = hd[i] AND j.status = 'queued' FOR UPDATE SKIP LOCKED;
      IF FOUND THEN pos := i; EXIT; END IF;
    END IF;
    all_settled := all_settled AND settled;
  END LOOP;
  IF pos = 0 OR NOT ready THEN RETURN; END IF;
  IF pos > 1 THEN
    SELECT count(*) = pos - 1 INTO ok FROM jobs j
     WHERE j.id = ANY(hd[1:pos - 1]) AND j.status = 'queued' AND j.run_after <= now();
    IF NOT ok THEN RETURN; END IF;
  END IF;
  picked_tenant := t[pos];
  proven := true;
  PERFORM 1 FROM tenant_queue_stats s JOIN tenants tt ON tt.id = s.tenant_id
   WHERE s.tenant_id = picked_tenant AND s.running < coalesce(tt.max_running_jobs, p_default_limit)
   FOR UPDATE OF s;
  IF NOT FOUND THEN RETURN; END IF;
  UPDATE jobs SET status = 'running', attempt = jobs.attempt + 1, lease_owner = p_worker,
         lease_expires_at = now() + make_interval(secs => p_lease),
         started_at = coalesce(jobs.started_at, now()),
         error_code = NULL, error_message = NULL, error_param = NULL
   WHERE jobs.id = hd[pos]
  RETURNING jobs.* INTO job;
  INSERT INTO job_events (job_id, message, data)
  VALUES (job.id, 'Job started by ' || p_worker || ' (attempt ' || job.attempt || ' of '
                  || job.max_attempts || ')',
          jsonb_build_object('status', 'running', 'attempt', job.attempt, 'worker', p_worker));
END $$;
"""
_CALL_PROCEDURAL = (
    "SELECT r.proven, r.picked_tenant, r.synced, (r.job).* FROM queue_claim_head("
    "%(worker)s, %(lease)s, %(prefer)s, %(default_limit)s, %(excluded)s, "
    f"{job_queue.CLAIM_FRONT_LINES}) r"
)
_procedural_fallbacks = [0]


def _procedural_claim(queue: JobQueue, worker: str) -> str | None:
    row = queue._run_on_driver(_CALL_PROCEDURAL, queue._claim_params(worker, None, []))
    if row.id is not None:
        return str(row.id)
    _procedural_fallbacks[0] += 1
    job = queue.claim(worker)
    return job.id if job is not None else None


# The claim committed as the plain claim commits, waiting for the WAL flush.
_WAITED_COMMIT = job_queue._LEASED_COMMIT.replace("'off'", "'on'")


def _waiting_head() -> TextClause:
    head = job_queue._claim_head(job_queue.CLAIM_FRONT_LINES).text
    assert job_queue._LEASED_COMMIT in head
    return text(head.replace(job_queue._LEASED_COMMIT, _WAITED_COMMIT))


def _claim_by(
    statement: TextClause, *, stripped: bool = True
) -> Callable[[JobQueue, str], str | None]:
    """Claim with `statement` on the queue's driver path, its text stripped as the claim's is
    (`_driver_sql`) or as SQLAlchemy compiles it (comments and indentation kept: over psycopg's
    parse cache, parsed again at every claim); where it claims nothing (every line held, or its
    proof failed), the queue's own claim."""

    @functools.cache
    def driver_text(dialect: Dialect) -> str:
        if stripped:
            return job_queue._driver_sql(statement, dialect)
        return str(statement.compile(dialect=dialect))

    def claim_one(queue: JobQueue, worker: str) -> str | None:
        sql = driver_text(queue.engine.dialect)
        row = queue._run_on_driver(sql, queue._claim_params(worker, None, []))
        if row.id is not None:
            return str(row.id)
        job = queue.claim(worker)
        return job.id if job is not None else None

    return claim_one


def sides() -> list[tuple[str, str, Callable[[JobQueue, str], str | None]]]:
    """(label, schema, claim) for every side, the baseline last."""
    head = job_queue._claim_head(job_queue.CLAIM_FRONT_LINES).text
    quiet = _without_event(job_queue._START_PICKED)
    return [
        ("loraforge", "loraforge", fair_claim),
        ("no_event", "loraforge", _claim_by(text(_without_event(head)))),
        ("line_head", "loraforge", _claim_by(_line_head(job_queue._START_PICKED))),
        ("line_head_no_event", "loraforge", _claim_by(_line_head(quiet))),
        ("sync_commit", "loraforge", _claim_by(_waiting_head())),
        ("as_compiled", "loraforge", _claim_by(text(head), stripped=False)),
        ("procedural", "loraforge", _procedural_claim),
        ("plain_leased", "plain", plain_leased_claim),
        ("plain", "plain", plain_claim),
    ]


PARSES = 5000


def bench_claim_text_parse(machine: str) -> None:
    """What psycopg spends turning the claim's text into the server's form (its parse of the
    placeholders), per claim: the stripped text, kept in psycopg's cache after the first, against
    the text as compiled, over the cache's limit and parsed every time. The claimers' CPU
    alone, no server."""
    dialect = postgresql.psycopg.dialect()  # type: ignore[no-untyped-call]
    statement = job_queue._claim_head(job_queue.CLAIM_FRONT_LINES)
    texts = {
        "stripped": job_queue._driver_sql(statement, dialect),
        "as_compiled": str(statement.compile(dialect=dialect)),
    }
    params = job_queue._params(
        worker="w", lease=60, prefer=None, default_limit=SCALE_LIMIT, excluded=[]
    )
    best: dict[str, float] = {}
    for _ in range(3):
        for label, sql in texts.items():
            query = PostgresQuery(Transformer())
            start = time.process_time()
            for _ in range(PARSES):
                query.convert(sql, params)
            seconds = (time.process_time() - start) / PARSES
            best[label] = min(best.get(label, seconds), seconds)
    emit(
        {
            "name": "claim_text_parse",
            "chars": len(texts["stripped"]),
            "us_per_claim": round(best["stripped"] * 1e6, 2),
            "baseline": "the same text as compiled, comments and indentation kept",
            "baseline_chars": len(texts["as_compiled"]),
            "baseline_us_per_claim": round(best["as_compiled"] * 1e6, 2),
            "ratio": round(best["stripped"] / best["as_compiled"], 4),
            "machine": machine,
        }
    )


def run(admin_url: str, size: int, rounds: int, cycles: int, claimers: int = CLAIMERS) -> None:
    plan = sides()
    with ExitStack() as stack:
        urls = [stack.enter_context(bench_database(admin_url)) for _ in plan]
        scale: list[ScaleSide] = []
        files: dict[str, str] = {}
        for (label, schema, claim_one), url in zip(plan, urls, strict=True):
            engine = db.make_engine(url, pool_size=claimers + 4)
            base_id, file_id = _scale_schema(engine, schema)
            if label == "procedural":
                with engine.begin() as conn:
                    conn.exec_driver_sql(_PROCEDURAL_CLAIM)
            scale.append(ScaleSide(label, engine, base_id, claim_one))
            files[label] = file_id
        machine = machine_description(scale[0].engine)
        try:
            bench_claim_text_parse(machine)
            for side in scale:
                _backlog(side, files[side.label], size)
                _warm(side, files[side.label], claimers)
            _procedural_fallbacks[0] = 0
            for index in range(rounds):
                progress(f"round {index + 1} of {rounds}")
                for side in scale if index % 2 == 0 else scale[::-1]:
                    claimed = _round(side, claimers, cycles, processes=False)
                    _fill(side, files[side.label], claimed)
            rate = {side.label: side.cycles / side.seconds for side in scale}
            for side in scale:
                with side.engine.connect() as conn:
                    over = conn.execute(
                        text("SELECT count(*) FROM tenant_queue_stats WHERE running > :limit"),
                        {"limit": SCALE_LIMIT},
                    ).scalar()
                record: dict[str, Any] = {
                    "name": "claim_part",
                    "side": side.label,
                    "queued": size,
                    "claimers": claimers,
                    "cycles": side.cycles,
                    "p50_ms": round(percentile(side.latencies or [], 50), 2),
                    "p99_ms": round(percentile(side.latencies or [], 99), 2),
                    "jobs_per_s": round(rate[side.label], 1),
                    "baseline": "plain",
                    "baseline_jobs_per_s": round(rate["plain"], 1),
                    "ratio_throughput": round(rate[side.label] / rate["plain"], 3),
                    "ratio_vs_loraforge": round(rate[side.label] / rate["loraforge"], 3),
                    "cpu_ms_per_job": side.cpu_ms_per_job(),
                    "tenants_over_limit": over,
                    **(
                        {"fallbacks": _procedural_fallbacks[0]}
                        if side.label == "procedural"
                        else {}
                    ),
                    "machine": machine,
                }
                emit(record)
        finally:
            for side in scale:
                side.engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.queue_parts", description=__doc__)
    parser.add_argument("--size", type=int, default=20_000, help="queued jobs (kept topped up)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds")
    parser.add_argument("--cycles", type=int, default=120, help="cycles per claimer per round")
    parser.add_argument(
        "--claimers", type=int, default=CLAIMERS, help="claimer threads (1: the latency alone)"
    )
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    if args.claimers < 1 or args.rounds < 1 or args.cycles < 1:
        parser.error("claimers, rounds and cycles at least 1")
    if args.size < 4 * args.claimers * args.cycles:
        parser.error("--size at least 4 x --claimers x --cycles")
    with admin_server(args.database_url) as admin_url:
        run(admin_url, args.size, args.rounds, args.cycles, args.claimers)
    progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
