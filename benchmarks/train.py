"""Training throughput and memory: loraforge's recipe against a plain Hugging Face Trainer + peft.

Run: `python -m benchmarks.train [--steps N] [--rounds R]`. Same machine, same data, same LoRA
(r16, alpha 32, all-linear), batch 8, on SmolLM2-135M-Instruct; each run in its own spawned
process so that peak RSS figures are separate. Prints one JSON line per measurement:

- `train`: real (non-pad) tokens/s over steps 2..N, peak RSS, final loss (eval loss on the same
  held-out set after the same number of steps), each against the baseline, and the fraction of a
  ceiling: measured matmul FLOP/s in the precision the run trained in (bf16 where the CPU has
  it, else fp32; both runs use the same) divided by 4 x parameters per token (forward plus
  activation gradients; a frozen base computes no weight gradients), measured before, between
  and after the two runs (`matmul_tflops`; the median is the ceiling): on a shared machine the
  rate drifts, and a line whose three differ compared runs at different machine speeds. With
  `--rounds R` both runs are measured R times, the baseline first in odd rounds.
- `claim_to_first_step`: seconds from taking a job to its first optimizer step, with the base
  loaded cold (`ResidentBase.load` + first step) and already resident (first step only).

The data is synthetic chat with skewed (log-normal) lengths: mean ~100 tokens, p95 ~200, max 450.

`--random-weights SHAPE` trains a randomly initialised Llama-shaped model instead (SmolLM2's
tokenizer; `smollm2-135m` is SmolLM2's own shape, `llama-1b` Llama 3.2 1B's with SmolLM2's
vocabulary): throughput depends on the shapes, not on the weights, so it measures where the real
weights are not at hand (a lent GPU machine reaches no package index). Where CUDA is available both
runs train on the GPU (hide it with `CUDA_VISIBLE_DEVICES=` to measure the CPU); the ceiling is
then a measured bf16 matmul on the GPU, its fraction the model FLOPs utilisation (`mfu`), and peak
GPU memory is printed beside peak RSS.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BATCH_SIZE = 8
LORA_RANK = 16
MAX_SEQ_LENGTH = 512
EVAL_EXAMPLES = 48
SEED = 42

# Llama shapes for --random-weights (vocabulary and special tokens come from the tokenizer).
SHAPES: dict[str, dict[str, int]] = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}

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


def random_model_dir(shape: str, tokenizer_dir: Path, out: Path) -> Path:
    """Save a seeded, randomly initialised bf16 Llama of `shape` with the tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def _hyperparameters(steps: int, batch_size: int) -> Any:
    from control_plane.hyperparameters import Hyperparameters

    return Hyperparameters(
        n_epochs=1,
        batch_size=batch_size,
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


def _peak_gpu_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def run_loraforge(model_dir: str, steps: int, batch_size: int) -> dict[str, Any]:
    """Train with `train_adapter` on a freshly loaded resident base; figures from its events."""
    from workers.training.recipe import ResidentBase, TrainHooks, train_adapter

    base = ResidentBase.load(Path(model_dir))
    records = synthetic_records(steps * batch_size + EVAL_EXAMPLES, base.tokenizer, SEED)
    train, held_out = records[:-EVAL_EXAMPLES], records[-EVAL_EXAMPLES:]
    stamps: list[tuple[float, float, dict[str, Any]]] = []

    def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
        if kind == "metrics" and "train_loss" in data:
            stamps.append((time.perf_counter(), time.process_time(), data))

    with tempfile.TemporaryDirectory() as tmp:
        result = train_adapter(
            base,
            train,
            held_out,
            _hyperparameters(steps, batch_size),
            TrainHooks(on_event),
            Path(tmp),
        )
    tokens = sum(data["tokens"] for _, _, data in stamps[1:])
    losses = [data["train_loss"] for _, _, data in stamps]
    return {
        "tokens_per_s": tokens / (stamps[-1][0] - stamps[0][0]),
        "tokens_per_cpu_s": tokens / (stamps[-1][1] - stamps[0][1]),
        "peak_rss_mib": _peak_rss_mib(),
        "peak_gpu_mib": _peak_gpu_mib(),
        "final_loss": result.final_eval_loss,
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "steps": result.global_step,
        "precision": result.precision,
    }


def run_baseline(model_dir: str, steps: int, batch_size: int) -> dict[str, Any]:
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

    from workers.training.device import bf16_supported, default_device
    from workers.training.formatting import tokenize_records

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = synthetic_records(steps * batch_size + EVAL_EXAMPLES, tokenizer, SEED)
    hp = _hyperparameters(steps, batch_size)

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
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            max_steps=steps,
            learning_rate=hp.learning_rate,
            warmup_steps=math.ceil(hp.warmup_ratio * steps),
            lr_scheduler_type="cosine",
            bf16=bf16_supported(default_device()),
            use_cpu=default_device().type == "cpu",
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
        "peak_gpu_mib": _peak_gpu_mib(),
        "final_loss": eval_loss,
        "train_loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "steps": len(stamps),
    }


def run_claim_to_first_step(model_dir: str, batch_size: int) -> dict[str, Any]:
    """Seconds to the first optimizer step with the base cold, then resident (a second job)."""
    from workers.training.recipe import ResidentBase, TrainHooks, train_adapter

    def first_step(base: ResidentBase | None, started: float) -> tuple[ResidentBase, float]:
        resident = base or ResidentBase.load(Path(model_dir))
        records = synthetic_records(batch_size * 2, resident.tokenizer, SEED)
        reached: list[float] = []

        def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
            if kind == "metrics" and "train_loss" in data and not reached:
                reached.append(time.perf_counter())

        with tempfile.TemporaryDirectory() as tmp:
            train_adapter(
                resident,
                records,
                None,
                _hyperparameters(2, batch_size),
                TrainHooks(on_event, should_stop=lambda: bool(reached)),
                Path(tmp),
            )
        return resident, reached[0] - started

    base, cold = first_step(None, time.perf_counter())
    _, resident = first_step(base, time.perf_counter())
    return {"cold_s": cold, "resident_s": resident}


def matmul_flops(precision: str) -> tuple[float, float]:
    """Measured matmul throughput in `precision` (FLOP per second, and per CPU-second).

    On the CPU a 2048-cube product; on a GPU an 8192-cube one, timed after a synchronize."""
    import torch

    cuda = torch.cuda.is_available()
    size, repeats = (8192, 20) if cuda else (2048, 5)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype, device="cuda" if cuda else "cpu")
    b = torch.randn_like(a)
    for _ in range(3 if cuda else 1):
        a @ b
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        a @ b
    sync()
    flops = 2 * size**3 * repeats
    return flops / (time.perf_counter() - wall), flops / (time.process_time() - cpu)


def _bf16_here() -> bool:
    from workers.training.device import bf16_supported, default_device

    return bf16_supported(default_device())


def _child(module: str, target: str, queue: Any, *args: Any) -> None:
    queue.put(getattr(importlib.import_module(module), target)(*args))


def in_subprocess(target: str, *args: Any, module: str = "benchmarks.train") -> dict[str, Any]:
    """Run `module`'s `target(*args)` in a spawned process; its peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(module, target, queue, *args))
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
    cores = len(os.sched_getaffinity(0))
    described = (
        f"{cpu}, {cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if torch.cuda.is_available():
        described = f"{torch.cuda.get_device_name()} ({described})"
    return described


@contextmanager
def model_under_test(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(directory, label) of the model to train: SmolLM2, or random weights of a shape."""
    from workers.bases.smollm2 import ensure_smollm2

    if args.random_weights is None:
        yield str(ensure_smollm2(args.cache)), "smollm2_135m"
        return
    tokenizer_dir = args.tokenizer or ensure_smollm2(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        path = random_model_dir(args.random_weights, tokenizer_dir, Path(tmp))
        yield str(path), f"random_{args.random_weights.replace('-', '_')}"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that pick the model and batch (shared with `benchmarks.profile_train`)."""
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("LORAFORGE_HOME", Path.home() / ".loraforge")) / "bases",
        help="where SmolLM2 is cached (fetched there on first use)",
    )
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="examples per step")
    parser.add_argument(
        "--random-weights",
        choices=sorted(SHAPES),
        help="train a randomly initialised Llama of this shape instead of SmolLM2's weights",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer directory for --random-weights (default: the cached SmolLM2's)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure both runs this many times, in alternating order (a line per round)",
    )
    add_model_arguments(parser)
    args = parser.parse_args()
    with model_under_test(args) as (model_dir, label):
        for round_ in range(args.rounds):
            measure(model_dir, label, args.steps, args.batch_size, round_)
        claim_to_first_step(model_dir, label, args.batch_size)


def measure(model_dir: str, label: str, steps: int, batch_size: int, round_: int = 0) -> None:
    """Both runs on `model_dir` (loraforge first in even rounds, the baseline first in odd ones);
    one JSON line.

    A shared machine's speed drifts: the matmul rate is measured before, between and after the
    runs (`matmul_tflops`), so a line shows whether the two ran on the same machine speed."""
    import torch

    from workers.bases.checkpoints import inspect_model_dir

    parameters = inspect_model_dir(Path(model_dir)).parameter_count
    precision = "bf16" if _bf16_here() else "fp32"
    load_before = os.getloadavg()[0]
    probes = [matmul_flops(precision)]
    runs: dict[str, dict[str, Any]] = {}
    for name in ("run_loraforge", "run_baseline")[:: -1 if round_ % 2 else 1]:
        runs[name] = in_subprocess(name, model_dir, steps, batch_size)
        probes.append(matmul_flops(precision))
    ours, baseline = runs["run_loraforge"], runs["run_baseline"]
    flops = sorted(p[0] for p in probes)[1]  # the median of the three
    flops_per_cpu_s = sorted(p[1] for p in probes)[1]
    ceiling, cpu_ceiling = flops / (4 * parameters), flops_per_cpu_s / (4 * parameters)
    load_after = os.getloadavg()[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu: dict[str, Any] = {}
    if ours["peak_gpu_mib"] is not None:
        gpu = {
            "peak_gpu_mib": round(ours["peak_gpu_mib"], 1),
            "baseline_peak_gpu_mib": round(baseline["peak_gpu_mib"], 1),
            "gpu_memory_ratio": round(ours["peak_gpu_mib"] / baseline["peak_gpu_mib"], 3),
            "mfu": round(ours["tokens_per_s"] / ceiling, 3),
            "baseline_mfu": round(baseline["tokens_per_s"] / ceiling, 3),
        }
    print(
        json.dumps(
            {
                "name": f"train_{label}_lora_r{LORA_RANK}_batch{batch_size}_{device}",
                "parameters": parameters,
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
                "steps": steps,
                **gpu,
                "round": round_,
                "first": "loraforge" if round_ % 2 == 0 else "baseline",
                "matmul_tflops": [round(p[0] / 1e12, 3) for p in probes],
                "load_average": [round(load_before, 1), round(load_after, 1)],
                "machine": machine(),
            }
        ),
        flush=True,
    )


def claim_to_first_step(model_dir: str, label: str, batch_size: int) -> None:
    """Claim to first optimizer step, cold and resident; one JSON line."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    claim = in_subprocess("run_claim_to_first_step", model_dir, batch_size)
    print(
        json.dumps(
            {
                "name": f"claim_to_first_step_{label}_{device}",
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
