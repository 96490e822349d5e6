"""The demo's evaluation: greedy answers from the base and from base + adapter, scored strictly.

`evaluate` loads the base once, scores its answers to the held-out prompts, attaches the adapter
and scores again; `format_rows` and `summary` print the comparison that `loraforge demo` ends
with. `python -m loraforge.demo.evaluation` trains the demo adapter with the recipe alone (no
platform) and evaluates it, printing one JSON line of figures, for measuring.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.hyperparameters import Hyperparameters
from loraforge.demo.skill import (
    DEMO_HYPERPARAMETERS,
    USER_PREFIX,
    load_heldout,
    load_train,
    score,
    user_prompt,
)


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    max_new_tokens: int = 48,
    batch_size: int = 32,
) -> list[str]:
    """Greedy replies (new text only) to chat `prompts`, rendered with the chat template.

    Prompts are decoded in left-padded batches of similar lengths; the model is used as it is
    (load it in bf16 for speed on a CPU with bf16 support).
    """
    import torch
    from transformers import GenerationConfig

    rendered = [
        tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    eos = (
        tokenizer.convert_tokens_to_ids("<|im_end|>")
        if "<|im_end|>" in tokenizer.get_vocab()
        else None
    )
    eos_ids = [i for i in {tokenizer.eos_token_id, eos} if i is not None]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
    answers: list[str] = [""] * len(rendered)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = tokenizer(
                    [rendered[i] for i in chunk],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(model.device)
                output = model.generate(**batch, generation_config=config)
                new = output[:, batch["input_ids"].shape[1] :]
                for index, tokens in zip(chunk, new, strict=True):
                    answers[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
    return answers


@dataclass(frozen=True)
class Row:
    """One held-out prompt with both models' answers."""

    prompt: str
    expected: dict[str, Any]
    base_answer: str
    base_correct: bool
    adapter_answer: str | None
    adapter_correct: bool | None


def evaluate(
    base_dir: Path,
    adapter_dir: Path | None,
    heldout: Sequence[dict[str, Any]],
    max_new_tokens: int = 48,
) -> tuple[int, int | None, list[Row]]:
    """Score the base, then base + adapter, on `heldout`; returns (base, adapter, rows).

    The base is loaded once in bf16 (fp32 where the hardware has no bf16); the adapter is
    attached to it with `PeftModel.from_pretrained`. `adapter_dir=None` scores the base only.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training.device import default_device, resolve_precision

    device = default_device()
    dtype = torch.bfloat16 if resolve_precision("auto", device) == "bf16" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).to(device).eval()
    prompts = [record["messages"] for record in heldout]
    expected = [record["expected"] for record in heldout]
    base_answers = generate_answers(model, tokenizer, prompts, max_new_tokens)
    base_marks = [score(a, e) for a, e in zip(base_answers, expected, strict=True)]
    adapter_answers: list[str | None] = [None] * len(heldout)
    adapter_marks: list[bool | None] = [None] * len(heldout)
    if adapter_dir is not None:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(model, adapter_dir).eval()
        answers = generate_answers(adapted, tokenizer, prompts, max_new_tokens)
        adapter_answers = list(answers)
        adapter_marks = [score(a, e) for a, e in zip(answers, expected, strict=True)]
    rows = [
        Row(user_prompt(record), exp, b, bm, a, am)
        for record, exp, b, bm, a, am in zip(
            heldout, expected, base_answers, base_marks, adapter_answers, adapter_marks, strict=True
        )
    ]
    adapter_score = sum(bool(m) for m in adapter_marks) if adapter_dir is not None else None
    return sum(base_marks), adapter_score, rows


def format_rows(rows: Sequence[Row], width: int = 60) -> str:
    """A side-by-side listing of the held-out answers, one block per prompt."""

    def clip(text: str | None) -> str:
        text = (text or "").replace("\n", "\\n")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = []
    for number, row in enumerate(rows, 1):
        lines.append(f"{number:2d}. {row.prompt[len(USER_PREFIX) :]}")
        lines.append(f"    base    {'✓' if row.base_correct else '✗'} {clip(row.base_answer)}")
        if row.adapter_answer is not None:
            mark = "✓" if row.adapter_correct else "✗"
            lines.append(f"    adapter {mark} {clip(row.adapter_answer)}")
    return "\n".join(lines)


def summary(base_score: int, adapter_score: int | None, total: int) -> str:
    if adapter_score is None:
        return f"held-out: base {base_score}/{total}"
    return f"held-out: base {base_score}/{total} → adapter {adapter_score}/{total}"


def run_local(
    cache_root: Path,
    output_dir: Path,
    hp: Hyperparameters = DEMO_HYPERPARAMETERS,
    train_limit: int | None = None,
) -> dict[str, Any]:
    """Train the demo adapter with the recipe alone (no platform) and evaluate it; print figures."""
    import torch

    from workers.bases.smollm2 import ensure_smollm2
    from workers.training.recipe import ResidentBase, TrainHooks, train_adapter

    base_dir = ensure_smollm2(cache_root, progress=True)
    train = load_train()[:train_limit]
    heldout = load_heldout()
    loaded = time.perf_counter()
    base = ResidentBase.load(base_dir)
    load_s = time.perf_counter() - loaded

    def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
        del data
        print(f"  [{kind}] {message}", file=sys.stderr, flush=True)

    started, cpu_started = time.perf_counter(), time.process_time()
    result = train_adapter(base, train, None, hp, TrainHooks(on_event=on_event), output_dir)
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    assert result.adapter_dir is not None
    started, cpu_started = time.perf_counter(), time.process_time()
    base_score, adapter_score, rows = evaluate(base_dir, result.adapter_dir, heldout)
    eval_s, eval_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    print(format_rows(rows))
    print(summary(base_score, adapter_score, len(heldout)))
    figures = {
        "train_examples": len(train),
        "steps": result.global_step,
        "trained_tokens": result.trained_tokens,
        "train_s": round(train_s, 1),
        "train_cpu_s": round(train_cpu_s, 1),
        "tokens_per_s": round(result.trained_tokens / train_s, 1),
        "final_train_loss": result.final_train_loss,
        "precision": result.precision,
        "base_load_s": round(load_s, 1),
        "eval_s": round(eval_s, 1),
        "eval_cpu_s": round(eval_cpu_s, 1),
        "torch_threads": torch.get_num_threads(),
        "base_score": base_score,
        "adapter_score": adapter_score,
        "heldout": len(heldout),
        "adapter_dir": str(result.adapter_dir),
    }
    print(json.dumps(figures))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraforge.demo.evaluation", description=__doc__
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "loraforge" / "test-bases",
        help="base-model cache (default: the one the realmodel tests share)",
    )
    parser.add_argument("--output", type=Path, default=Path("demo-output"))
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--hp", default="{}", help="JSON overrides of DEMO_HYPERPARAMETERS")
    args = parser.parse_args(argv)
    hp = DEMO_HYPERPARAMETERS.model_copy(update=json.loads(args.hp))
    hp = Hyperparameters.model_validate(hp.model_dump())
    run_local(args.cache, args.output, hp, args.train_limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
