"""What an interactive (Tinker-compatible) session's futures cost beside the engine's own work.

    python -m benchmarks.interactive [--steps 20] [--rounds 3] [--database-url URL]

One tenant, one model of rank 8 on the tiny test base (fp32, CPU), one executor
(`workers.interactive.runner`) serving in a thread of this process, woken by NOTIFY as the API
wakes it. A training step is a forward_backward of one 64-token datum and an optim_step. One
JSON line each, beside the same steps run on the engine directly in the same process:

- `interactive_step_sequential`: p50 of a step asked one call at a time, each call's answer
  awaited (a row written, the executor woken, the call taken, run, answered, and the answer
  read by a 2 ms poll) — what a client that waits on every future sees;
- `interactive_step_pipelined`: a step's mean time with all steps asked at once and the last
  answer awaited — what the SDK's asynchronous calls see (it sends before it waits).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from benchmarks.queue import (
    add_database_url_argument,
    admin_server,
    bench_database,
    emit_beside,
    machine_description,
    make_tenant,
    progress,
)
from control_plane import base_catalog, tenants, trainers
from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.interactive_calls import CHANNEL
from control_plane.records import BaseModelRecord
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore
from tests.factories import ask_call, interactive_model, interactive_session, register_test_base
from workers.interactive.engine import InteractiveEngine
from workers.interactive.runner import InteractiveRunner
from workers.training.device import RequestedPrecision

TOKENS = [5 + (i * 37) % 700 for i in range(65)]
DATUM = {
    "model_input": {"chunks": [{"type": "encoded_text", "tokens": TOKENS[:-1]}]},
    "loss_fn_inputs": {
        "target_tokens": {"data": TOKENS[1:], "dtype": "int64", "shape": [64]},
        "weights": {"data": [1.0] * 64, "dtype": "float32", "shape": [64]},
    },
}
FB = {"forward_backward_input": {"loss_fn": "cross_entropy", "data": [DATUM]}}
STEP = {"adam_params": {"learning_rate": 1e-3}}


@contextmanager
def interactive_services(
    database_url: str | None, *, lease_seconds: float
) -> Iterator[tuple[Services, Path]]:
    """The platform's services on a throwaway database and a local object store, and a scratch
    directory for an executor's files."""
    with (
        admin_server(database_url) as admin_url,
        bench_database(admin_url) as db_url,
        tempfile.TemporaryDirectory() as scratch,
    ):
        settings = Settings(home=Path(scratch) / "home", lease_seconds=lease_seconds)
        services = build_services(
            settings, database_url=db_url, store=LocalObjectStore(Path(scratch) / "objects")
        )
        try:
            yield services, Path(scratch)
        finally:
            services.close()


def bench_base(services: Services, base_dir: Path | None) -> tuple[BaseModelRecord, str]:
    """The tiny test base, or the Hugging Face directory `base_dir` (e.g. the demo's imported
    SmolLM2-135M-Instruct), registered: it and its label."""
    if base_dir is None:
        return register_test_base(services.engine), "tiny test base"
    with services.engine.begin() as conn:
        base = base_catalog.register_base_model(
            conn,
            base_catalog.NewBaseModel(name="bench-base", source=str(base_dir), source_kind="dir"),
        )
    return base, base_dir.name


@dataclass(frozen=True)
class SdkBench:
    """What a benchmark of the SDK against the API needs: the services (the API's), a scratch
    directory, the machine's description, the base and its label, a member key of a tenant,
    and an executor on the base with connections of its own (as in its own process)."""

    services: Services
    machine: str
    base: BaseModelRecord
    label: str
    key: str
    runner: InteractiveRunner


@contextmanager
def sdk_bench(database_url: str | None, base_dir: Path | None) -> Iterator[SdkBench]:
    """An `SdkBench` on a throwaway database, the executor's connections closed after."""
    with interactive_services(database_url, lease_seconds=30) as (services, scratch):
        machine = machine_description(services.engine)
        base, label = bench_base(services, base_dir)
        tenant = make_tenant(services.engine, "bench")
        with services.engine.begin() as conn:
            _, key = tenants.create_api_key(
                conn, services.settings.secret_key, tenant, role="member"
            )
        own = build_services(
            services.settings, database_url=services.database_url, store=services.store
        )
        try:
            runner = bench_runner(own, base.id, scratch, "auto")
            yield SdkBench(services, machine, base, label, key, runner)
        finally:
            own.close()


@contextmanager
def served_with(services: Services, **settings: Any) -> Iterator[str]:
    """The API over `services` with `settings` changed, on a socket of its own: its URL."""
    changed = dataclasses.replace(services, settings=services.settings.model_copy(update=settings))
    with serve_in_thread(create_app(changed)) as url:
        yield url


def in_own_process(target: Callable[..., None], *args: Any) -> Any:
    """What `target(*args, done)` puts on `done`, run in a process of its own (spawned), as a
    user's script runs the SDK: no interpreter lock shared with the API or the executor."""
    context = multiprocessing.get_context("spawn")
    done: Any = context.Queue()
    process = context.Process(target=target, args=(*args, done))
    process.start()
    found = done.get(timeout=900)
    process.join(60)
    return found


def bench_runner(
    services: Services, base_id: str, scratch: Path, precision: RequestedPrecision
) -> InteractiveRunner:
    """An executor on the base, reported alive (its models are not taken for a lost one's)."""
    runner = InteractiveRunner(
        services, "bench-exec", base_id, work_dir=scratch / "exec", precision=precision
    )
    with services.engine.begin() as conn:
        trainers.report(conn, runner.snapshot())
    return runner


def batched_beside_alone(
    name: str,
    drain: Callable[[str, int], float],
    *,
    batch: int,
    rounds: int,
    tokens: int,
    machine: str,
    **fields: Any,
) -> None:
    """`drain(round_name, batch)` (the seconds an executor taking `batch` calls at a time takes
    to drain a round's calls) with `batch` beside 1 (the calls one at a time), in alternating
    rounds after a warm one; one JSON line, with the tokens a second on both sides."""
    drain("warm", batch)
    together: list[float] = []
    alone: list[float] = []
    for index in range(rounds):  # alternating: the machine's load drifts
        together.append(drain(f"b-{index}", batch))
        alone.append(drain(f"s-{index}", 1))
        progress(f"round {index}: {together[-1]:.2f} s batched, {alone[-1]:.2f} s alone")
    batched_s, serial_s = statistics.median(together), statistics.median(alone)
    emit_beside(
        name,
        batched_s * 1000,
        "the same calls taken one at a time (batch 1), in this process",
        serial_s * 1000,
        machine,
        batch=batch,
        **fields,
        tokens_per_second=round(tokens / batched_s, 1),
        baseline_tokens_per_second=round(tokens / serial_s, 1),
        statistic="median over rounds of the time to drain a round's calls",
    )


def _direct(engine: InteractiveEngine, steps: int) -> list[float]:
    engine.create("direct", rank=8, seed=0)
    values = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.forward_backward("direct", FB["forward_backward_input"])
        engine.optim_step("direct", STEP["adam_params"])
        values.append((time.perf_counter() - started) * 1000)
    engine.drop("direct")
    return values


def _ask(
    engine: Engine, ids: dict[str, str], model: str, kind: str, seq: int, body: dict[str, Any]
) -> str:
    call = ask_call(engine, model, ids["tenant"], ids["base"], kind, seq, body)
    with engine.begin() as conn:
        conn.execute(
            text("SELECT pg_notify(:channel, :base)"), {"channel": CHANNEL, "base": ids["base"]}
        )
    return call


def _await(engine: Engine, call_id: str) -> None:
    while True:
        with engine.connect() as conn:
            status = conn.execute(
                text("SELECT status FROM interactive_calls WHERE id = :id"), {"id": call_id}
            ).scalar_one()
        if status == "completed":
            return
        if status == "failed":
            raise RuntimeError(f"{call_id} failed")
        time.sleep(0.002)


def _sequential(
    engine: Engine, ids: dict[str, str], session: str, name: str, steps: int
) -> list[float]:
    """Each step's time, every call awaited before the next is asked."""
    model = interactive_model(engine, session, ids["tenant"], ids["base"], name, rank=8)
    _await(engine, _ask(engine, ids, model, "create_model", 0, {}))
    values = []
    for step in range(steps):
        started = time.perf_counter()
        _await(engine, _ask(engine, ids, model, "forward_backward", 2 * step + 1, FB))
        _await(engine, _ask(engine, ids, model, "optim_step", 2 * step + 2, STEP))
        values.append((time.perf_counter() - started) * 1000)
    _await(engine, _ask(engine, ids, model, "unload_model", 2 * steps + 1, {}))
    return values


def _pipelined(engine: Engine, ids: dict[str, str], session: str, name: str, steps: int) -> float:
    """A step's mean time, all of them asked at once and the last one awaited."""
    model = interactive_model(engine, session, ids["tenant"], ids["base"], name, rank=8)
    _await(engine, _ask(engine, ids, model, "create_model", 0, {}))
    started = time.perf_counter()
    last = ""
    for step in range(steps):
        _ask(engine, ids, model, "forward_backward", 2 * step + 1, FB)
        last = _ask(engine, ids, model, "optim_step", 2 * step + 2, STEP)
    _await(engine, last)
    mean = (time.perf_counter() - started) * 1000 / steps
    _await(engine, _ask(engine, ids, model, "unload_model", 2 * steps + 1, {}))
    return mean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.interactive", description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="steps a round and side")
    parser.add_argument("--rounds", type=int, default=3)
    add_database_url_argument(parser)
    args = parser.parse_args(argv)
    with interactive_services(args.database_url, lease_seconds=30) as (services, scratch):
        machine = machine_description(services.engine)
        tenant = make_tenant(services.engine, "bench")
        base = register_test_base(services.engine)
        ids = {"tenant": tenant, "base": base.id}
        session = interactive_session(services.engine, tenant, "sess-bench")
        runner = InteractiveRunner(
            services, "bench-exec", base.id, work_dir=scratch / "exec", precision="fp32"
        )
        progress(f"{machine}; {args.rounds} rounds of {args.steps} steps a side")
        # The direct side's model is on the executor's own engine: held by it in the database,
        # so that the executor's idle pass (which drops what it does not hold) leaves it be.
        interactive_model(services.engine, session, tenant, base.id, "direct", rank=8)
        with services.engine.begin() as conn:
            conn.execute(text("UPDATE interactive_models SET held_by = 'bench-exec'"))
        _direct(runner.engine, 5)  # warm
        stop = threading.Event()
        serving = threading.Thread(target=runner.serve, args=(stop,), kwargs={"idle_wait": 1.0})
        serving.start()
        direct: list[float] = []
        sequential: list[float] = []
        pipelined: list[float] = []
        try:
            # Alternating rounds: the machine's load drifts, and each side must see the same.
            for index in range(args.rounds):
                direct += _direct(runner.engine, args.steps)
                sequential += _sequential(services.engine, ids, session, f"seq-{index}", args.steps)
                pipelined.append(
                    _pipelined(services.engine, ids, session, f"pipe-{index}", args.steps)
                )
            emit_beside(
                "interactive_step_sequential",
                statistics.median(sequential),
                "the same step on the engine directly, in this process",
                statistics.median(direct),
                machine,
                steps=args.steps * args.rounds,
                base="tiny test base, fp32, rank 8, one 64-token datum",
            )
            emit_beside(
                "interactive_step_pipelined",
                statistics.median(pipelined),
                "the same step on the engine directly, in this process (p50)",
                statistics.median(direct),
                machine,
                steps=args.steps * args.rounds,
                statistic="median over rounds of a round's mean step, all its steps asked at once",
            )
        finally:
            stop.set()
            serving.join(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
