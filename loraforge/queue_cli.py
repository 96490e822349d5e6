"""`loraforge queue check` and `loraforge queue repair`, added to the main parser by
`add_queue_commands`: an operator's commands for the queue's bookkeeping (the counts and lines
that the claim, the dashboard and a metrics scrape read instead of counting jobs).

Revision 0006's triggers keep that bookkeeping exact in the statement that moves a job, but a
write that goes around triggers leaves it behind: a data-only `pg_restore --disable-triggers`,
rows applied by logical replication, a hand-made fix under `session_replication_role = replica`.
`check` recounts from `jobs` and names every row that disagrees (exit 1), and says when the lines
are flagged against another default running limit than this configuration's; `repair` sets
those rows back to the recount while every writer of jobs waits, then checks again. Both do the
same for the loss charts' sums (revision 0015, `control_plane.metric_rollups`), which a write
around the trigger on job events leaves behind in the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from control_plane.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy import Engine


@contextmanager
def _database(settings: Settings) -> Iterator[Engine | None]:
    """The platform's database, or None (said on stderr) when its schema is not the code's:
    the recount names columns that migrations add."""
    from control_plane import db

    engine = db.make_engine(db.resolve_database_url(settings), pool_size=1)
    try:
        with engine.connect() as conn:
            behind = db.schema_behind(conn)
        if behind is not None:
            print(f"loraforge queue: {behind}", file=sys.stderr)
        yield None if behind is not None else engine
    finally:
        engine.dispose()


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from control_plane import metric_rollups
    from control_plane.queue_stats import default_limit, drift

    with _database(settings) as engine:
        if engine is None:
            return 2
        with engine.connect() as conn:
            found = drift(conn)
            flagged = default_limit(conn)
            charts = metric_rollups.drift(conn)
    configured = settings.max_running_jobs_per_tenant
    if flagged != configured:
        # Not drift: the claimers set the default they run with (JobQueue.claim).
        print(
            f"the queue's lines are flagged against a default running limit of {flagged}; this "
            f"configuration's MAX_RUNNING_JOBS_PER_TENANT is {configured}: a claim with it sets "
            "it (at most once a minute per claimer) and ranks the whole backlog until then"
        )
    for line in found + charts:
        print(line)
    if found:
        print(
            f"{len(found)} bookkeeping rows disagree with the jobs; "
            "`loraforge queue repair` sets them back",
            file=sys.stderr,
        )
    if charts:
        print(
            f"the loss-chart sums of {len(charts)} jobs disagree with their metric events; "
            "`loraforge queue repair` sums them again",
            file=sys.stderr,
        )
    if found or charts:
        return 1
    print("the queue's bookkeeping agrees with the jobs")
    return 0


def cmd_repair(args: argparse.Namespace, settings: Settings) -> int:
    from control_plane import metric_rollups
    from control_plane.queue_stats import QueueBusyError, repair

    with _database(settings) as engine:
        if engine is None:
            return 2
        try:
            with engine.begin() as conn:
                fixed = repair(conn, lock_timeout_seconds=args.lock_timeout)
        except QueueBusyError as exc:
            print(f"loraforge queue repair: {exc}", file=sys.stderr)
            return 1
        for line in fixed:
            print(f"repaired: {line}")
        if fixed:
            print(f"repaired {len(fixed)} bookkeeping rows")
        try:
            # Its own transaction: the events are locked only while drifted sums are redone.
            with engine.begin() as conn:
                summed = metric_rollups.repair(conn, lock_timeout_seconds=args.lock_timeout)
        except QueueBusyError as exc:
            print(f"loraforge queue repair, the loss charts: {exc}", file=sys.stderr)
            return 1
    for line in summed:
        print(f"repaired: {line}")
    if summed:
        print(f"summed the loss charts of {len(summed)} jobs again from their events")
    if not fixed and not summed:
        print("the queue's bookkeeping agrees with the jobs; nothing written")
    return 0


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds above 0")
    return seconds


def add_queue_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `queue check` and `queue repair`; each sets `func(args, settings) -> int`."""
    queue = subparsers.add_parser("queue", help="the queue's bookkeeping: check it, repair it")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    check = queue_sub.add_parser(
        "check",
        help="recount from the jobs and their metric events; name every bookkeeping row and "
        "loss chart that disagrees",
    )
    check.set_defaults(func=cmd_check)
    repair = queue_sub.add_parser(
        "repair",
        help="set the bookkeeping back to a recount from the jobs (job writes wait meanwhile) "
        "and sum drifted loss charts again (event writes wait meanwhile)",
    )
    repair.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="give up, writing nothing, when a transaction holds jobs (or, for the loss charts, "
        "job events) longer (default 5)",
    )
    repair.set_defaults(func=cmd_repair)
