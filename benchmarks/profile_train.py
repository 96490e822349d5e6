"""Where a training step's time goes: loraforge's recipe under `torch.profiler`.

Run: `python -m benchmarks.profile_train [--steps N] [--random-weights SHAPE --tokenizer DIR]`.
Same model, data and hyperparameters as `benchmarks.train`; the first two steps are left out
(warm-up), the rest profiled. Prints the operator table (self time, sorted) to stderr and one JSON
line with each of the top operators' self time per step and share of the profiled time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.train import (
    EVAL_EXAMPLES,
    SEED,
    _hyperparameters,
    add_model_arguments,
    machine,
    model_under_test,
    synthetic_records,
)

TOP = 25


def profile(model_dir: str, steps: int, batch_size: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, schedule

    from workers.training.recipe import ResidentBase, TrainHooks, train_adapter

    base = ResidentBase.load(Path(model_dir))
    records = synthetic_records(steps * batch_size + EVAL_EXAMPLES, base.tokenizer, SEED)
    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    profiled = steps - 2
    step_ends: list[float] = []
    with torch.profiler.profile(
        activities=activities, schedule=schedule(wait=1, warmup=1, active=profiled)
    ) as prof:

        def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
            if kind == "metrics" and "train_loss" in data:
                step_ends.append(time.perf_counter())
                prof.step()

        with tempfile.TemporaryDirectory() as tmp:
            train_adapter(
                base,
                records[:-EVAL_EXAMPLES],
                None,
                _hyperparameters(steps, batch_size),
                TrainHooks(on_event),
                Path(tmp),
            )
    device_time = torch.cuda.is_available()
    sort_by = "self_cuda_time_total" if device_time else "self_cpu_time_total"
    averages = prof.key_averages()
    print(averages.table(sort_by=sort_by, row_limit=TOP), file=sys.stderr)

    def self_us(event: Any) -> float:
        return float(event.self_device_time_total if device_time else event.self_cpu_time_total)

    def top(key: Any) -> list[dict[str, Any]]:
        total = sum(key(e) for e in averages) or 1.0
        return [
            {
                "op": e.key,
                "ms_per_step": round(key(e) / 1000 / profiled, 2),
                "share": round(key(e) / total, 3),
                "calls_per_step": round(e.count / profiled, 1),
            }
            for e in sorted(averages, key=key, reverse=True)[:TOP]
        ]

    result = {
        "profiled_steps": profiled,
        "precision": base.precision,
        "clock": "device" if device_time else "cpu",
        "step_ms": round(sum(self_us(e) for e in averages) / 1000 / profiled, 1),
        # wall clock of the profiled steps (profiler overhead included): what operators' self
        # time does not account for is Python, the autograd engine and the allocator
        "wall_step_ms": round((step_ends[-1] - step_ends[-1 - profiled]) * 1000 / profiled, 1),
        "top": top(self_us),
    }
    if device_time:  # where the host's time goes too: launches, copies, waits
        result["top_cpu"] = top(lambda e: float(e.self_cpu_time_total))
        result["cpu_step_ms"] = round(
            sum(e.self_cpu_time_total for e in averages) / 1000 / profiled, 1
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", type=int, default=8, help="optimizer steps (first two unprofiled)"
    )
    add_model_arguments(parser)
    args = parser.parse_args()
    with model_under_test(args) as (model_dir, label):
        result = profile(model_dir, args.steps, args.batch_size)
    print(json.dumps({"name": f"profile_{label}", **result, "machine": machine()}), flush=True)


if __name__ == "__main__":
    main()
