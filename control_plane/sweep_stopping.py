"""The median stopping rule for a sweep: end a job whose evaluations trail the rest of its sweep.

A sweep (`POST /v1/fine_tuning/sweeps`) trains one job per point of a grid, and all but one or
two of them will be thrown away. Google Vizier's median stopping rule (Ray Tune's
`MedianStoppingRule`) ends a trial whose best objective so far is worse than the median of
the other trials' at the same point, so that the sweep's trainer hours go to the jobs that may
still win. A job with `sweep_median_stopping` N, from its Nth evaluation on, compares its
lowest eval loss by step s with the lowest eval losses the other jobs of its sweep (its
tenant's jobs whose metadata holds the same `sweep=<name>`) had reached by step s, among those
that have evaluated at step s or later (a job that has not got that far yet says nothing of
it). With at least `MIN_PEERS` of them, a lowest strictly above their median stops the job
early: it succeeds with its lowest evaluation's weights, as a patience stop does
(`workers.training.early_stopping`).

The peers' evaluations are read off revision 0040's partial index on the events that hold an
`eval_loss`, one statement an evaluation.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from control_plane.records import JobRecord
from control_plane.sweeps import SWEEP_KEY

MIN_PEERS = 2  # other jobs of the sweep that must have got as far before the rule speaks

_PEERS = text(
    "SELECT min(CAST(e.data ->> 'eval_loss' AS double precision)) "
    "FILTER (WHERE CAST(e.data ->> 'step' AS integer) <= :step) AS lowest, "
    "max(CAST(e.data ->> 'step' AS integer)) AS reached "
    "FROM jobs j JOIN job_events e ON e.job_id = j.id AND (e.data -> 'eval_loss') IS NOT NULL "
    "WHERE j.tenant_id = :tenant AND j.user_metadata @> CAST(:metadata AS jsonb) "
    "AND j.id <> :job GROUP BY j.id"
)


@dataclass(frozen=True)
class Peers:
    """The other jobs of a sweep that evaluated at a step or later: their lowest eval losses
    by that step."""

    sweep: str
    step: int
    lowest: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.lowest))


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
        },
    ).all()
    lowest = sorted(r.lowest for r in rows if r.lowest is not None and r.reached >= step)
    return Peers(sweep, step, lowest)


def verdict(peers: Peers | None, lowest: float) -> tuple[str, dict[str, Any]] | None:
    """Why the job stops at `peers.step` with `lowest` its lowest eval loss so far, as its log
    event (message, data); None while it does not trail the median (or too few peers tell)."""
    if peers is None or len(peers.lowest) < MIN_PEERS or lowest <= peers.median:
        return None
    return (
        f"sweep median stopping at step {peers.step}: its lowest eval loss {lowest:.4f} is "
        f"above {peers.median:.4f}, the median of the {len(peers.lowest)} other jobs of sweep "
        f"{peers.sweep} that evaluated by then",
        {"sweep_median_eval_loss": peers.median, "sweep_peers": len(peers.lowest)},
    )
