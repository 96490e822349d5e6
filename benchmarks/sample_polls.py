"""What one long poll a sampling client saves the API and the database against one poll a sample.

    python -m benchmarks.sample_polls [--samples 256] [--max-tokens 16] [--wait 20]
        [--rounds 3] [--base-dir DIR]

An RL loop asks one sampler for many samples at once and waits on them all. With the client
config's `sample_use_retrieve_futures` (loraforge's default, `LORAFORGE_TINKER_SESSION_POLLING`)
the official `tinker` SDK waits on one `retrieve_futures` long poll for the client's whole
session and fetches each answer once it is reported; without it, each sample in flight holds a
`retrieve_future` poll of its own, each looking at its call every second until it finishes.
Here the same API is served twice on sockets of its own, the flag on and off, with the real
executor (`workers.interactive.runner`, on connections of its own) on the tiny test base or the
Hugging Face directory `--base-dir`. Each round, the SDK in a process of its own asks
`--samples` sample calls of `--max-tokens` tokens at once while the executor is paused (a busy
executor's queue); `--wait` seconds of waiting are measured, the API's poll requests and the
database's transactions; then the executor drains them, and the client's seconds from its first
ask to its last answer are its figure. Alternating rounds in one process; one JSON line with the
per-sample polls beside the session's poll.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tinker
from sqlalchemy import Engine, text
from tinker import types

from benchmarks.interactive import sdk_bench
from benchmarks.queue import (
    add_database_url_argument,
    emit_beside,
    progress,
)
from control_plane import db
from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.services import Services
from tests.tinker_harness import counted, pausable_executor

POLLS = ("/api/v1/retrieve_future", "/api/v1/retrieve_futures")


@contextmanager
def _api(services: Services, polling: bool) -> Iterator[tuple[str, Counter[str]]]:
    """The API with `tinker_session_polling` as given, on a socket of its own, counting the
    requests it answers by path."""
    settings = services.settings.model_copy(update={"tinker_session_polling": polling})
    app = create_app(dataclasses.replace(services, settings=settings))
    hits = counted(app)
    with serve_in_thread(app) as url:
        yield url, hits


def _transactions(engine: Engine) -> int:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(
            conn.execute(
                text(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                    "WHERE datname = current_database()"
                )
            ).scalar_one()
        )


def _client(url: str, key: str, base: str, samples: int, max_tokens: int, done: Any) -> None:
    """The SDK in a process of its own, as a tenant's loop runs: every sample asked at once,
    then awaited; puts the seconds from its first ask to its last answer."""
    prompt = types.ModelInput.from_ints([5 + (i * 37) % 700 for i in range(16)])
    params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1)
    with tinker.ServiceClient(base_url=url, api_key="tml-" + key) as service:
        sampler = service.create_sampling_client(base_model=base).result(timeout=120)
        started = time.monotonic()
        futures = [sampler.sample(prompt, 1, params) for _ in range(samples)]
        for future in futures:
            future.result(timeout=900)
        done.put(time.monotonic() - started)


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM interactive_calls WHERE status = 'pending'")
            ).scalar_one()
        )


def _round(
    url: str,
    hits: Counter[str],
    key: str,
    base: str,
    engine: Engine,
    serving: threading.Event,
    args: argparse.Namespace,
) -> dict[str, float]:
    """The samples asked while the executor is paused; what `--wait` seconds of waiting on them
    cost; then the executor drains them."""
    serving.clear()
    done: Any = multiprocessing.get_context("spawn").Queue()
    client = multiprocessing.get_context("spawn").Process(
        target=_client, args=(url, key, base, args.samples, args.max_tokens, done)
    )
    client.start()
    spawned = time.monotonic()
    deadline = spawned + 300
    while _pending(engine) < args.samples:
        assert time.monotonic() < deadline and client.is_alive(), "the samples were not asked"
        time.sleep(0.05)
    asked = time.monotonic() - spawned
    time.sleep(2)  # every sample's first poll is in: the waiting
    before_hits = sum(hits[p] for p in POLLS)
    before_xacts = _transactions(engine)
    time.sleep(args.wait)
    polls = sum(hits[p] for p in POLLS) - before_hits
    xacts = _transactions(engine) - before_xacts
    serving.set()
    resumed = time.monotonic()
    seconds = float(done.get(timeout=900))
    drained = time.monotonic() - resumed
    client.join(60)
    return {
        "seconds": seconds,
        "asked": asked,
        "drained": drained,
        "polls": polls,
        "transactions": xacts,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sample_polls", description=__doc__)
    parser.add_argument("--samples", type=int, default=256, help="sample calls asked at once")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--wait", type=float, default=20.0, help="seconds the samples wait, the executor paused"
    )
    parser.add_argument("--base-dir", type=Path, default=None)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    sides: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    # The executor on connections of its own, as in its own process: the SDK's burst of asks
    # takes the API's pool, not the executor's.
    with sdk_bench(args.database_url, args.base_dir) as bench:
        machine, services = bench.machine, bench.services
        # The benchmark's own reads, on a pool the burst of asks does not take.
        watch = db.make_engine(services.database_url, pool_size=2)
        try:
            with (
                pausable_executor(bench.runner) as serving,
                _api(services, True) as (on_url, on_hits),
                _api(services, False) as (off_url, off_hits),
            ):
                progress(
                    f"{machine}; {args.rounds} rounds of {args.samples} samples a side, "
                    f"{args.wait} s of waiting each"
                )
                for index in range(args.rounds):  # alternating: the machine's load drifts
                    for polling, url, hits in ((True, on_url, on_hits), (False, off_url, off_hits)):
                        found = _round(url, hits, bench.key, bench.base.name, watch, serving, args)
                        sides[polling].append(found)
                        progress(f"round {index}, session polling {polling}: {found}")
        finally:
            watch.dispose()

    def median(polling: bool, field: str) -> float:
        return statistics.median(r[field] for r in sides[polling])

    emit_beside(
        "sample_session_polls",
        median(True, "seconds") * 1000,
        "the same samples, each polled on its own (retrieve_future), in this process's rounds",
        median(False, "seconds") * 1000,
        machine,
        base=bench.label,
        samples=args.samples,
        max_tokens=args.max_tokens,
        wait_s=args.wait,
        drain_s=round(median(True, "drained"), 3),
        baseline_drain_s=round(median(False, "drained"), 3),
        ask_s=round(median(True, "asked"), 3),
        baseline_ask_s=round(median(False, "asked"), 3),
        polls_while_waiting=median(True, "polls"),
        baseline_polls_while_waiting=median(False, "polls"),
        transactions_while_waiting=median(True, "transactions"),
        baseline_transactions_while_waiting=median(False, "transactions"),
        statistic="median over rounds: p50_ms the ms from the client's first ask to its last "
        "answer; ask_s from the client process's start to every sample asked; drain_s from the "
        "executor's resuming to the last answer; while the samples waited (--wait s, the "
        "executor paused, every sample asked), the API's poll requests and the database's "
        "transactions (all of them)",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
