"""The median stopping rule for a sweep: end a job whose evaluations trail the rest of its sweep.

A sweep (`POST /v1/fine_tuning/sweeps`) trains one job per point of a grid, and all but one or
two of them will be thrown away. Google Vizier's median stopping rule (Ray Tune's
`MedianStoppingRule`) ends a trial whose best objective so far is worse than the median of
the running averages of the other trials' at the same point, so that the sweep's trainer hours
go to the jobs that may still win. A job with `sweep_median_stopping` N, from its Nth
evaluation on, compares its lowest eval loss by step s with the running averages, by step s,
of the eval losses of the other jobs of its sweep (its tenant's jobs whose metadata holds the
same `sweep=<name>`): those that have evaluated at step s or later, and those that are over
(stopped early, failed or cancelled before s, their averages by their last evaluation: leaving
them out would hold the rest against the survivors alone); a job still short of step s says
nothing yet. With at least `MIN_PEERS` of them, a lowest strictly above their median stops the
job early: it succeeds with its lowest evaluation's weights, as a patience stop does
(`workers.training.early_stopping`).

The peers' evaluations are read off revision 0040's partial index on the events that hold an
`eval_loss`, one statement an evaluation; an event whose step or eval loss is not a number is
passed over. The statement reads every evaluation of every peer by step s: its cost grows with
the sweep and its evaluations, not with the steps.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, text

from control_plane.job_status import TERMINAL
from control_plane.records import JobRecord
from control_plane.sweeps import SWEEP_KEY

MIN_PEERS = 2  # other jobs of the sweep that must tell before the rule speaks

# Each other job of the sweep: its average eval loss by step :step, the furthest step it
# evaluated, whether it is over. A step or loss that is not a JSON number is not read.
_PEERS = text(
    "SELECT avg(v.loss) FILTER (WHERE v.step <= :step) AS average, max(v.step) AS reached, "
    "j.status IN :over AS over "
    "FROM jobs j JOIN job_events e ON e.job_id = j.id AND (e.data -> 'eval_loss') IS NOT NULL "
    "AND e.type = 'metrics' "
    "CROSS JOIN LATERAL (SELECT CAST(e.data ->> 'eval_loss' AS double precision) AS loss, "
    "CAST(e.data ->> 'step' AS double precision) AS step "
    "WHERE jsonb_typeof(e.data -> 'eval_loss') = 'number' "
    "AND jsonb_typeof(e.data -> 'step') = 'number') v "
    "WHERE j.tenant_id = :tenant AND j.user_metadata @> CAST(:metadata AS jsonb) "
    "AND j.id <> :job GROUP BY j.id, j.status"
).bindparams(bindparam("over", expanding=True))


@dataclass(frozen=True)
class Peers:
    """The other jobs of a sweep that tell at a step (evaluated at it or later, or over): their
    average eval losses by that step."""

    sweep: str
    step: int
    averages: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.averages))


def peers_at(conn: Connection, job: JobRecord, step: int) -> Peers | None:
    """The job's sweep's other jobs as they stood at `step`; None for a job of no sweep."""
    sweep = (job.user_metadata or {}).get(SWEEP_KEY)
    if sweep is None:
        return None
    rows = conn.execute(
        _PEERS,
        {
            "step": step,
            "tenant": job.tenant_id,
            "metadata": json.dumps({SWEEP_KEY: sweep}),
            "job": job.id,
            "over": sorted(status.value for status in TERMINAL),
        },
    ).all()
    told = [r.average for r in rows if r.average is not None and (r.over or r.reached >= step)]
    return Peers(sweep, step, sorted(told))


def verdict(peers: Peers | None, lowest: float) -> tuple[str, dict[str, Any]] | None:
    """Why the job stops at `peers.step` with `lowest` its lowest eval loss so far, as its log
    event (message, data); None while it does not trail the median (or too few peers tell)."""
    if peers is None or len(peers.averages) < MIN_PEERS or lowest <= peers.median:
        return None
    return (
        f"sweep median stopping at step {peers.step}: its lowest eval loss {lowest:.4f} is "
        f"above {peers.median:.4f}, the median of the average eval losses by then of the "
        f"{len(peers.averages)} other jobs of sweep {peers.sweep} that got that far or are over",
        {"sweep_median_eval_loss": peers.median, "sweep_peers": len(peers.averages)},
    )
