"""What running a custom loss on the server saves a Tinker training loop, against the SDK
running it itself.

    python -m benchmarks.tinker_custom_losses [--steps 20] [--datums 8] [--rounds 3]
        [--base-dir DIR]

The same API is served twice on sockets of its own, `tinker_custom_losses_on_server` on and off,
with the real executor (`workers.interactive.runner`, serving, on connections of its own) on
the tiny test base or the Hugging Face directory `--base-dir`. Each round, the official
`tinker` SDK in a process of its own creates a PPO-style custom loss (`create_custom_loss`:
uploaded where the server runs it, else kept to run on the client) and runs `--steps` steps of
`forward_backward_custom` over `--datums` datums then `optim_step`, each awaited, as a training
script does. On the server a step is one forward_backward; on the client it is a forward, the
loss and its gradient in the client's torch, and a second forward_backward weighted by that
gradient. Alternating rounds in one process; one JSON line for a step's milliseconds, beside
the client-side path's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import tinker
import torch
from tinker import types

from benchmarks.interactive import in_own_process, sdk_bench, served_with
from benchmarks.queue import add_database_url_argument, emit_beside, percentile, progress
from tests.tinker_harness import SEQUENCE, pausable_executor


def clipped_ratio(logprobs: torch.Tensor, sampled: torch.Tensor, advantages: torch.Tensor) -> Any:
    ratio = torch.exp(logprobs - sampled)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    return loss, {"custom/clipped:mean": (clipped != ratio).float().mean().detach()}


def _client(url: str, key: str, base: str, steps: int, datums: int, done: Any) -> None:
    """The SDK in a process of its own: each call awaited before the next; puts the seconds of
    each step (forward_backward_custom + optim_step) and whether the loss ran on the server."""
    targets = SEQUENCE[1:]
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(SEQUENCE[:-1]),
            loss_fn_inputs={
                "target_tokens": targets,
                "sampled": torch.tensor([-5.0 - 0.01 * (i + j) for j in range(len(targets))]),
                "advantages": [1.0 if (i + j) % 3 else -1.0 for j in range(len(targets))],
            },
        )
        for i in range(datums)
    ]
    adam = types.AdamParams(learning_rate=1e-4)
    ranks = {"logprobs": 1, "sampled": 1, "advantages": 1}
    with tinker.ServiceClient(base_url=url, api_key="tml-" + key) as service:
        training = service.create_lora_training_client(base_model=base, rank=4, seed=0).result()
        handle = service.create_custom_loss(clipped_ratio, input_ranks=ranks).result(timeout=60)
        training.forward_backward_custom(data, handle).result(timeout=120)  # warm
        stepped = []
        for _ in range(steps):
            started = time.monotonic()
            training.forward_backward_custom(data, handle).result(timeout=120)
            training.optim_step(adam).result(timeout=120)
            stepped.append(time.monotonic() - started)
    done.put((stepped, handle.loss_id is not None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.tinker_custom_losses", description=__doc__
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--datums", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, default=None)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    sides: dict[bool, list[float]] = {True: [], False: []}
    with sdk_bench(args.database_url, args.base_dir) as bench:
        machine, base_name = bench.machine, bench.base.name
        with (
            pausable_executor(bench.runner) as serving,
            served_with(bench.services, tinker_custom_losses_on_server=True) as server_url,
            served_with(bench.services, tinker_custom_losses_on_server=False) as client_url,
        ):
            serving.set()
            progress(f"{machine}; {args.rounds} rounds a side")
            for index in range(args.rounds):  # alternating: the machine's load drifts
                for on_server, url in ((True, server_url), (False, client_url)):
                    stepped, uploaded = in_own_process(
                        _client, url, bench.key, base_name, args.steps, args.datums
                    )
                    assert uploaded == on_server, "the SDK did not take the server's word"
                    sides[on_server].extend(stepped)
                    progress(
                        f"round {index}, on the server {on_server}: step p50 "
                        f"{statistics.median(stepped) * 1000:.1f} ms"
                    )

    ours, theirs = sides[True], sides[False]
    emit_beside(
        "tinker_custom_loss_step",
        statistics.median(ours) * 1000,
        "the same loss run by the SDK (a forward, the loss on the client, a weighted backward)",
        statistics.median(theirs) * 1000,
        machine,
        base=bench.label,
        what=f"forward_backward_custom over {args.datums} datums then optim_step, each awaited",
        steps=len(ours),
        p99_ms=round(percentile(ours, 99) * 1000, 3),
        baseline_p99_ms=round(percentile(theirs, 99) * 1000, 3),
        statistic="median and p99 over every round's steps, ms from the ask to the answer",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
