"""What the interactive claim costs, and what other tenants wait, under one tenant's burst.

    python -m benchmarks.interactive_turns [--sizes 100,1000,10000] [--claimers 1,4]
        [--cycles 300] [--database-url URL]

One tenant asks a burst of calls of one model (an RL loop's samples asked at once); 20 other
tenants each ask 3 calls of a model of their own a moment later. Claimers (threads, each an
executor of the base) claim and answer calls. Two sides on the same rows, in alternating
rounds: the claim as it is (`control_plane.interactive_calls.claim_next`: the tenants in turn,
each model's first unfinished call read by a skip scan) and the claim it replaced (the oldest
pending call whose model has nothing earlier unanswered, `OLDEST_FIRST` below). One JSON line
per burst size and claimer count:

- `interactive_claim_under_burst`: the claim statement's p50 and p99 (taken and committed),
  beside the oldest-first claim's;
- `others_wait_claims`: how many calls were taken before every other tenant had its first call
  taken (the claim as it is: about one a tenant; oldest first: the burst first).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

from sqlalchemy import Engine, TextClause, create_engine, text

from benchmarks.queue import (
    add_database_url_argument,
    admin_server,
    bench_database,
    emit,
    machine_description,
    make_tenant,
    percentile,
    progress,
)
from control_plane.interactive_calls import _CLAIM
from tests.factories import interactive_model, interactive_session, make_base

OTHERS = 20
OTHER_CALLS = 3

# The claim before revision 0025, verbatim: the oldest pending call that can run.
OLDEST_FIRST = text(
    """
    WITH next AS (
        SELECT c.id, m.id AS model_id
        FROM interactive_calls c
        JOIN interactive_models m ON m.id = c.model_id
        WHERE c.base_model_id = :base AND c.status = 'pending'
          AND (m.held_by = :executor OR (m.held_by IS NULL AND m.unloaded_at IS NULL))
          AND NOT EXISTS (
              SELECT 1 FROM interactive_calls e
              WHERE e.model_id = c.model_id AND e.seq < c.seq
                AND e.status IN ('pending', 'running'))
        ORDER BY c.created_at, c.seq
        LIMIT 1
        FOR UPDATE OF c, m SKIP LOCKED
    ),
    held AS (
        UPDATE interactive_models m SET held_by = :executor
        FROM next WHERE m.id = next.model_id
        RETURNING m.id
    )
    UPDATE interactive_calls c
    SET status = 'running', claimed_by = :executor, started_at = now()
    FROM next, held
    WHERE c.id = next.id
    RETURNING c.id, c.model_id, c.tenant_id
    """
)
_FINISH = text(
    "UPDATE interactive_calls SET status = 'completed', result = '{}', finished_at = now() "
    "WHERE id = :id"
)


def _fill(engine: Engine, base: str, tenants: list[str], size: int) -> None:
    """The burst (tenant 0, one model, `size` calls), then each other tenant's calls."""
    with engine.begin() as conn:
        conn.execute(
            text("TRUNCATE interactive_turns, interactive_calls, interactive_models CASCADE")
        )
    for index, tenant in enumerate(tenants):
        interactive_model(engine, f"sess-{index}", tenant, base, f"imdl-{index:03d}")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO interactive_calls (id, model_id, tenant_id, base_model_id, seq, "
                "kind, created_at) SELECT 'burst-' || s, 'imdl-000', :tenant, :base, s, "
                "'sample', now() - interval '1 hour' + s * interval '1 microsecond' "
                "FROM generate_series(0, :size - 1) s"
            ),
            {"tenant": tenants[0], "base": base, "size": size},
        )
        conn.execute(
            text(
                "INSERT INTO interactive_calls (id, model_id, tenant_id, base_model_id, seq, "
                "kind) SELECT 'other-' || t || '-' || s, 'imdl-' || lpad(t::text, 3, '0'), "
                "(SELECT tenant_id FROM interactive_models "
                " WHERE id = 'imdl-' || lpad(t::text, 3, '0')), :base, s, 'forward' "
                "FROM generate_series(1, :others) t, generate_series(0, :calls - 1) s"
            ),
            {"base": base, "others": OTHERS, "calls": OTHER_CALLS},
        )
        conn.execute(text("ANALYZE interactive_calls"))


def _drain(engine: Engine, claim: TextClause, base: str, claimers: int, cycles: int) -> Any:
    """`cycles` claims and answers shared by `claimers` threads: (claim latencies in ms, the
    tenants' models in the order their calls were taken)."""
    latencies: list[float] = []
    taken: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        try:
            while True:
                with lock:
                    if len(taken) >= cycles:
                        return
                t0 = time.perf_counter()
                with engine.begin() as conn:
                    row = conn.execute(claim, {"base": base, "executor": name}).first()
                elapsed = (time.perf_counter() - t0) * 1000
                if row is None:
                    continue  # what is left is held by another claimer, or running
                with lock:
                    latencies.append(elapsed)
                    taken.append(row.model_id)
                with engine.begin() as conn:
                    conn.execute(_FINISH, {"id": row.id})
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(f"exec-{i}",)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return latencies, taken


def _others_wait(taken: list[str]) -> int | None:
    """Calls taken before every other tenant had its first call taken (None: not within)."""
    seen: set[str] = set()
    for index, model in enumerate(taken):
        if model != "imdl-000":
            seen.add(model)
            if len(seen) == OTHERS:
                return index + 1
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.interactive_turns", description=__doc__
    )
    parser.add_argument("--sizes", default="100,1000,10000", help="burst sizes, comma-separated")
    parser.add_argument("--claimers", default="1,4", help="claimer counts, comma-separated")
    parser.add_argument("--cycles", type=int, default=300, help="claims a round and side")
    parser.add_argument("--rounds", type=int, default=2)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with admin_server(args.database_url) as admin_url, bench_database(admin_url) as db_url:
        engine = create_engine(db_url, pool_size=12)
        machine = machine_description(engine)
        base = make_base(engine).id
        tenants = [make_tenant(engine, f"tenant-{i}") for i in range(OTHERS + 1)]
        for index, tenant in enumerate(tenants):
            interactive_session(engine, tenant, f"sess-{index}")
        for size in (int(s) for s in args.sizes.split(",")):
            for claimers in (int(c) for c in args.claimers.split(",")):
                progress(f"{machine}; burst {size}, {claimers} claimer(s)")
                sides: dict[str, tuple[list[float], list[int | None]]] = {
                    "turns": ([], []),
                    "oldest_first": ([], []),
                }
                for _ in range(args.rounds):
                    for side, claim in (("turns", _CLAIM), ("oldest_first", OLDEST_FIRST)):
                        _fill(engine, base, tenants, size)
                        cycles = min(args.cycles, size + OTHERS * OTHER_CALLS)
                        latencies, taken = _drain(engine, claim, base, claimers, cycles)
                        sides[side][0].extend(latencies)
                        sides[side][1].append(_others_wait(taken))
                ours, theirs = sides["turns"], sides["oldest_first"]
                p50, base_p50 = percentile(ours[0], 50), percentile(theirs[0], 50)
                emit(
                    {
                        "name": "interactive_claim_under_burst",
                        "burst": size,
                        "claimers": claimers,
                        "other_tenants": OTHERS,
                        "p50_ms": round(p50, 3),
                        "p99_ms": round(percentile(ours[0], 99), 3),
                        "baseline": "the oldest-first claim it replaced, same rows",
                        "baseline_p50_ms": round(base_p50, 3),
                        "baseline_p99_ms": round(percentile(theirs[0], 99), 3),
                        "ratio": round(p50 / base_p50, 4),
                        "machine": machine,
                    }
                )
                emit(
                    {
                        "name": "others_wait_claims",
                        "burst": size,
                        "claimers": claimers,
                        "other_tenants": OTHERS,
                        "claims_before_all_others_served": ours[1],
                        "baseline": "the oldest-first claim it replaced, same rows",
                        "baseline_claims_before_all_others_served": theirs[1],
                        "within_claims": args.cycles,
                        "machine": machine,
                    }
                )
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
