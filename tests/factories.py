"""Rows for tests, written through the same repositories the product uses."""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, insert, text

from control_plane import base_catalog, jobs, queue_stats, tenants
from control_plane import files as file_repo
from control_plane.datasets import validate_jsonl
from control_plane.db.tables import Job
from control_plane.events import metric_events_in_bulk
from control_plane.hyperparameters import Hyperparameters
from control_plane.ids import new_id
from control_plane.records import BaseModelRecord, FileRecord, TenantRecord
from control_plane.services import Services
from control_plane.storage import file_key

SECRET = "dev-insecure-secret"


# Sixteen chat examples a tiny base learns in seconds ("What is 2 plus 3?" → "2 plus 3 is 5.").
ADDITION_CHATS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
    }
    for a in range(4)
    for b in range(4)
]


def make_tenant(engine: Engine, name: str, *, max_running_jobs: int | None = None) -> TenantRecord:
    with engine.begin() as conn:
        return tenants.create_tenant(conn, name, max_running_jobs=max_running_jobs)


def make_key(engine: Engine, tenant_id: str, role: str = "admin") -> str:
    with engine.begin() as conn:
        _, plaintext = tenants.create_api_key(conn, SECRET, tenant_id, role=role)
    return plaintext


def make_base(engine: Engine, name: str = "tiny-llama") -> BaseModelRecord:
    with engine.begin() as conn:
        return base_catalog.register_base_model(
            conn, base_catalog.NewBaseModel(name=name, source=f"dir:///{name}", source_kind="dir")
        )


def register_test_base(engine: Engine, name: str = "tiny-llama") -> BaseModelRecord:
    """The tiny test base registered by its directory: a base a trainer or an executor loads."""
    from tests.fixtures.testbase import TEST_BASE_PATH

    with engine.begin() as conn:
        return base_catalog.register_base_model(
            conn,
            base_catalog.NewBaseModel(name=name, source=str(TEST_BASE_PATH), source_kind="dir"),
        )


def make_file(engine: Engine, tenant_id: str) -> FileRecord:
    file_id = new_id("file")
    with engine.begin() as conn:
        return file_repo.insert_file(
            conn,
            file_id=file_id,
            tenant_id=tenant_id,
            filename="train.jsonl",
            purpose="fine-tune",
            size=10,
            sha256=hashlib.sha256(file_id.encode()).hexdigest(),
            object_key=f"tenants/{tenant_id}/files/{file_id}",
            format="text",
            examples=1,
            tokens=3,
        )


def enqueue_jobs(
    engine: Engine,
    tenant_id: str,
    base_id: str,
    file_id: str,
    count: int,
    *,
    priority: int = 0,
    max_attempts: int = 3,
) -> list[str]:
    """Insert `count` jobs straight into `queued` (the state validation leaves them in)."""
    hp = Hyperparameters().model_dump(mode="json")
    rows: list[dict[str, Any]] = [
        {
            "id": new_id("job"),
            "tenant_id": tenant_id,
            "status": "queued",
            "base_model_id": base_id,
            "training_file_id": file_id,
            "hyperparameters": hp,
            "priority": priority,
            "max_attempts": max_attempts,
        }
        for _ in range(count)
    ]
    with engine.begin() as conn:
        for start in range(0, len(rows), 500):
            conn.execute(insert(Job), rows[start : start + 500])
    return [r["id"] for r in rows]


def insert_queued_jobs(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Queued jobs straight into the table, one multi-row statement (as a bulk import would):
    each row's id, tenant_id, base_model_id, priority, created_at and run_after, and the
    training file `file` (the first row's, for all)."""
    conn.execute(
        text(
            "INSERT INTO jobs (id, tenant_id, status, base_model_id, training_file_id, "
            "hyperparameters, priority, created_at, run_after) "
            "SELECT id, tenant_id, 'queued', base_model_id, :file, '{}'::jsonb, priority, "
            "created_at, run_after FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r("
            "id text, tenant_id text, base_model_id text, priority int, created_at timestamptz, "
            "run_after timestamptz)"
        ),
        {
            "file": rows[0]["file"],
            "rows": json.dumps(
                [
                    {k: v.isoformat() if isinstance(v, datetime) else v for k, v in r.items()}
                    for r in rows
                ]
            ),
        },
    )


def create_validating_job(engine: Engine, tenant_id: str, base_id: str, file_id: str) -> str:
    with engine.begin() as conn:
        job, _ = jobs.create_job(
            conn,
            jobs.NewJob(
                tenant_id=tenant_id,
                base_model_id=base_id,
                training_file_id=file_id,
                validation_file_id=None,
                hyperparameters=Hyperparameters().model_dump(mode="json"),
            ),
        )
    return job.id


def upload_records(services: Services, tenant_id: str, records: list[dict[str, Any]]) -> str:
    """A validated JSONL file in the services' store and its row, as an upload leaves them."""
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    stats = validate_jsonl(io.BytesIO(data), max_bytes=10**7, max_example_tokens=10**5)
    return store_file(
        services, tenant_id, data, format=stats.format, examples=stats.examples, tokens=stats.tokens
    )


def store_file(
    services: Services,
    tenant_id: str,
    data: bytes,
    *,
    format: str | None,
    examples: int | None,
    tokens: int | None,
    filename: str = "train.jsonl",
) -> str:
    """`data` in the services' store and a file row for it with the given counts (the dataset
    checks are the caller's; None: a row from before they were recorded)."""
    file_id = new_id("file")
    key = file_key(tenant_id, file_id)
    info = services.store.put_bytes(key, data)
    with services.engine.begin() as conn:
        file_repo.insert_file(
            conn,
            file_id=file_id,
            tenant_id=tenant_id,
            filename=filename,
            purpose="fine-tune",
            size=info.size,
            sha256=info.sha256,
            object_key=key,
            format=format,
            examples=examples,
            tokens=tokens,
        )
    return file_id


def log_metric_steps(
    engine: Engine,
    steps_by_job: dict[str, int],
    data: str = "jsonb_build_object('step', g, 'train_loss', 1.0 / g)",
) -> None:
    """Steps 1..n of metric events for each job, step g's data the SQL expression `data` of g,
    in one transaction (each job's loss-chart sums summed once, `metric_events_in_bulk`)."""
    with engine.begin() as conn, metric_events_in_bulk(conn, list(steps_by_job)):
        for job_id, steps in steps_by_job.items():
            conn.execute(
                text(
                    "INSERT INTO job_events (job_id, type, message, data) "
                    f"SELECT :job, 'metrics', 'step ' || g, {data} "
                    "FROM generate_series(1, :steps) AS g"
                ),
                {"job": job_id, "steps": steps},
            )


def assert_no_drift(engine: Engine) -> None:
    """The queue's bookkeeping (per-tenant counts, lines) agrees with the jobs table."""
    with engine.connect() as conn:
        assert queue_stats.drift(conn) == []


def tag_jobs(engine: Engine, metadata: dict[str, str], *job_ids: str) -> None:
    """Give the jobs this metadata (a sweep's tag), as a create with `metadata` would."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET user_metadata = CAST(:m AS jsonb) WHERE id = ANY(:ids)"),
            {"m": json.dumps(metadata), "ids": list(job_ids)},
        )


# The random sweeps' metadata (None: none) and the selectors they are moved by: whole, partial
# and no matches, and a selector whose pairs only some of a sweep's jobs hold.
SWEEP_METADATA: list[dict[str, str] | None] = [
    {"s": "a"},
    {"s": "a", "k": "1"},
    {"s": "b"},
    {"k": "1"},
    None,
]
SWEEP_SELECTORS = [{"s": "a"}, {"s": "a", "k": "1"}, {"k": "1"}]

# A job's state by a short name, as the columns that make it (the random-jobs tests).
STATE_SQL = {
    "validating": "status = 'validating_files'",
    "queued": "status = 'queued'",
    "paused": "status = 'paused'",
    "running": "status = 'running', lease_owner = 'w', lease_expires_at = now() + interval '1 h'",
    "pausing": "status = 'running', lease_owner = 'w', lease_expires_at = now() + interval '1 h', "
    "pause_requested = true",
    "cancelling": "status = 'cancelling', lease_owner = 'w', "
    "lease_expires_at = now() + interval '1 h', cancel_requested = true",
    "succeeded": "status = 'succeeded', finished_at = now()",
}


def jobs_in_states(
    engine: Engine, jobs: list[tuple[str, dict[str, str] | None, int, bool, int]]
) -> tuple[str, list[str]]:
    """Jobs of a new tenant (`own`) or of another, each given as (state by its `STATE_SQL`
    name, metadata, created at `at` seconds after an epoch, own, priority); the tenant's id and
    the jobs' ids in that order."""
    tag = secrets.token_hex(4)
    mine, theirs = make_tenant(engine, f"m-{tag}"), make_tenant(engine, f"t-{tag}")
    base_id = make_base(engine, f"b-{tag}").id
    file_id = make_file(engine, mine.id).id
    epoch = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        {
            "id": f"ftjob-{tag}-{n:02d}",
            "tenant_id": mine.id if own else theirs.id,
            "base_model_id": base_id,
            "priority": priority,
            "created_at": epoch + timedelta(seconds=at),
            "run_after": epoch,
            "file": file_id,
        }
        for n, (_, _, at, own, priority) in enumerate(jobs)
    ]
    with engine.begin() as conn:
        insert_queued_jobs(conn, rows)
        for row, (state, metadata, _, _, _) in zip(rows, jobs, strict=True):
            conn.execute(
                text(
                    f"UPDATE jobs SET {STATE_SQL[state]}, user_metadata = CAST(:m AS jsonb) "
                    "WHERE id = :id"
                ),
                {"id": row["id"], "m": json.dumps(metadata)},
            )
    return mine.id, [r["id"] for r in rows]


# --------------------------------------------------------------------------- interactive sessions


def interactive_session(engine: Engine, tenant_id: str, session_id: str) -> str:
    """A session row, as the Tinker API's create_session writes it."""
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO interactive_sessions (id, tenant_id) VALUES (:id, :tenant)"),
            {"id": session_id, "tenant": tenant_id},
        )
    return session_id


def interactive_model(
    engine: Engine,
    session_id: str,
    tenant_id: str,
    base_id: str,
    model_id: str,
    *,
    kind: str = "training",
    rank: int = 4,
    model_path: str | None = None,
) -> str:
    """A model row of a session (a `sampler` of `model_path`, or the base alone)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO interactive_models (id, session_id, tenant_id, base_model_id, kind, "
                "lora_config, model_path) "
                "VALUES (:id, :session, :tenant, :base, :kind, :config, :path)"
            ),
            {
                "id": model_id,
                "session": session_id,
                "tenant": tenant_id,
                "base": base_id,
                "kind": kind,
                "config": json.dumps({"rank": rank, "seed": 0}),
                "path": model_path,
            },
        )
    return model_id


def ask_call(
    engine: Engine,
    model_id: str,
    tenant_id: str,
    base_id: str,
    kind: str,
    seq: int,
    request: dict[str, Any] | None = None,
) -> str:
    """A pending call (a future) on a model, as the Tinker API's enqueue writes it; its id is
    `fut-<model>-<seq>`."""
    call_id = f"fut-{model_id}-{seq}"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO interactive_calls "
                "(id, model_id, tenant_id, base_model_id, seq, kind, request) "
                "VALUES (:id, :model, :tenant, :base, :seq, :kind, :request)"
            ),
            {
                "id": call_id,
                "model": model_id,
                "tenant": tenant_id,
                "base": base_id,
                "seq": seq,
                "kind": kind,
                "request": json.dumps(request or {}),
            },
        )
    return call_id


def interactive_training_steps(engine: Engine, model_id: str, steps: int) -> None:
    """`steps` training steps of a model's calls after those it has, finished as its executor
    finishes them, in one statement. Step k: two forward_backwards (`loss:sum`), a forward (an
    evaluation) every tenth step else a sample, a forward_backward that failed (its metrics
    count for nothing) every hundredth step else a sample, and the optim_step that ends it
    (`grad_norm:mean`)."""
    with engine.begin() as conn:
        conn.execute(
            text(
                """
                WITH model AS MATERIALIZED (  -- its next seq, counted once, not per call
                    SELECT m.id, m.tenant_id, m.base_model_id,
                           (SELECT coalesce(max(c.seq) + 1, 0) FROM interactive_calls c
                            WHERE c.model_id = m.id) AS first_seq
                    FROM interactive_models m WHERE m.id = :model
                ),
                slots AS (
                    SELECT g / 5 AS k, g % 5 AS slot, g FROM generate_series(0, 5 * :steps - 1) g
                ),
                calls AS (
                    SELECT s.g, CASE
                        WHEN s.slot IN (0, 1) THEN 'forward_backward'
                        WHEN s.slot = 2 AND s.k % 10 = 0 THEN 'forward'
                        WHEN s.slot = 3 AND s.k % 100 = 0 THEN 'forward_backward'
                        WHEN s.slot = 4 THEN 'optim_step'
                        ELSE 'sample' END AS kind,
                        CASE WHEN s.slot = 3 AND s.k % 100 = 0 THEN 'failed'
                             ELSE 'completed' END AS status,
                        CASE s.slot
                            WHEN 0 THEN jsonb_build_object(
                                'loss:sum', 3.0 / (1 + s.k / 500.0) + (s.k % 7) / 100.0)
                            WHEN 1 THEN jsonb_build_object('loss:sum', 0.5 / (1 + s.k / 900.0))
                            WHEN 2 THEN jsonb_build_object('loss:sum', 3.5 / (1 + s.k / 400.0))
                            WHEN 3 THEN jsonb_build_object('loss:sum', 1000)
                            ELSE jsonb_build_object('grad_norm:mean', 1.0 / (1 + s.k / 50.0))
                        END AS metrics
                    FROM slots s
                )
                INSERT INTO interactive_calls (id, model_id, tenant_id, base_model_id, seq, kind,
                                               status, finished_at, metrics)
                SELECT m.id || '-' || (m.first_seq + c.g), m.id, m.tenant_id, m.base_model_id,
                       m.first_seq + c.g, c.kind, c.status, now(),
                       CASE WHEN c.kind = 'sample' THEN NULL ELSE c.metrics END
                FROM model m, calls c
                """
            ),
            {"model": model_id, "steps": steps},
        )
