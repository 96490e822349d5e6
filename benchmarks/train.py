"""Training throughput and memory: loraforge's recipe against a plain Hugging Face Trainer + peft.

Run: `python -m benchmarks.train [--steps N]`. Same machine, same data, same LoRA (r16, alpha 32,
all-linear), batch 8, on SmolLM2-135M-Instruct; each run in its own spawned process so that peak
RSS figures are separate. Prints one JSON line per measurement:

- `train`: real (non-pad) tokens/s over steps 2..N, peak RSS, final loss (eval loss on the same
  held-out set after the same number of steps), each against the baseline, and the fraction of a
  ceiling: measured matmul FLOP/s in the precision the run trained in (bf16 where the CPU has
  it, else fp32; both runs use the same) divided by 4 x parameters per token (forward plus
  activation gradients; a frozen base computes no weight gradients).
- `claim_to_first_step`: seconds from taking a job to its first optimizer step, with the base
  loaded cold (`ResidentBase.load` + first step) and already resident (first step only).

The data is synthetic chat with skewed (log-normal) lengths: mean ~100 tokens, p95 ~200, max 450.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH_SIZE = 8
LORA_RANK = 16
MAX_SEQ_LENGTH = 512
EVAL_EXAMPLES = 48
SEED = 42

_SUBJECTS = ["the cat", "a farmer", "my sister", "the old robot", "our teacher", "a small bird"]
_VERBS = ["finds", "paints", "carries", "forgets", "builds", "watches", "repairs", "sells"]
_OBJECTS = ["a red boat", "the blue door", "three apples", "a quiet song", "the garden wall"]
_PLACES = ["in the morning", "near the river", "after lunch", "on the hill", "at the market"]


def synthetic_records(count: int, tokenizer: Any, seed: int) -> list[dict[str, Any]]:
    """Chat records whose token lengths follow a log-normal (mean ~100, p95 ~200, cap 450)."""
    rng = random.Random(seed)
    sigma = 0.5
    mu = math.log(100) - sigma**2 / 2
    records = []
    for _ in range(count):
        target = min(450, max(24, int(rng.lognormvariate(mu, sigma))))
        question = f"Tell me a story about {rng.choice(_SUBJECTS)} {rng.choice(_PLACES)}."
        sentences: list[str] = []
        record: dict[str, Any] = {}
        while True:
            sentences.append(
                f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} "
                f"{rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
            )
            record = {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": " ".join(sentences)},
                ]
            }
            rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False)
            if len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) >= target:
                break
        records.append(record)
    return records


def _hyperparameters(steps: int) -> Any:
    from control_plane.hyperparameters import Hyperparameters

    return Hyperparameters(
        n_epochs=1,
        batch_size=BATCH_SIZE,
        lora_rank=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules="all-linear",
        max_seq_length=MAX_SEQ_LENGTH,
        seed=SEED,
        warmup_ratio=0.1,
        checkpoint_every_steps=10 * steps,
    )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_loraforge(model_dir: str, steps: int) -> dict[str, Any]:
    """Train with `train_adapter` on a freshly loaded resident base; figures from its events."""
    from workers.recipe import ResidentBase, TrainHooks, train_adapter

    base = ResidentBase.load(Path(model_dir))
    records = synthetic_records(steps * BATCH_SIZE + EVAL_EXAMPLES, base.tokenizer, SEED)
    train, held_out = records[:-EVAL_EXAMPLES], records[-EVAL_EXAMPLES:]
    stamps: list[tuple[float, float, dict[str, Any]]] = []

    def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
        if kind == "metrics" and "train_loss" in data:
            stamps.append((time.perf_counter(), time.process_time(), data))

    with tempfile.TemporaryDirectory() as tmp:
        result = train_adapter(
            base, train, held_out, _hyperparameters(steps), TrainHooks(on_event), Path(tmp)
        )
    tokens = sum(data["tokens"] for _, _, data in stamps[1:])
    losses = [data["train_loss"] for _, _, data in stamps]
    return {
        "tokens_per_s": tokens / (stamps[-1][0] - stamps[0][0]),
        "tokens_per_cpu_s": tokens / (stamps[-1][1] - stamps[0][1]),
        "peak_rss_mib": _peak_rss_mib(),
        "final_loss": result.final_eval_loss,
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "steps": result.global_step,
        "precision": result.precision,
    }


def run_baseline(model_dir: str, steps: int) -> dict[str, Any]:
    """The same job through `transformers.Trainer` + peft, as its documentation suggests."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from workers.formatting import tokenize_records
    from workers.recipe import bf16_supported

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = synthetic_records(steps * BATCH_SIZE + EVAL_EXAMPLES, tokenizer, SEED)
    hp = _hyperparameters(steps)

    def dataset(part: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
        """The same tokenization and loss mask as loraforge's (a list is a map-style dataset)."""
        examples = tokenize_records(part, tokenizer, MAX_SEQ_LENGTH).examples
        return [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]

    batch_tokens: list[int] = []
    padder = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        return padder(features)

    stamps: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            stamps.append((time.perf_counter(), time.process_time()))

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=BATCH_SIZE,
            per_device_eval_batch_size=BATCH_SIZE,
            max_steps=steps,
            learning_rate=hp.learning_rate,
            warmup_steps=math.ceil(hp.warmup_ratio * steps),
            lr_scheduler_type="cosine",
            bf16=bf16_supported(torch.device("cpu")),
            use_cpu=True,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=SEED,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset(records[:-EVAL_EXAMPLES]),
            eval_dataset=dataset(records[-EVAL_EXAMPLES:]),
            data_collator=collate,
            callbacks=[StepClock()],
        )
        trainer.train()
        train_tokens = batch_tokens[:steps]
        eval_loss = trainer.evaluate()["eval_loss"]
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {
        "tokens_per_s": sum(train_tokens[1:]) / (stamps[-1][0] - stamps[0][0]),
        "tokens_per_cpu_s": sum(train_tokens[1:]) / (stamps[-1][1] - stamps[0][1]),
        "peak_rss_mib": _peak_rss_mib(),
        "final_loss": eval_loss,
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "steps": len(stamps),
    }


def run_claim_to_first_step(model_dir: str) -> dict[str, Any]:
    """Seconds to the first optimizer step with the base cold, then resident (a second job)."""
    from workers.recipe import ResidentBase, TrainHooks, train_adapter

    def first_step(base: ResidentBase | None, started: float) -> tuple[ResidentBase, float]:
        resident = base or ResidentBase.load(Path(model_dir))
        records = synthetic_records(BATCH_SIZE * 2, resident.tokenizer, SEED)
        reached: list[float] = []

        def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
            if kind == "metrics" and "train_loss" in data and not reached:
                reached.append(time.perf_counter())

        with tempfile.TemporaryDirectory() as tmp:
            train_adapter(
                resident,
                records,
                None,
                _hyperparameters(2),
                TrainHooks(on_event, should_stop=lambda: bool(reached)),
                Path(tmp),
            )
        return resident, reached[0] - started

    base, cold = first_step(None, time.perf_counter())
    _, resident = first_step(base, time.perf_counter())
    return {"cold_s": cold, "resident_s": resident}


def matmul_flops(precision: str) -> tuple[float, float]:
    """Measured matmul throughput in `precision` (FLOP per second, and per CPU-second)."""
    import torch

    size = 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    repeats = 5
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        a @ b
    flops = 2 * size**3 * repeats
    return flops / (time.perf_counter() - wall), flops / (time.process_time() - cpu)


def _child(target: str, queue: Any, *args: Any) -> None:
    queue.put(globals()[target](*args))


def in_subprocess(target: str, *args: Any) -> dict[str, Any]:
    """Run `target(*args)` in a spawned process; its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(target, queue, *args))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"{target} exited with {process.exitcode}")
    return dict(result)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("LORAFORGE_HOME", Path.home() / ".loraforge")) / "bases",
    )
    args = parser.parse_args()

    from workers.base_models import inspect_model_dir
    from workers.smollm2 import ensure_smollm2

    model_dir = str(ensure_smollm2(args.cache))
    parameters = inspect_model_dir(Path(model_dir)).parameter_count
    load_before = os.getloadavg()[0]
    ours = in_subprocess("run_loraforge", model_dir, args.steps)
    baseline = in_subprocess("run_baseline", model_dir, args.steps)
    flops, flops_per_cpu_s = matmul_flops(ours["precision"])
    ceiling, cpu_ceiling = flops / (4 * parameters), flops_per_cpu_s / (4 * parameters)
    load_after = os.getloadavg()[0]
    print(
        json.dumps(
            {
                "name": "train_smollm2_135m_lora_r16_batch8",
                "tokens_per_s": round(ours["tokens_per_s"], 1),
                "peak_rss_mib": round(ours["peak_rss_mib"], 1),
                "baseline_tokens_per_s": round(baseline["tokens_per_s"], 1),
                "baseline_peak_rss_mib": round(baseline["peak_rss_mib"], 1),
                "speedup": round(ours["tokens_per_s"] / baseline["tokens_per_s"], 2),
                # Per CPU-second of the process: the same comparison, robust to a shared machine.
                "tokens_per_cpu_s": round(ours["tokens_per_cpu_s"], 1),
                "baseline_tokens_per_cpu_s": round(baseline["tokens_per_cpu_s"], 1),
                "cpu_speedup": round(ours["tokens_per_cpu_s"] / baseline["tokens_per_cpu_s"], 2),
                "memory_ratio": round(ours["peak_rss_mib"] / baseline["peak_rss_mib"], 3),
                "final_loss": round(ours["final_loss"], 4),
                "baseline_final_loss": round(baseline["final_loss"], 4),
                "train_loss_last5": round(ours["train_loss_last"], 4),
                "baseline_train_loss_last5": round(baseline["train_loss_last"], 4),
                "precision": ours["precision"],
                "ceiling_tokens_per_s": round(ceiling, 1),
                "fraction_of_ceiling": round(ours["tokens_per_s"] / ceiling, 3),
                "fraction_of_ceiling_cpu": round(ours["tokens_per_cpu_s"] / cpu_ceiling, 3),
                "steps": args.steps,
                "load_average": [round(load_before, 1), round(load_after, 1)],
                "machine": machine(),
            }
        ),
        flush=True,
    )
    claim = in_subprocess("run_claim_to_first_step", model_dir)
    print(
        json.dumps(
            {
                "name": "claim_to_first_step_smollm2_135m",
                "cold_s": round(claim["cold_s"], 2),
                "resident_s": round(claim["resident_s"], 2),
                "speedup": round(claim["cold_s"] / claim["resident_s"], 2),
                "machine": machine(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
