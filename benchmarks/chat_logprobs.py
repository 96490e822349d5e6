"""What a chat's `logprobs` cost the executor: a chat sampled with `logprobs` and
`top_logprobs` against the same chat without, in alternating rounds in one process, and the
reading of its answer alone (`chat_answer`: the texts, bytes and alternatives of each token)
against the plain answer's. Then the same chat streamed (its reply so far handed to a sink
every `--every` seconds, as to the executor's `StreamWriter`) with logprobs against streamed
without, and the entries' JSON its writes carry, each only its new entries (as `StreamWriter`
writes them) against every entry so far at each write.

    python -m benchmarks.chat_logprobs [--base-dir <SmolLM2 dir>] [--tokens 512] [--top 20]
        [--every 0.25]

One JSON line per measurement (stdout), the baseline beside it; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.queue import cpu_model, emit_beside, progress
from tests.fixtures.testbase import TEST_BASE_PATH
from workers.interactive.chat import SoFar, chat_answer
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


class _Counted:
    """A stream's sink that counts what its writes would carry: the streamed chat's new entries
    each write (`appended`, bytes of JSON) against all its entries so far (`whole`)."""

    def __init__(self) -> None:
        self.writes = self.appended = self.whole = 0
        self.sent: dict[str, int] = {}

    def __call__(self, replies: dict[str, SoFar]) -> None:
        for key, reply in replies.items():
            self.writes += 1
            for entries in reply.logprobs or []:
                done = self.sent.get(key, 0)
                self.appended += len(json.dumps(entries[done:]))
                self.whole += len(json.dumps(entries))
                self.sent[key] = max(done, len(entries))

    def left(self) -> frozenset[str]:
        return frozenset()


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
    parser.add_argument("--every", type=float, default=0.25, help="a streamed chat's writes, s")
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
    _streamed(engine, args, fields)
    return 0


def _streamed(engine: InteractiveEngine, args: argparse.Namespace, fields: dict[str, Any]) -> None:
    """The chat streamed with logprobs against streamed without, and what its writes carry."""
    engine.stream_every_seconds = args.every
    with_entries, plain, counts = [], [], []
    for index in range(args.rounds):
        for top, took in ((args.top, with_entries), (None, plain)):
            sink = engine.stream_to = _Counted()
            took.append(_timed(engine, {**_chat(args.tokens, top), "stream": f"s{index}"})[0])
            if top is not None:
                counts.append(sink)
        progress(f"streamed {index}: {with_entries[-1]:.2f} s with logprobs, {plain[-1]:.2f} s")
    engine.stream_to = None
    streamed = {**fields, "every_seconds": args.every}
    emit_beside(
        "chat_logprobs_streamed",
        statistics.median(with_entries) * 1000,
        "the same chat streamed without logprobs, this process",
        statistics.median(plain) * 1000,
        cpu_model(),
        **streamed,
        statistic="median over rounds of a streamed chat's sample_many ms",
    )
    sink = counts[-1]
    emit_beside(
        "chat_logprobs_streamed_bytes",
        sink.appended / 1000,
        "every entry so far at each write, the same writes",
        sink.whole / 1000,
        cpu_model(),
        **streamed,
        writes=sink.writes,
        statistic="kB of entries' JSON over one streamed chat's writes (p50_ms fields: kB)",
    )


if __name__ == "__main__":
    raise SystemExit(main())
