"""What joining a running sample batch buys a sample asked while the batch decodes.

    python -m benchmarks.sample_joins [--calls 8] [--samples 4] [--max-tokens 64] [--late 8]
        [--late-tokens 16] [--rounds 3] [--base-dir DIR] [--precision auto|fp32|bf16]

A batch of `--calls` sample calls (`--samples` rows each, `--max-tokens` tokens, temperature 1,
seeded, no stop) of one model of rank 8 decodes (`InteractiveEngine.sample_many`) on the tiny
test base or the Hugging Face directory `--base-dir` (e.g. the demo's SmolLM2-135M-Instruct).
While it decodes, `--late` calls of one row and `--late-tokens` tokens each arrive, one every
`--max-tokens` / (2 `--late`) tokens of the batch from its second token on (the first half of the
batch). Joining: each is offered to the batch as it arrives (`more`, as the executor offers the
calls asked since its last look) and joins it. Beside it, in alternating rounds in the same
process: the same batch with nothing joining, and the late calls decoded together once it has
ended (as the executor's next claim takes them). Two JSON lines: the late calls' mean seconds
from arriving to their answer, and the seconds until every call of both is answered.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.queue import cpu_model, emit_beside, progress
from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive import sample_batching
from workers.interactive.engine import InteractiveEngine
from workers.training.resident import ResidentBase

Asked = tuple[str | None, dict[str, Any]]


def _call(seq: int, rows: int, tokens: int) -> Asked:
    prompt = [5 + (seq * 31 + i * 37) % 700 for i in range(16 + seq % 16)]
    return (
        "m",
        {
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "num_samples": rows,
            "sampling_params": {
                "max_tokens": tokens,
                "temperature": 1.0,
                "seed": seq,
                "stop": [],
            },
        },
    )


def _round(
    engine: InteractiveEngine, first: list[Asked], late: list[Asked], every: int, join: bool
) -> tuple[float, float]:
    """(the late calls' mean seconds from arriving to answer, seconds until all answered)."""
    arrived: list[float] = []
    answered: dict[int, float] = {}
    offers = [0]
    started = time.perf_counter()

    def more(take: Callable[[Asked], Callable[[], None] | None]) -> None:
        offers[0] += 1  # before the batch's (offers + 1)-th token
        if offers[0] % every == 0 and len(arrived) < len(late):
            arrived.append(time.perf_counter())
            if join:
                add = take(late[len(arrived) - 1])
                assert add is not None, "a late call did not fit the batch"
                add()  # as the executor adds it, its claim committed

    def on_answer(i: int, answer: Any) -> None:
        assert not isinstance(answer, Exception), answer
        answered[i] = time.perf_counter()

    engine.sample_many(first, on_answer=on_answer, more=more)
    assert len(arrived) == len(late), "the batch ended before every late call arrived"
    if join:
        done = [answered[len(first) + k] for k in range(len(late))]
    else:
        engine.sample_many(late, on_answer=on_answer)
        done = [answered[k] for k in range(len(late))]
    waits = [at - came for at, came in zip(done, arrived, strict=True)]
    return statistics.fmean(waits), max(answered.values()) - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sample_joins", description=__doc__)
    parser.add_argument("--calls", type=int, default=8, help="sample calls in the batch")
    parser.add_argument("--samples", type=int, default=4, help="num_samples of each call")
    parser.add_argument("--max-tokens", type=int, default=64, help="the batch's tokens a row")
    parser.add_argument("--late", type=int, default=8, help="calls arriving meanwhile")
    parser.add_argument("--late-tokens", type=int, default=16, help="their tokens (one row)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, help="a Hugging Face model directory")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args(argv)
    every = max(1, args.max_tokens // (2 * args.late))
    if every * args.late + args.late_tokens > args.max_tokens:
        parser.error("the late calls must arrive and end within the batch: ask fewer or shorter")
    rows = args.calls * args.samples + args.late
    if rows * (32 + args.max_tokens) > sample_batching.SAMPLE_TOKENS:
        parser.error(f"{rows} rows of up to {32 + args.max_tokens} tokens pass SAMPLE_TOKENS")
    resident = ResidentBase.load(args.base_dir or TEST_BASE_PATH, args.precision)
    label = args.base_dir.name if args.base_dir else "tiny test base"
    engine = InteractiveEngine(resident)
    engine.create("m", rank=8, seed=0)
    first = [_call(seq, args.samples, args.max_tokens) for seq in range(args.calls)]
    late = [_call(100 + seq, 1, args.late_tokens) for seq in range(args.late)]
    progress(f"{cpu_model()}; {label} ({resident.precision}), {args.rounds} rounds")
    _round(engine, first, late, every, join=True)  # warm
    joined: list[tuple[float, float]] = []
    waited: list[tuple[float, float]] = []
    for index in range(args.rounds):  # alternating: the machine's load drifts
        joined.append(_round(engine, first, late, every, join=True))
        waited.append(_round(engine, first, late, every, join=False))
        progress(
            f"round {index}: late calls {joined[-1][0]:.2f} s joining, {waited[-1][0]:.2f} s "
            f"waiting; all {joined[-1][1]:.2f} s against {waited[-1][1]:.2f} s"
        )
    fields = {
        "calls": args.calls,
        "samples_per_call": args.samples,
        "max_tokens": args.max_tokens,
        "late_calls": args.late,
        "late_tokens": args.late_tokens,
        "late_every_tokens": every,
        "base": f"{label}, {resident.precision}, rank 8",
    }
    emit_beside(
        "interactive_sample_join_time_to_answer",
        statistics.median(w for w, _ in joined) * 1000,
        "the late calls decoded together once the batch has ended, this process",
        statistics.median(w for w, _ in waited) * 1000,
        cpu_model(),
        **fields,
        statistic="median over rounds of the late calls' mean ms from arriving to answer",
    )
    emit_beside(
        "interactive_sample_join_all_answered",
        statistics.median(t for _, t in joined) * 1000,
        "the batch, then the late calls' batch, this process",
        statistics.median(t for _, t in waited) * 1000,
        cpu_model(),
        **fields,
        statistic="median over rounds of the ms until every call is answered",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
