"""What letting finished rows leave a decode's batch buys when its replies end at different lengths.

    python -m benchmarks.sample_lengths [--calls 8] [--samples 4] [--max-tokens 64]
        [--rounds 3] [--base-dir DIR] [--precision auto|fp32|bf16]

An RL step samples a group of replies to each of many prompts, and the replies end where they
end: a few run long, most stop early. Here `--calls` sample calls (`--samples` each, prompts of
16 to 47 tokens, temperature 1, seeded, no stop) of one model of rank 8, each row's length
spread evenly from `--max-tokens` / 8 to `--max-tokens` (each call's `max_tokens` its own), are
decoded in one batch (`InteractiveEngine.sample_many`) on the tiny test base or the Hugging
Face directory `--base-dir` (e.g. the demo's SmolLM2-135M-Instruct). Beside it, in alternating
rounds in the same process: the same calls with every row decoding to the longest, which is the
work a batch did before, when a finished row ran along with it (its passes held every row to
the batch's last token; its replies are longer, but their tokens past each row's own length
are the ones the old batch dropped). One JSON line: the median seconds of both, the tokens a
second on both sides counting only the replies' own tokens (each row's `max_tokens`), and the
passes' rows summed. A second line: on the rows-leaving side, the mean seconds from the batch's
start to each call's answer, handed over as its rows finish (`sample_many`'s `on_answer`, as the
executor records it then), beside the batch's end, when every call was answered before.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.queue import cpu_model, emit_beside, progress
from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive import sample_batching
from workers.interactive.engine import InteractiveEngine
from workers.training.resident import ResidentBase


def _calls(args: argparse.Namespace, longest: bool) -> list[tuple[str | None, dict[str, Any]]]:
    """The round's calls: each its own length, or (`longest`) every one at the longest."""
    shortest = max(1, args.max_tokens // 8)
    calls: list[tuple[str | None, dict[str, Any]]] = []
    for seq in range(args.calls):
        spread = shortest + (args.max_tokens - shortest) * seq // max(1, args.calls - 1)
        prompt = [5 + (seq * 31 + i * 37) % 700 for i in range(16 + seq % 32)]
        request = {
            "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]},
            "num_samples": args.samples,
            "sampling_params": {
                "max_tokens": args.max_tokens if longest else spread,
                "temperature": 1.0,
                "seed": seq,
                "stop": [],
            },
        }
        calls.append(("m", request))
    return calls


def _round(
    engine: InteractiveEngine, calls: list[tuple[str | None, dict[str, Any]]]
) -> tuple[float, list[float]]:
    """The batch's seconds, and the seconds at which each call's answer was handed over."""
    answered: list[float] = []
    started = time.perf_counter()
    answers = engine.sample_many(
        calls, on_answer=lambda _, __: answered.append(time.perf_counter() - started)
    )
    for answer in answers:
        assert not isinstance(answer, Exception), answer
    return time.perf_counter() - started, answered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sample_lengths", description=__doc__
    )
    parser.add_argument("--calls", type=int, default=8, help="sample calls in the batch")
    parser.add_argument("--samples", type=int, default=4, help="num_samples of each call")
    parser.add_argument("--max-tokens", type=int, default=64, help="the longest row's tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, help="a Hugging Face model directory")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args(argv)
    longest_row = 16 + min(args.calls - 1, 31) + args.max_tokens  # prompt and reply
    padded = args.calls * args.samples * longest_row
    if padded > sample_batching.SAMPLE_TOKENS:  # both sides must decode as one batch
        parser.error(
            f"rows times the longest row is {padded}, "
            f"over a batch's {sample_batching.SAMPLE_TOKENS}: "
            "ask fewer calls, samples or tokens"
        )
    resident = ResidentBase.load(args.base_dir or TEST_BASE_PATH, args.precision)
    label = args.base_dir.name if args.base_dir else "tiny test base"
    engine = InteractiveEngine(resident)
    engine.create("m", rank=8, seed=0)
    spread, longest = _calls(args, longest=False), _calls(args, longest=True)
    tokens = args.samples * sum(r["sampling_params"]["max_tokens"] for _, r in spread)
    passes = args.samples * args.calls  # the rows of the prompts' pass, on both sides
    passes += args.samples * sum(r["sampling_params"]["max_tokens"] - 1 for _, r in spread)
    progress(f"{cpu_model()}; {label} ({resident.precision}), {args.rounds} rounds")
    _round(engine, spread)  # warm
    leaving: list[float] = []
    along: list[float] = []
    answered: list[float] = []  # each round's mean seconds to a call's answer
    for index in range(args.rounds):  # alternating: the machine's load drifts
        seconds, handed = _round(engine, spread)
        leaving.append(seconds)
        answered.append(statistics.fmean(handed))
        along.append(_round(engine, longest)[0])
        progress(f"round {index}: {leaving[-1]:.2f} s rows leaving, {along[-1]:.2f} s along")
    leaving_s, along_s = statistics.median(leaving), statistics.median(along)
    emit_beside(
        "interactive_sample_rows_leave_the_batch",
        leaving_s * 1000,
        "the same rows each decoded to the longest (finished rows running along), this process",
        along_s * 1000,
        cpu_model(),
        calls=args.calls,
        samples_per_call=args.samples,
        row_tokens=f"{max(1, args.max_tokens // 8)} to {args.max_tokens}",
        rows_in_passes=passes,
        baseline_rows_in_passes=args.samples * args.calls * args.max_tokens,
        tokens_per_second=round(tokens / leaving_s, 1),
        baseline_tokens_per_second=round(tokens / along_s, 1),
        base=f"{label}, {resident.precision}, rank 8",
        statistic="median over rounds of the batch's seconds",
    )
    emit_beside(
        "interactive_sample_time_to_answer",
        statistics.median(answered) * 1000,
        "every call answered at its batch's end (before), the same rounds",
        leaving_s * 1000,
        cpu_model(),
        calls=args.calls,
        samples_per_call=args.samples,
        row_tokens=f"{max(1, args.max_tokens // 8)} to {args.max_tokens}",
        base=f"{label}, {resident.precision}, rank 8",
        statistic="median over rounds of the mean ms from the batch's start to a call's answer",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
