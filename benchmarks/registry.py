"""Registry benchmarks: alias resolution through the API, and pull throughput against S3.

    python -m benchmarks.registry [--requests 2000] [--clients 4] [--size-mb 50]

- Alias resolution: `GET /v1/adapters/<name>/versions/prod` through the real app (uvicorn on
  127.0.0.1, port 0) with httpx, from one and from several client threads: requests/s and
  latency percentiles, against the same version fetched by number (the baseline; `ratio` is
  alias requests/s over by-number requests/s).
- Pull: `Client.pull` of a version with a `--size-mb` safetensors file from a moto S3
  server (presigned URL, sha256 verified, fsynced, swapped in), against a plain GET of the same
  object from the same server written to disk: MB/s of each, and their ratio.
- `adapters_page`: a page of 20 of a tenant's `--adapters` adapters (10 versions each), by
  name after the middle one, as `GET /v1/adapters` reads it, against the statement it ran
  before (every version of the tenant's registry grouped, then the page cut): median ms.
- `serving_index_unchanged`: a serving cluster's poll of the index of those adapters when
  nothing changed (the ETag from one serving generation: a 304) against building the whole
  index, as every poll did, and against the ETag before revision 0014 (a digest of every chosen
  version's name, number and id): median ms.

Needs PostgreSQL: `LORAFORGE_BENCH_DATABASE_URL` (a maintenance database; default the local
server at 127.0.0.1:5432), on which it creates and drops a database of its own. Prints one
JSON line per measurement.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import secrets
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from control_plane import base_catalog, db, files, jobs, registry, tenants
from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.registry import reads
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import S3ObjectStore, make_s3_client
from loraforge.client import Client

MB = 1024 * 1024
TIMEOUT = 120.0
ADAPTER = "bench-adapter"


def emit(measurement: str, **figures: Any) -> None:
    print(json.dumps({"benchmark": "registry", "measurement": measurement, **figures}), flush=True)


@contextmanager
def scratch_database() -> Iterator[str]:
    admin = os.environ.get(
        "LORAFORGE_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    admin = db.libpq_url(admin)
    name = f"lf_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    try:
        url = make_url(admin).set(database=name).render_as_string(hide_password=False)
        db.upgrade(url)
        yield db.normalize_url(url)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]


@contextmanager
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def write_adapter(directory: Path, size_mb: int) -> None:
    """A PEFT-shaped directory: a LoRA config and one bf16 safetensors file of `size_mb`."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 64, "lora_alpha": 128, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    elements = size_mb * MB // 2
    header = json.dumps(
        {
            "w.lora_A.weight": {
                "dtype": "BF16",
                "shape": [elements],
                "data_offsets": [0, elements * 2],
            }
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    with (directory / "adapter_model.safetensors").open("wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        for _ in range(size_mb):
            out.write(os.urandom(MB))


def publish_one(services: Services, adapter_dir: Path) -> tuple[str, registry.AdapterVersionRecord]:
    """A tenant, a key, a base, a claimed job, and its published version; returns the key."""
    settings = services.settings
    with services.engine.begin() as conn:
        tenant = tenants.create_tenant(conn, "bench")
        _, key = tenants.create_api_key(conn, settings.secret_key, tenant.id, role="admin")
        base = base_catalog.register_base_model(
            conn, base_catalog.NewBaseModel(name="bench-base", source="dir:///b", source_kind="dir")
        )
        file_id = "file-bench"
        files.insert_file(
            conn,
            file_id=file_id,
            tenant_id=tenant.id,
            filename="t.jsonl",
            purpose="fine-tune",
            size=1,
            sha256="0" * 64,
            object_key=f"tenants/{tenant.id}/files/{file_id}",
            format="text",
            examples=1,
            tokens=1,
        )
        job, _ = jobs.create_job(
            conn,
            jobs.NewJob(
                tenant_id=tenant.id,
                base_model_id=base.id,
                training_file_id=file_id,
                validation_file_id=None,
                hyperparameters={},
                adapter_name=ADAPTER,
            ),
        )
    services.queue.mark_queued(job.id)
    claimed = services.queue.claim("bench-worker")
    assert claimed is not None
    published = registry.publish_job_adapter(
        services,
        job=claimed,
        worker_id="bench-worker",
        adapter_dir=adapter_dir,
        lineage={"job_id": job.id},
        metrics={},
    )
    assert published is not None
    return key, published.version


def resolve_many(url: str, key: str, ref: str, requests: int, clients: int) -> dict[str, float]:
    """`requests` GETs of version `ref` from `clients` threads (after a warm-up)."""
    path = f"{url}/v1/adapters/{ADAPTER}/versions/{ref}"
    headers = {"Authorization": f"Bearer {key}"}
    per_client = requests // clients

    def run(_: int) -> list[float]:
        latencies = []
        with httpx.Client(headers=headers, timeout=TIMEOUT) as http:
            for _ in range(20):
                http.get(path).raise_for_status()
            for _ in range(per_client):
                start = time.perf_counter()
                http.get(path).raise_for_status()
                latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = sorted(x for batch in pool.map(run, range(clients)) for x in batch)
    elapsed = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


def bench_alias_resolution(url: str, key: str, version: int, requests: int, clients: int) -> None:
    """By alias, against the same version by number (no alias indirection) as the baseline."""
    by_number = resolve_many(url, key, str(version), requests, clients)
    by_alias = resolve_many(url, key, "prod", requests, clients)
    emit(
        "alias_resolution",
        clients=clients,
        **by_alias,
        baseline={"by_number": by_number},
        ratio=round(by_alias["requests_per_s"] / by_number["requests_per_s"], 3),
    )


def bench_pull(
    url: str, key: str, store: S3ObjectStore, version: registry.AdapterVersionRecord, work: Path
) -> None:
    weights = version.file("adapter_model.safetensors")
    assert weights is not None
    size = sum(f["size"] for f in version.files)
    object_url = store.presigned_url(version.object_prefix + weights["name"], 600)
    assert object_url is not None
    raw_times, pull_times = [], []
    with Client(url, key, timeout=TIMEOUT) as sdk, httpx.Client(timeout=TIMEOUT) as http:
        for attempt in range(3):
            target = work / f"raw-{attempt}"
            start = time.perf_counter()
            with http.stream("GET", object_url) as response, target.open("wb") as out:
                response.raise_for_status()
                for chunk in response.iter_bytes(MB):
                    out.write(chunk)
            raw_times.append(time.perf_counter() - start)
            target.unlink()

            target = work / f"pull-{attempt}"
            start = time.perf_counter()
            sdk.pull(f"{ADAPTER}@prod", target)
            pull_times.append(time.perf_counter() - start)
            shutil.rmtree(target)
    raw_mb_s = weights["size"] / MB / statistics.median(raw_times)
    pull_mb_s = size / MB / statistics.median(pull_times)
    emit(
        "pull_throughput",
        size_mb=round(size / MB, 1),
        pull_mb_s=round(pull_mb_s, 1),
        raw_get_mb_s=round(raw_mb_s, 1),
        ratio=round(pull_mb_s / raw_mb_s, 3),
        runs=len(pull_times),
    )


# How a page of adapters was read before each adapter's figures were read on their own: every
# version of the tenant's registry joined and grouped, then the page cut.
_ADAPTERS_PAGE_BY_GROUPING = text(
    "SELECT a.id, a.tenant_id, a.name, a.base_model_id, b.name AS base_model_name, "
    "a.created_at, max(v.number) AS latest_version, count(v.id) AS version_count "
    "FROM adapters a JOIN base_models b ON b.id = a.base_model_id "
    "JOIN adapter_versions v ON v.adapter_id = a.id "
    "WHERE a.tenant_id = :t AND a.name > :after GROUP BY a.id, b.name ORDER BY a.name LIMIT 21"
)


def bench_adapter_pages(services: Services, tenant_id: str, adapters: int, repeat: int) -> None:
    with services.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO adapters (id, tenant_id, name, base_model_id) "
                "SELECT 'bench-ad-' || g, :t, 'bench-' || lpad(g::text, 7, '0'), base_model_id "
                "FROM adapters, generate_series(1, :n) AS g WHERE name = :adapter"
            ),
            {"t": tenant_id, "n": adapters, "adapter": ADAPTER},
        )
        conn.execute(
            text(
                "INSERT INTO adapter_versions (id, adapter_id, number, files, lineage, metrics, "
                "object_prefix) SELECT a.id || '-' || n, a.id, n, '[]', '{}', '{}', 'x' "
                "FROM adapters a, generate_series(1, 10) AS n WHERE a.id LIKE 'bench-ad-%'"
            )
        )
    with services.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))
    middle = f"bench-{adapters // 2:07d}"
    times: dict[str, list[float]] = {"ours": [], "before": []}
    with services.engine.connect() as conn:
        for _ in range(repeat):
            started = time.perf_counter()
            registry.list_adapters(conn, tenant_id, after=middle, limit=20)
            times["ours"].append(time.perf_counter() - started)
            started = time.perf_counter()
            conn.execute(_ADAPTERS_PAGE_BY_GROUPING, {"t": tenant_id, "after": middle}).all()
            times["before"].append(time.perf_counter() - started)
    ours, before = (round(statistics.median(times[k]) * 1000, 3) for k in ("ours", "before"))
    emit(
        "adapters_page",
        adapters=adapters,
        versions=10 * adapters,
        page=20,
        ms=ours,
        baseline="every version of the tenant's registry grouped, then the page cut (before)",
        baseline_ms=before,
        ratio=round(ours / before, 4),
    )
    # A serving cluster's poll of the index (every adapter of the base, at `latest`) when
    # nothing changed: the ETag alone, against building the whole index as every poll did.
    with services.engine.connect() as conn:
        base = conn.execute(
            text(
                "SELECT b.name FROM base_models b JOIN adapters a ON a.base_model_id = b.id "
                "WHERE a.name = :adapter"
            ),
            {"adapter": ADAPTER},
        ).scalar_one()
        times: dict[str, list[float]] = {"ours": [], "digest": [], "before": []}
        for _ in range(max(repeat // 4, 3)):
            started = time.perf_counter()
            registry.serving_etag(conn, tenant_id, base, registry.LATEST)
            times["ours"].append(time.perf_counter() - started)
            started = time.perf_counter()
            _chosen_versions_digest(conn, tenant_id, base)
            times["digest"].append(time.perf_counter() - started)
            started = time.perf_counter()
            index = registry.serving_index(conn, tenant_id, base, registry.LATEST)
            times["before"].append(time.perf_counter() - started)
    ours, digest, before = (
        round(statistics.median(times[k]) * 1000, 3) for k in ("ours", "digest", "before")
    )
    emit(
        "serving_index_unchanged",
        adapters=len(index.versions),
        ms=ours,
        baseline="the whole index built, as every poll did before answering 304",
        baseline_ms=before,
        ratio=round(ours / before, 4),
        chosen_versions_digest_ms=digest,
        ratio_vs_chosen_versions_digest=round(ours / digest, 4),
    )


def _chosen_versions_digest(conn: Any, tenant_id: str, base_model: str) -> str:
    """The ETag before revision 0014: a digest of every chosen version's (adapter, number, id),
    read off the registry (one probe per adapter of the base)."""
    scope = reads._serving_scope(
        tenant_id, reads._serving_base(conn, base_model, registry.LATEST), registry.LATEST
    )
    rows = conn.execute(
        select(reads._adapters.c.name, reads._versions.c.number, reads._versions.c.id)
        .select_from(
            reads._versions.join(
                reads._adapters, reads._adapters.c.id == reads._versions.c.adapter_id
            )
        )
        .where(*scope)
        .order_by(reads._adapters.c.name)
    ).all()
    content = [base_model, registry.LATEST, [list(row) for row in rows]]
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--adapters", type=int, default=5000, help="adapters for adapters_page")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp,
        scratch_database() as database_url,
        moto_endpoint() as endpoint,
    ):
        work = Path(tmp)
        client = make_s3_client(
            endpoint_url=endpoint,
            region="us-east-1",
            access_key_id="bench",
            secret_access_key="bench",
        )
        store = S3ObjectStore(client, "bench", "loraforge")
        store.ensure_bucket()
        services = build_services(
            Settings(home=work / "home"), database_url=database_url, store=store
        )
        try:
            write_adapter(work / "adapter", args.size_mb)
            key, version = publish_one(services, work / "adapter")
            with serve_in_thread(create_app(services)) as url:
                httpx.put(
                    f"{url}/v1/adapters/{ADAPTER}/aliases/prod",
                    json={"version": version.number},
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=TIMEOUT,
                ).raise_for_status()
                bench_alias_resolution(url, key, version.number, args.requests, 1)
                bench_alias_resolution(url, key, version.number, args.requests, args.clients)
                bench_pull(url, key, store, version, work)
            bench_adapter_pages(services, version.tenant_id, args.adapters, repeat=20)
        finally:
            services.close()


if __name__ == "__main__":
    main()
