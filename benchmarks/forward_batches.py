"""What running several tenants' training calls together buys them on one base.

    python -m benchmarks.forward_batches [--models 8] [--steps 4] [--data 4] [--min-tokens 48]
        [--max-tokens 111] [--batch 8] [--batch-tokens N] [--rounds 3] [--base-dir DIR]
        [--precision auto|fp32|bf16]

`--models` tenants each train a model of rank 8 at once, an RL loop's steps: each step a
forward_backward of `--data` datums (importance sampling, `--min-tokens` to `--max-tokens`
tokens each, advantages of both signs) and an optim_step, every step of every model asked at
once, on the tiny test base or the Hugging Face directory `--base-dir` (e.g. the demo's
imported SmolLM2-135M-Instruct); then the executor (`workers.interactive.runner`, real
PostgreSQL) drains them. One JSON line: the seconds from the first claim to the last answer
with the executor taking up to `--batch` models' forward calls at a time
(`interactive_forward_batch_calls`) while they hold fewer than `--batch-tokens` tokens (by
default the device's: 8192 on a GPU, 256 on a CPU), beside the same calls taken one at a time
(batch 1, what the executor did before), in alternating rounds in the same process; the
trained tokens a second on both sides.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

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


def _length(seed: int, args: argparse.Namespace) -> int:
    """A datum's trained tokens: from --min-tokens to --max-tokens."""
    return int(args.min_tokens + seed % (args.max_tokens - args.min_tokens + 1))


def _datum(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    tokens = [5 + (seed * 31 + i * 37) % 700 for i in range(_length(seed, args) + 1)]
    n = len(tokens) - 1

    def tensor(values: list[Any], dtype: str) -> dict[str, Any]:
        return {"data": values, "dtype": dtype, "shape": [n]}

    return {
        "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
        "loss_fn_inputs": {
            "target_tokens": tensor(tokens[1:], "int64"),
            "logprobs": tensor([-2.0] * n, "float32"),
            "advantages": tensor([0.5 if seed % 2 else -0.5] * n, "float32"),
        },
    }


def _round(
    services: Services,
    runner: InteractiveRunner,
    world: dict[str, Any],
    name: str,
    args: argparse.Namespace,
    batch: int,
) -> float:
    """Ask every step of every model at once (a model per tenant), then drain them with the
    executor taking up to `batch` forward calls together."""
    models = []
    for m, (tenant, session) in enumerate(world["tenants"]):
        model = interactive_model(
            services.engine, session, tenant, world["base"], f"{name}-{m}", rank=8
        )
        ask_call(services.engine, model, tenant, world["base"], "create_model", 0, {})
        models.append((model, tenant))
    runner.forward_batch = 1
    for _ in models:
        assert runner.run_once()  # the models' creation, outside the timing
    for step in range(args.steps):
        for m, (model, tenant) in enumerate(models):
            data = [_datum(m * 1000 + step * args.data + d, args) for d in range(args.data)]
            fb = {"forward_backward_input": {"loss_fn": "importance_sampling", "data": data}}
            optim = {"adam_params": {"learning_rate": 1e-4}}
            ask_call(
                services.engine, model, tenant, world["base"], "forward_backward", 1 + 2 * step, fb
            )
            ask_call(
                services.engine, model, tenant, world["base"], "optim_step", 2 + 2 * step, optim
            )
    runner.forward_batch = batch
    started = time.perf_counter()
    while runner.run_once():
        pass
    elapsed = time.perf_counter() - started
    for model, _ in models:  # outside the timing: the next round's models on a bare base
        runner.engine.drop(model)
    return elapsed


def _trained_tokens(args: argparse.Namespace) -> int:
    return sum(
        _length(m * 1000 + step * args.data + d, args)
        for m in range(args.models)
        for step in range(args.steps)
        for d in range(args.data)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.forward_batches", description=__doc__
    )
    parser.add_argument("--models", type=int, default=8, help="tenants training at once")
    parser.add_argument("--steps", type=int, default=4, help="steps asked of each model")
    parser.add_argument("--data", type=int, default=4, help="datums of each forward_backward")
    parser.add_argument("--min-tokens", type=int, default=48, help="a datum's fewest tokens")
    parser.add_argument("--max-tokens", type=int, default=111, help="a datum's most tokens")
    parser.add_argument("--batch", type=int, default=8, help="forward calls taken at once")
    parser.add_argument(
        "--batch-tokens", type=int, help="a batch's tokens (default: the device's, as deployed)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, help="a Hugging Face model directory")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with interactive_services(args.database_url, lease_seconds=600) as (services, scratch):
        machine = machine_description(services.engine)
        base, base_label = bench_base(services, args.base_dir)
        tenants = []
        for m in range(args.models):
            tenant = make_tenant(services.engine, f"bench-{m}")
            tenants.append((tenant, interactive_session(services.engine, tenant, f"sess-{m}")))
        world = {"base": base.id, "tenants": tenants}
        runner = bench_runner(services, base.id, scratch, args.precision)
        runner.forward_batch_tokens = args.batch_tokens or runner.forward_batch_tokens
        progress(f"{machine}; {base_label} ({runner.resident.precision}), {args.rounds} rounds")
        batched_beside_alone(
            "interactive_forward_calls_batched",
            lambda round_name, batch: _round(services, runner, world, round_name, args, batch),
            batch=args.batch,
            rounds=args.rounds,
            tokens=_trained_tokens(args),
            machine=machine,
            models=args.models,
            steps=args.steps,
            data_per_call=args.data,
            tokens_per_datum=f"{args.min_tokens}..{args.max_tokens}",
            batch_tokens=runner.forward_batch_tokens,
            base=f"{base_label}, {runner.resident.precision}, rank 8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
