"""The charts' downsampling rule written out plainly, for tests to hold the dashboard's curves
to: a job's (`queries.loss_curves`) and an interactive model's (`model_curves`), from every
point."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import pytest
from sqlalchemy import Connection, text

from control_plane.metric_rollups import ROLLUP_WIDTHS

Points = list[tuple[float, float]]  # a series: (step, value), in step order


def downsampled(series: dict[str, Points], max_points: int) -> dict[str, Any]:
    """The series as a chart gets them: all of them while none has more than `max_points`
    points; else each in buckets of the narrowest width w in ROLLUP_WIDTHS that cuts the steps
    of all of them into at most `max_points` (bucket = floor(step / w)), each bucket its mean
    step and mean value. `downsampled` says which."""
    if max(len(points) for points in series.values()) <= max_points:
        return {**series, "downsampled": False}
    steps = [step for points in series.values() for step, _ in points]
    low, high = min(steps), max(steps)
    width = next(
        w for w in ROLLUP_WIDTHS if math.floor(high / w) - math.floor(low / w) + 1 <= max_points
    )

    def bucketed(points: Points) -> Points:
        buckets: dict[int, Points] = defaultdict(list)
        for step, value in points:
            buckets[math.floor(step / width)].append((step, value))
        return [
            (
                sum(s for s, _ in buckets[b]) / len(buckets[b]),
                sum(v for _, v in buckets[b]) / len(buckets[b]),
            )
            for b in sorted(buckets)
        ]

    return {name: bucketed(points) for name, points in series.items()} | {"downsampled": True}


def model_points(conn: Connection, model_id: str) -> dict[str, Points]:
    """An interactive model's curves, point by point, from its calls walked in order: a step
    ends at each completed optim_step; a step's completed forward_backwards' `loss:sum` summed is
    its train point, its completed forwards' its eval point, its optim_step's `grad_norm:mean`
    its grad_norm point (a call not completed counts for nothing)."""
    summed: dict[str, dict[int, float]] = {"train": {}, "eval": {}, "grad_norm": {}}
    series = {"forward_backward": "train", "forward": "eval", "optim_step": "grad_norm"}
    metric = {"train": "loss:sum", "eval": "loss:sum", "grad_norm": "grad_norm:mean"}
    step = 0
    calls = conn.execute(
        text(
            "SELECT kind, status, metrics FROM interactive_calls WHERE model_id = :model "
            "ORDER BY seq"
        ),
        {"model": model_id},
    )
    for kind, status, metrics in calls:
        if status != "completed" or kind not in series:
            continue
        name = series[kind]
        value = (metrics or {}).get(metric[name])
        if isinstance(value, int | float):
            summed[name][step] = summed[name].get(step, 0.0) + value
        if kind == "optim_step":
            step += 1
    return {
        name: [(float(s), v) for s, v in sorted(points.items())] for name, points in summed.items()
    }


def assert_same_curves(got: dict[str, Any], want: dict[str, Any]) -> None:
    """The same series (`downsampled`'s shape), point for point up to the last bits of a sum,
    and both downsampled or neither."""
    assert got.keys() == want.keys()
    assert got["downsampled"] == want["downsampled"]
    for series in sorted(want.keys() - {"downsampled"}):
        assert len(got[series]) == len(want[series]), series
        for (step, value), (want_step, want_value) in zip(got[series], want[series], strict=True):
            assert step == pytest.approx(want_step, rel=1e-9, abs=1e-9), series
            assert value == pytest.approx(want_value, rel=1e-9, abs=1e-9), series
