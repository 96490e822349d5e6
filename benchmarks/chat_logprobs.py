"""What a chat's `logprobs` cost the executor: a chat sampled with `logprobs` and
`top_logprobs` against the same chat without, in alternating rounds in one process, and the
reading of its answer alone (`chat_answer`: the texts, bytes and alternatives of each token)
against the plain answer's.

    python -m benchmarks.chat_logprobs [--base-dir <SmolLM2 dir>] [--tokens 512] [--top 20]

One JSON line per measurement (stdout), the baseline beside it; progress on stderr.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.queue import cpu_model, emit_beside, progress
from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive.chat import chat_answer
from workers.interactive.engine import InteractiveEngine
from workers.interactive.sample_requests import read_sample_request
from workers.training.resident import ResidentBase

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def _chat(tokens: int, top: int | None) -> dict[str, Any]:
    asked: dict[str, Any] = {
        "messages": MESSAGES,
        "num_samples": 1,
        "sampling_params": {"max_tokens": tokens, "temperature": 0.0, "stop": []},
    }
    if top is not None:
        asked |= {"logprobs": True, "topk_sample_logprobs": top}
    return asked


def _timed(engine: InteractiveEngine, asked: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    [answer] = engine.sample_many([(None, asked)])
    assert isinstance(answer, dict), answer
    return time.perf_counter() - started, answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chat_logprobs")
    parser.add_argument("--base-dir", type=Path, default=None, help="default: the tiny test base")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--top", type=int, default=20, help="top_logprobs, at most 20")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or not 0 < args.top <= 20 or args.tokens < 1:
        parser.error("--rounds and --tokens must be at least 1, --top from 1 to 20")
    resident = ResidentBase.load(args.base_dir or TEST_BASE_PATH, args.precision)
    label = args.base_dir.name if args.base_dir else "tiny test base"
    engine = InteractiveEngine(resident)
    progress(f"{cpu_model()}; {label} ({resident.precision}), {args.rounds} rounds")
    _timed(engine, _chat(args.tokens, args.top))  # warm
    asked, plain = [], []
    answer: dict[str, Any] = {}
    for index in range(args.rounds):  # alternating: the machine's load drifts
        took, answer = _timed(engine, _chat(args.tokens, args.top))
        asked.append(took)
        plain.append(_timed(engine, _chat(args.tokens, None))[0])
        progress(f"round {index}: {asked[-1]:.2f} s with logprobs, {plain[-1]:.2f} s without")
    [sequence] = answer["sequences"]
    fields = {
        "tokens": len(sequence["tokens"]),
        "top_logprobs": args.top,
        "base": f"{label}, {resident.precision}",
    }
    emit_beside(
        "chat_logprobs_call",
        statistics.median(asked) * 1000,
        "the same chat without logprobs, this process",
        statistics.median(plain) * 1000,
        cpu_model(),
        **fields,
        statistic="median over rounds of a chat's sample_many ms",
    )
    # The answer's reading alone, from the tokens and their top-k rows the decode gave.
    tokenizer = resident.tokenizer
    vocab = len(tokenizer)

    def raw(round_: int) -> dict[str, Any]:
        """The answer with alternatives of its own each round (new to the tokenizer's cache,
        as a new reply's mostly are)."""
        rows = [
            [((t + 97 * k + 7919 * round_) % vocab, -1.0 - k) for k in range(args.top)]
            for t in sequence["tokens"]
        ]
        return {"sequences": [{**sequence, "topk_logprobs": rows}]}

    parsed = read_sample_request(
        {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [0]}]}, "sampling_params": {}},
        len(tokenizer),
        10**6,
        frozenset(),
    )
    read, bare = [], []
    for index in range(args.rounds):
        sampled = raw(index)
        started = time.perf_counter()
        chat_answer(sampled, parsed, tokenizer, logprobs=True)
        read.append(time.perf_counter() - started)
        started = time.perf_counter()
        chat_answer(sampled, parsed, tokenizer)
        bare.append(time.perf_counter() - started)
    emit_beside(
        "chat_logprobs_answer_read",
        statistics.median(read) * 1000,
        "the same answer read without logprobs (its text alone), this process",
        statistics.median(bare) * 1000,
        cpu_model(),
        **fields,
        statistic="median over rounds of chat_answer's ms",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
