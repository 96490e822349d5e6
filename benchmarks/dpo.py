"""DPO throughput and memory: loraforge's recipe against the textbook peft DPO step.

Run: `python -m benchmarks.dpo [--steps N] [--rounds R]`. SmolLM2-135M-Instruct, LoRA r16 on
all linear layers, batch 8 pairs, beta 0.1, the same synthetic pairs on both sides: the chat
records of `benchmarks.train` (log-normal lengths, mean ~100 tokens), each record's reply
preferred over its words shuffled. Each run in its own spawned process, so peak RSS is its own.

The baseline is the step TRL's `DPOTrainer` takes with a peft model and no reference model: the
batch's preferred and other replies padded into one tensor, a forward with the adapter
disabled for the reference (no gradients) and one with it for the policy, each reply's log-
probability summed over its reply tokens from full logits, AdamW. loraforge packs each row of
pairs without padding, projects to the vocabulary in chunks recomputed in the backward, and
computes the reference once before the first step (`workers.training.preference`).

One JSON line per round: pairs' tokens/s (real, non-pad tokens of both replies) over steps
2..N, peak RSS, the last steps' mean loss, each against the baseline.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.train import (
    _peak_rss_mib,
    add_model_arguments,
    in_subprocess,
    machine,
    model_under_test,
    synthetic_records,
)

LORA_RANK = 16
BETA = 0.1
SEED = 7
MAX_SEQ_LENGTH = 512


def preference_records(count: int, tokenizer: Any) -> list[dict[str, Any]]:
    """Pairs: a chat record's reply preferred over the same words shuffled (a preference the
    model can learn, at about the same length)."""
    rng = random.Random(SEED)
    pairs = []
    for chat in synthetic_records(count, tokenizer, SEED):
        *prompt, reply = chat["messages"]
        words = reply["content"].split()
        rng.shuffle(words)
        pairs.append(
            {
                "input": {"messages": prompt},
                "preferred_output": [reply],
                "non_preferred_output": [{"role": "assistant", "content": " ".join(words)}],
            }
        )
    return pairs


def _hyperparameters(steps: int, batch_size: int) -> Any:
    from control_plane.hyperparameters import Hyperparameters

    return Hyperparameters(
        method="dpo",
        dpo_beta=BETA,
        n_epochs=1,
        batch_size=batch_size,
        lora_rank=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        max_seq_length=MAX_SEQ_LENGTH,
        seed=SEED,
        warmup_ratio=0.0,
        checkpoint_every_steps=10 * steps,
    )


def run_loraforge(model_dir: str, steps: int, batch_size: int) -> dict[str, Any]:
    from workers.training.recipe import ResidentBase, TrainHooks, train_adapter

    base = ResidentBase.load(Path(model_dir))
    records = preference_records(steps * batch_size, base.tokenizer)
    stamps: list[tuple[float, dict[str, Any]]] = []

    def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
        if kind == "metrics" and "train_loss" in data:
            stamps.append((time.perf_counter(), data))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train_adapter(
            base,
            records,
            None,
            _hyperparameters(steps, batch_size),
            TrainHooks(on_event),
            Path(tmp),
        )
    tokens = sum(data["tokens"] for _, data in stamps[1:])
    losses = [data["train_loss"] for _, data in stamps]
    return {
        "tokens_per_s": tokens / (stamps[-1][0] - stamps[0][0]),
        "to_first_step_s": stamps[0][0] - started,
        "peak_rss_mib": _peak_rss_mib(),
        "train_loss_last": sum(losses[-3:]) / len(losses[-3:]),
        "steps": len(stamps),
    }


def run_baseline(model_dir: str, steps: int, batch_size: int) -> dict[str, Any]:
    """The textbook step (see the module docstring), on the same tokenized pairs."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from control_plane.hyperparameters import Hyperparameters
    from workers.training.device import bf16_supported, default_device
    from workers.training.preference import tokenize_pairs

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = tokenize_pairs(
        preference_records(steps * batch_size, tokenizer), tokenizer, MAX_SEQ_LENGTH
    ).examples
    device = default_device()
    bf16 = bf16_supported(device)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if bf16 else torch.float32
    )
    config = LoraConfig(
        r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config).to(device)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    hp = Hyperparameters(learning_rate_multiplier=1.0)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=hp.learning_rate
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def logps(batch: list[Any]) -> torch.Tensor:
        width = max(len(e) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, example in enumerate(batch):
            ids[row, : len(example)] = torch.tensor(example.input_ids)
            labels[row, : len(example)] = torch.tensor(example.labels)
            mask[row, : len(example)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        token = torch.gather(
            F.log_softmax(logits, dim=-1), 2, targets.clamp(min=0).unsqueeze(-1)
        ).squeeze(-1)
        return (token * (targets != -100)).sum(-1)

    stamps: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []
    for step in range(steps):
        batch = pairs[step * batch_size : (step + 1) * batch_size]
        flat = [e for p in batch for e in (p.chosen, p.rejected)]
        with torch.no_grad(), model.disable_adapter():
            reference = logps(flat).view(-1, 2)
        policy = logps(flat).view(-1, 2)
        rewards = BETA * (policy - reference)
        loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
        tokens.append(sum(len(e) for e in flat))
        losses.append(loss.item())
    return {
        "tokens_per_s": sum(tokens[1:]) / (stamps[-1] - stamps[0]),
        "peak_rss_mib": _peak_rss_mib(),
        "train_loss_last": sum(losses[-3:]) / len(losses[-3:]),
        "steps": len(stamps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=1)
    add_model_arguments(parser)
    args = parser.parse_args()
    with model_under_test(args) as (model_dir, label):
        for round_ in range(args.rounds):
            order = ["run_loraforge", "run_baseline"]
            if round_ % 2:
                order.reverse()
            runs = {
                t: in_subprocess(t, model_dir, args.steps, args.batch_size, module="benchmarks.dpo")
                for t in order
            }
            ours, theirs = runs["run_loraforge"], runs["run_baseline"]
            print(
                json.dumps(
                    {
                        "name": "dpo_train",
                        "model": label,
                        "round": round_,
                        "batch_pairs": args.batch_size,
                        "tokens_per_s": round(ours["tokens_per_s"], 1),
                        "peak_rss_mib": round(ours["peak_rss_mib"]),
                        "train_loss_last": round(ours["train_loss_last"], 4),
                        "to_first_step_s": round(ours["to_first_step_s"], 2),
                        "baseline": "peft_dpo_step_reference_by_disabled_adapter",
                        "baseline_tokens_per_s": round(theirs["tokens_per_s"], 1),
                        "baseline_peak_rss_mib": round(theirs["peak_rss_mib"]),
                        "baseline_train_loss_last": round(theirs["train_loss_last"], 4),
                        "speedup": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
                        "machine": machine(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
