"""What waking the polls when a call finishes saves a Tinker training loop, against polls that
look at their calls at growing intervals (50 ms to 1 s apart) alone.

    python -m benchmarks.tinker_wakeups [--steps 30] [--samples 30] [--rounds 3]
        [--base-dir DIR]

The same API is served twice on sockets of its own, `tinker_wake_on_finish` on and off, with the
real executor (`workers.interactive.runner`, serving, on connections of its own) on the tiny
test base or the Hugging Face directory `--base-dir`. Each round, the official `tinker` SDK in a
process of its own runs a loop one call after another, as a training script does: `--steps`
steps of `forward_backward` then `optim_step`, each awaited, then `--samples` samples of 8
tokens, each awaited (a sampling client's session poll). Alternating rounds in one process; one
JSON line for a step's seconds and one for a sample's, each beside the same loop with wake-ups
off.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import tinker
from tinker import types

from benchmarks.interactive import in_own_process, sdk_bench, served_with
from benchmarks.queue import (
    add_database_url_argument,
    emit_beside,
    percentile,
    progress,
)
from tests.tinker_harness import SEQUENCE, pausable_executor


def _client(url: str, key: str, base: str, steps: int, samples: int, done: Any) -> None:
    """The SDK in a process of its own: each call awaited before the next; puts the seconds of
    each step (forward_backward + optim_step) and of each sample."""
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(SEQUENCE[:-1]),
        loss_fn_inputs={"target_tokens": SEQUENCE[1:], "weights": [1.0] * (len(SEQUENCE) - 1)},
    )
    adam = types.AdamParams(learning_rate=1e-4)
    params = types.SamplingParams(max_tokens=8, temperature=1.0, seed=1)
    with tinker.ServiceClient(base_url=url, api_key="tml-" + key) as service:
        training = service.create_lora_training_client(base_model=base, rank=4, seed=0)
        training.forward_backward([datum], "cross_entropy").result(timeout=120)  # warm
        stepped = []
        for _ in range(steps):
            started = time.monotonic()
            training.forward_backward([datum], "cross_entropy").result(timeout=120)
            training.optim_step(adam).result(timeout=120)
            stepped.append(time.monotonic() - started)
        sampler = training.save_weights_and_get_sampling_client()
        prompt = types.ModelInput.from_ints(SEQUENCE[:6])
        sampler.sample(prompt, 1, params).result(timeout=120)  # warm
        sampled = []
        for _ in range(samples):
            started = time.monotonic()
            sampler.sample(prompt, 1, params).result(timeout=120)
            sampled.append(time.monotonic() - started)
    done.put((stepped, sampled))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tinker_wakeups", description=__doc__
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, default=None)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    sides: dict[bool, tuple[list[float], list[float]]] = {True: ([], []), False: ([], [])}
    with sdk_bench(args.database_url, args.base_dir) as bench:
        machine, base_name = bench.machine, bench.base.name
        with (
            pausable_executor(bench.runner) as serving,
            served_with(bench.services, tinker_wake_on_finish=True) as on_url,
            served_with(bench.services, tinker_wake_on_finish=False) as off_url,
        ):
            serving.set()
            progress(f"{machine}; {args.rounds} rounds a side")
            for index in range(args.rounds):  # alternating: the machine's load drifts
                for wake, url in ((True, on_url), (False, off_url)):
                    stepped, sampled = in_own_process(
                        _client, url, bench.key, base_name, args.steps, args.samples
                    )
                    sides[wake][0].extend(stepped)
                    sides[wake][1].extend(sampled)
                    progress(
                        f"round {index}, wake-ups {wake}: step p50 "
                        f"{statistics.median(stepped) * 1000:.1f} ms, sample p50 "
                        f"{statistics.median(sampled) * 1000:.1f} ms"
                    )

    for name, index, what in (
        ("tinker_step_wakeups", 0, "forward_backward then optim_step, each awaited"),
        ("tinker_sample_wakeups", 1, "one sample of 8 tokens, awaited (a session poll)"),
    ):
        ours, theirs = sides[True][index], sides[False][index]
        emit_beside(
            name,
            statistics.median(ours) * 1000,
            "the same loop, its polls answered at their looks (tinker_wake_on_finish off)",
            statistics.median(theirs) * 1000,
            machine,
            base=bench.label,
            what=what,
            calls=len(ours),
            p99_ms=round(percentile(ours, 99) * 1000, 3),
            baseline_p99_ms=round(percentile(theirs, 99) * 1000, 3),
            statistic="median and p99 over every round's calls, ms from the ask to the answer",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
