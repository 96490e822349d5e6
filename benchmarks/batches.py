"""What a batch (`POST /v1/batches`) costs beside the same chats asked at once by the client:
the official `openai` SDK either uploads the chats as a batch file, creates the batch, polls it
until it completes and reads its output file, or asks every chat itself on `--window` threads
(what a user does without a Batch API: one connection held per chat in flight).

    python -m benchmarks.batches [--requests 48] [--window 16] [--tokens 16] [--rounds 3]
        [--base-dir DIR]

The API on a socket of its own, the real executor (`workers.interactive.runner`) on the tiny
test base or the Hugging Face directory `--base-dir` (e.g. the demo's SmolLM2-135M-Instruct),
and the batches' runner started every `BATCH_PASS_INTERVAL_S` for `BATCH_RUN_SECONDS`, as the
beat's task runs it (a pass as each call finishes), `--window` requests in flight. Each side runs in a process of its own, as a user's script,
alternating; greedy chats of distinct questions, at most `--tokens` tokens each. One JSON line:
the batch's median seconds from its upload to its output read, beside the threads' from the
first ask to the last answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.interactive import in_own_process, sdk_bench, served_with
from benchmarks.queue import add_database_url_argument, emit_beside, progress
from control_plane.api import batch_runner
from loraforge.tasks import BATCH_PASS_INTERVAL_S, BATCH_RUN_SECONDS
from tests.tinker_harness import pausable_executor


def _bodies(base: str, requests: int, tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "model": base,
            "messages": [{"role": "user", "content": f"Say something about the number {k}."}],
            "max_completion_tokens": tokens,
            "temperature": 0,
        }
        for k in range(requests)
    ]


def _as_batch(url: str, key: str, bodies: list[dict[str, Any]], done: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    lines = [
        {"custom_id": f"q-{k}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        for k, body in enumerate(bodies)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    started = time.monotonic()
    uploaded = client.files.create(file=("questions.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while batch.status != "completed":
        assert batch.status == "in_progress", batch
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.output_file_id is not None
    output = client.files.content(batch.output_file_id).text.splitlines()
    seconds = time.monotonic() - started
    assert len(output) == len(bodies), batch
    sampled = sum(json.loads(o)["response"]["body"]["usage"]["completion_tokens"] for o in output)
    done.put((seconds, sampled))


def _on_threads(url: str, key: str, bodies: list[dict[str, Any]], window: int, done: Any) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

    def ask(body: dict[str, Any]) -> int:
        reply = client.chat.completions.create(**body)
        assert reply.usage is not None
        return reply.usage.completion_tokens

    started = time.monotonic()
    with ThreadPoolExecutor(window) as pool:
        sampled = sum(pool.map(ask, bodies))
    done.put((time.monotonic() - started, sampled))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batches", description=__doc__)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--window", type=int, default=batch_runner.WINDOW)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--base-dir", type=Path, default=None)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    sides: dict[str, list[tuple[float, int]]] = {"batch": [], "threads": []}
    with sdk_bench(args.database_url, args.base_dir) as bench:
        machine, base = bench.machine, bench.base.name
        bodies = _bodies(base, args.requests, args.tokens)
        stop = threading.Event()

        def beat() -> None:  # the beat's task, every BATCH_PASS_INTERVAL_S
            while not stop.wait(BATCH_PASS_INTERVAL_S):
                batch_runner.run_for(bench.services, BATCH_RUN_SECONDS, window=args.window)

        beating = threading.Thread(target=beat)
        with pausable_executor(bench.runner) as serving, served_with(bench.services) as url:
            serving.set()
            beating.start()
            try:
                in_own_process(_on_threads, url, bench.key, bodies[:2], 2)  # warm
                progress(f"{machine}; {args.rounds} rounds a side")
                for index in range(args.rounds):
                    for side in sides:
                        if side == "batch":
                            found = in_own_process(_as_batch, url, bench.key, bodies)
                        else:
                            found = in_own_process(_on_threads, url, bench.key, bodies, args.window)
                        sides[side].append(found)
                        progress(f"round {index}, {side}: {found[0]:.2f} s")
            finally:
                stop.set()
                beating.join()
    ours, theirs = sides["batch"], sides["threads"]
    emit_beside(
        "batch_of_chats",
        statistics.median(s for s, _ in ours) * 1000,
        f"the same chats asked by the client on {args.window} threads at once",
        statistics.median(s for s, _ in theirs) * 1000,
        machine,
        base=bench.label,
        what=(
            f"{args.requests} chats, greedy, at most {args.tokens} tokens each: from the upload "
            f"to the output read, the runner as the beat runs it, {args.window} in flight"
        ),
        rounds=args.rounds,
        tokens_sampled=statistics.median(t for _, t in ours),
        baseline_tokens_sampled=statistics.median(t for _, t in theirs),
        statistic="median over rounds, ms",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
