"""What decoding sample calls together buys an RL loop, and tenants sampling at once.

    python -m benchmarks.sample_batches [--calls 32] [--samples 4] [--max-tokens 32]
        [--batch 8] [--models 1] [--rounds 3] [--base-dir DIR] [--precision auto|fp32|bf16]

An RL iteration asks one sampler for a group of samples of each of many prompts at once: here
`--calls` sample calls (prompts of 16 to 47 tokens, `--samples` each, `--max-tokens`,
temperature 1, seeded, no stop) asked of one model of rank 8, or spread over `--models` models
(tenants' loops sampling at once), on the tiny test base or the Hugging Face directory
`--base-dir` (e.g. the demo's imported SmolLM2-135M-Instruct); then the executor
(`workers.interactive.runner`, real PostgreSQL) drains them. One JSON line: the seconds from the
first claim to the last answer with the executor taking `--batch` calls at a time
(`interactive_sample_batch_calls`), beside the same calls taken one at a time (batch 1, what the
executor did before), in alternating rounds in the same process; the sampled tokens a second on
both sides.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.interactive import (
    batched_beside_alone,
    bench_base,
    bench_runner,
    interactive_services,
)
from benchmarks.queue import (
    add_database_url_argument,
    machine_description,
    make_tenant,
    progress,
)
from control_plane.services import Services
from tests.factories import ask_call, interactive_model, interactive_session
from workers.interactive.runner import InteractiveRunner


def _round(
    services: Services,
    runner: InteractiveRunner,
    ids: dict[str, str],
    name: str,
    args: argparse.Namespace,
    batch: int,
) -> float:
    """Ask every call of a round at once (spread over `--models` models), then drain them with
    the executor taking `batch`."""
    models = [
        interactive_model(
            services.engine, ids["session"], ids["tenant"], ids["base"], f"{name}-{m}", rank=8
        )
        for m in range(args.models)
    ]
    for model in models:
        ask_call(services.engine, model, ids["tenant"], ids["base"], "create_model", 0, {})
    runner.sample_batch = 1
    for _ in models:
        assert runner.run_once()  # the models' creation, outside the timing
    for seq in range(1, args.calls + 1):
        model = models[seq % args.models]
        prompt = [5 + (seq * 31 + i * 37) % 700 for i in range(16 + seq % 32)]
        request = {
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "num_samples": args.samples,
            "sampling_params": {
                "max_tokens": args.max_tokens,
                "temperature": 1.0,
                "seed": seq,
                "stop": [],
            },
        }
        ask_call(
            services.engine,
            model,
            ids["tenant"],
            ids["base"],
            "sample",
            1 + seq // args.models,
            request,
        )
    runner.sample_batch = batch
    started = time.perf_counter()
    while runner.run_once():
        pass
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sample_batches", description=__doc__
    )
    parser.add_argument("--calls", type=int, default=32, help="sample calls asked at once")
    parser.add_argument("--samples", type=int, default=4, help="num_samples of each call")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="calls the executor takes at once")
    parser.add_argument("--models", type=int, default=1, help="models the calls are spread over")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, help="a Hugging Face model directory")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with interactive_services(args.database_url, lease_seconds=600) as (services, scratch):
        machine = machine_description(services.engine)
        base, base_label = bench_base(services, args.base_dir)
        tenant = make_tenant(services.engine, "bench")
        session = interactive_session(services.engine, tenant, "sess-bench")
        ids = {"tenant": tenant, "base": base.id, "session": session}
        runner = bench_runner(services, base.id, scratch, args.precision)
        progress(f"{machine}; {base_label} ({runner.resident.precision}), {args.rounds} rounds")
        batched_beside_alone(
            "interactive_sample_calls_batched",
            lambda round_name, batch: _round(services, runner, ids, round_name, args, batch),
            batch=args.batch,
            rounds=args.rounds,
            tokens=args.calls * args.samples * args.max_tokens,
            machine=machine,
            calls=args.calls,
            samples_per_call=args.samples,
            max_tokens=args.max_tokens,
            models=args.models,
            base=f"{base_label}, {runner.resident.precision}, rank 8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
