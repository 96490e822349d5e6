"""Early stopping on a job that overfits: the trainer time it gives back, the eval loss it keeps.

Run: `python -m benchmarks.early_stopping [--records N] [--epochs E] [--patience P]`.
SmolLM2-135M-Instruct, LoRA r16 on all linear layers, a small training set of the synthetic
story chats of `benchmarks.train` and as many others held out for evaluation, evaluated every
`--eval-every` steps, at a learning rate high enough that the job overfits well before its last
epoch. Both sides train the same job in this process, one after the other on the same resident
base: the baseline with no early stopping (it trains every step and publishes its last), then
the same job with `early_stopping_patience` (it stops and publishes its lowest evaluation),
after one uncounted step that warms the process.

One JSON line per side (steps trained, wall seconds, the eval loss of the weights its adapter
holds as the recipe evaluated them in training precision, every evaluation), then one that
sets them side by side.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.train import add_model_arguments, machine, model_under_test, synthetic_records


def run_side(base: Any, train: list[Any], evals: list[Any], hp: Any) -> dict[str, Any]:
    from workers.training.recipe import TrainHooks, train_adapter

    curve: list[tuple[int, float]] = []

    def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
        del kind, message
        if "eval_loss" in data:
            curve.append((int(data["step"]), round(float(data["eval_loss"]), 4)))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = train_adapter(base, train, evals, hp, TrainHooks(on_event=on_event), Path(out))
    return {
        "steps": result.global_step,
        "total_steps": result.total_steps,
        "seconds": round(time.perf_counter() - started, 1),
        "published_eval_loss": round(float(result.final_eval_loss or 0.0), 4),
        "weights_from_step": result.weights_step or result.global_step,
        "evaluations": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--records", type=int, default=16, help="training (and eval) examples")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=4, help="steps between evaluations")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--lr-multiplier", type=float, default=10.0)
    parser.set_defaults(batch_size=4)  # 4 steps an epoch on 16 examples
    args = parser.parse_args()

    from control_plane.hyperparameters import Hyperparameters
    from workers.training.recipe import ResidentBase

    with model_under_test(args) as (model_dir, label):
        base = ResidentBase.load(Path(model_dir))
        train = synthetic_records(args.records, base.tokenizer, 1)
        evals = synthetic_records(args.records, base.tokenizer, 2)
        hp = Hyperparameters(
            n_epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate_multiplier=args.lr_multiplier,
            lora_rank=16,
            max_seq_length=512,
            warmup_ratio=0.0,
            eval_every_steps=args.eval_every,
            checkpoint_every_steps=10**6,
        )
        common = {"model": label, "machine": machine(), "precision": base.precision}
        # One step first, uncounted: the first run in a process pays for lazy set-up (kernels,
        # allocator) that would otherwise be charged to the baseline alone.
        run_side(base, train[: args.batch_size], evals[:1], hp.model_copy(update={"n_epochs": 1}))
        sides = {}
        for side, patience in (("baseline", 0), ("early_stopping", args.patience)):
            job = hp.model_copy(update={"early_stopping_patience": patience})
            sides[side] = run_side(base, train, evals, job)
            print(
                json.dumps({"benchmark": "early_stopping", "side": side, **common, **sides[side]})
            )
        kept, baseline = sides["early_stopping"], sides["baseline"]
        print(
            json.dumps(
                {
                    "benchmark": "early_stopping",
                    "side": "comparison",
                    **common,
                    "patience": args.patience,
                    "steps_vs_baseline": round(kept["steps"] / baseline["steps"], 3),
                    "seconds_vs_baseline": round(kept["seconds"] / baseline["seconds"], 3),
                    "published_eval_loss": kept["published_eval_loss"],
                    "baseline_published_eval_loss": baseline["published_eval_loss"],
                    "baseline_lowest_eval_loss": min(loss for _, loss in baseline["evaluations"]),
                }
            )
        )


if __name__ == "__main__":
    main()
