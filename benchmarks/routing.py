"""What routing a mixed batch's rows by slices buys over peft's own mixed batches.

    python -m benchmarks.routing [--models 4] [--requests 8] [--samples 4] [--max-tokens 32]
        [--rounds 3] [--base-dir DIR] [--precision auto|fp32|bf16]

A batch of sample requests spread over `--models` models (prompts of 16 to 44 tokens,
`--samples` each, `--max-tokens`, temperature 1, seeded), decoded by the engine
(`InteractiveEngine.sample_many`, no database) on the tiny test base or the Hugging Face
directory `--base-dir`. One JSON line: the seconds a batch takes with the engine's routing
(`workers.interactive.routing`: every LoRA layer's base once, each adapter's update added to its
rows' slice), beside peft's mixed batch (`adapter_names`: each adapter's rows gathered and its
update scattered back by index, what the engine did before; kept here verbatim), in alternating
rounds in the same process. Both decode the same tokens (checked).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import PeftModel
from peft.tuners.lora import LoraLayer

from benchmarks.queue import cpu_model, emit_beside, progress
from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive import sampling
from workers.interactive.engine import InteractiveEngine
from workers.training.device import describe_device
from workers.training.resident import ResidentBase


@contextmanager
def peft_mixed_batch(peft: PeftModel, adapters: list[str]) -> Iterator[Callable[[list[str]], None]]:
    """peft's own mixed batch: its `adapter_names` argument given to every LoRA layer; yields
    the function that routes the passes after it by another list, as `routed` does (a decode's
    batch once its finished rows have left it)."""
    routes = [adapters]

    def names(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        return args, {**kwargs, "adapter_names": routes[0]}

    def route(narrowed: list[str]) -> None:
        routes[0] = narrowed

    handles = [
        module.register_forward_pre_hook(names, with_kwargs=True)
        for module in peft.modules()
        if isinstance(module, LoraLayer)
    ]
    try:
        yield route
    finally:
        for handle in handles:
            handle.remove()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.routing", description=__doc__)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, help="a Hugging Face model directory")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args(argv)
    base = ResidentBase.load(args.base_dir or TEST_BASE_PATH, args.precision)
    engine = InteractiveEngine(base)
    for m in range(args.models):
        engine.create(f"m{m}", rank=8, seed=m)
    asked: list[tuple[str | None, dict[str, Any]]] = []
    for k in range(args.requests):
        prompt = [5 + (k * 31 + i * 37) % 700 for i in range(16 + 4 * k % 29)]
        params = {"max_tokens": args.max_tokens, "temperature": 1.0, "seed": k, "stop": []}
        request = {
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "num_samples": args.samples,
            "sampling_params": params,
        }
        asked.append((f"m{k % args.models}", request))
    slices = sampling.routed

    def decode(routing: Any) -> tuple[float, list[Any]]:
        sampling.routed = routing
        started = time.perf_counter()
        answers = engine.sample_many(asked)
        return time.perf_counter() - started, answers

    machine = f"{os.cpu_count()} cpu {platform.machine()} ({cpu_model()}), {describe_device()}"
    label = str(args.base_dir.name if args.base_dir else "tiny test base")
    progress(f"{machine}; {label}, {args.rounds} rounds")
    decode(slices), decode(peft_mixed_batch)  # warm
    ours: list[float] = []
    theirs: list[float] = []
    for index in range(args.rounds):  # alternating: the machine's load drifts
        seconds, mine = decode(slices)
        ours.append(seconds)
        seconds, peft_answers = decode(peft_mixed_batch)
        theirs.append(seconds)
        assert mine == peft_answers, "the two routings decoded different tokens"
        progress(f"round {index}: {ours[-1]:.2f} s slices, {theirs[-1]:.2f} s peft")
    sampling.routed = slices
    emit_beside(
        "interactive_mixed_batch_routing",
        statistics.median(ours) * 1000,
        "peft's mixed batch (rows gathered and scattered by index), in this process",
        statistics.median(theirs) * 1000,
        machine,
        models=args.models,
        requests=args.requests,
        samples_per_request=args.samples,
        max_tokens=args.max_tokens,
        base=f"{label}, {base.precision}, rank 8",
        statistic="median over rounds of the seconds to decode the batch",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
