"""Creating a sweep: one request for the grid (`POST /v1/fine_tuning/sweeps`) against one
request per job (`POST /v1/fine_tuning/jobs`), through the real app.

    python -m benchmarks.sweep_create [--jobs 64] [--rounds 3]

The app runs under uvicorn on 127.0.0.1 against a scratch PostgreSQL database
(`LORAFORGE_BENCH_DATABASE_URL`, default 127.0.0.1:5432); an httpx client sends the requests,
as the SDK does. Both sides make the same `--jobs` jobs (a grid over `seed` and four ranks), checked the same
way (`job_requests.new_job`); rounds alternate the sides. One JSON line per round: the median
over its repeats of the wall milliseconds to have every job created, each side, and their
ratio; the machine's CPU named in each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.compare import cpu
from benchmarks.registry import scratch_database
from control_plane import tenants
from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.services import build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore
from tests.factories import make_base, make_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=64, help="points (4 ranks x jobs/4 seeds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="sweeps a side makes a round")
    args = parser.parse_args()
    with scratch_database() as database_url, tempfile.TemporaryDirectory() as tmp:
        settings = Settings(home=Path(tmp) / "home")
        services = build_services(
            settings, database_url=database_url, store=LocalObjectStore(Path(tmp) / "objects")
        )
        with services.engine.begin() as conn:
            tenant = tenants.create_tenant(conn, "bench")
            _, key = tenants.create_api_key(conn, settings.secret_key, tenant.id, role="admin")
        job = {
            "model": make_base(services.engine, "bench-base").name,
            "training_file": make_file(services.engine, tenant.id).id,
            "hyperparameters": {"n_epochs": 2},
        }
        ranks = [4, 8, 16, 32]
        seeds = list(range(args.jobs // len(ranks)))
        headers = {"Authorization": f"Bearer {key}"}
        with (
            serve_in_thread(create_app(services)) as url,
            httpx.Client(base_url=url, headers=headers, timeout=60) as client,
        ):

            def one_request(n: int) -> None:
                body = {
                    "name": f"grid-{n}",
                    "job": job,
                    "grid": {"seed": seeds, "lora_rank": ranks},
                }
                client.post("/v1/fine_tuning/sweeps", json=body).raise_for_status()

            def one_per_job(n: int) -> None:
                for seed in seeds:
                    for rank in ranks:
                        hp = {**job["hyperparameters"], "lora_rank": rank}
                        body = {
                            **job,
                            "hyperparameters": hp,
                            "seed": seed,
                            "metadata": {"sweep": f"loop-{n}"},
                        }
                        client.post("/v1/fine_tuning/jobs", json=body).raise_for_status()

            made = 0
            for round_ in range(args.rounds + 1):  # the first round warms both sides
                figures = {}
                for side, make in (("sweep", one_request), ("one_per_job", one_per_job)):
                    samples = []
                    for _ in range(args.repeat):
                        started = time.perf_counter()
                        make(made)
                        samples.append((time.perf_counter() - started) * 1000)
                        made += 1
                    figures[side] = round(statistics.median(samples), 1)
                if round_ == 0:
                    continue
                print(
                    json.dumps(
                        {
                            "benchmark": "sweep_create",
                            "round": round_,
                            "cpu": cpu(),
                            "jobs": args.jobs,
                            "ms": figures["sweep"],
                            "baseline": "one POST /v1/fine_tuning/jobs per job",
                            "baseline_ms": figures["one_per_job"],
                            "ratio": round(figures["sweep"] / figures["one_per_job"], 3),
                        }
                    ),
                    flush=True,
                )
        services.close()


if __name__ == "__main__":
    main()
