#!/usr/bin/env python3
"""Screenshots of the dashboard for the README: the jobs page, a job page with its loss chart,
and an adapter page, saved as docs/dashboard-{jobs,job,adapter}.png.

Everything on them is real: a scratch database on the PostgreSQL at LORAFORGE_TEST_DATABASE_URL
(default: the machine's, postgresql://postgres@127.0.0.1:5432/postgres), the API and dashboard
on a local socket, datasets uploaded and jobs submitted over the REST API, a real trainer
training them on the repository's tiny test base, then headless Chromium (/usr/bin/chromium).

    .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
from playwright.sync_api import sync_playwright
from sqlalchemy.engine import make_url

from control_plane import base_catalog, db, tenants
from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from control_plane.storage import LocalObjectStore
from control_plane.validation import run_validation
from workers.runner import JobRunner

REPO = Path(__file__).resolve().parent.parent
TINY_BASE = REPO / "tests/fixtures/testbase/model"
DOCS = REPO / "docs"
CHROMIUM = os.environ.get("LORAFORGE_CHROMIUM", "/usr/bin/chromium")
ADMIN_URL = os.environ.get(
    "LORAFORGE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def chats(count: int) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        }
        for a in range(8)
        for b in range(8)
    ][:count]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def seed(services: Services, url: str, key: str) -> dict[str, str]:
    """Jobs in several states over the REST API; a trainer trains the first two."""
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def upload(name: str, data: bytes) -> str:
        files = {"file": (name, data, "application/jsonl")}
        found = api.post("/v1/files", files=files, data={"purpose": "fine-tune"})
        found.raise_for_status()
        return str(found.json()["id"])

    def submit(**body: Any) -> str:
        made = api.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", **body})
        made.raise_for_status()
        return str(made.json()["id"])

    sums = upload("sums.jsonl", chats(64))
    fast = {"batch_size": 2, "max_seq_length": 64, "learning_rate_multiplier": 5}
    first = submit(
        training_file=sums,
        adapter_name="sums",
        hyperparameters={**fast, "n_epochs": 6, "eval_fraction": 0.2, "eval_every_steps": 20},
    )
    runner = JobRunner(services, "trainer-0", work_dir=Path(tempfile.mkdtemp()) / "trainer")
    stop = threading.Event()
    thread = threading.Thread(
        target=lambda: runner.run_forever(stop, idle_wait=0.2), name="trainer", daemon=True
    )
    thread.start()
    try:
        wait_for(api, first, "succeeded")
        second = submit(
            training_file=sums,
            adapter_name="sums",
            continue_from="sums@1",
            hyperparameters={**fast, "n_epochs": 2},
        )
        wait_for(api, second, "succeeded")
    finally:
        stop.set()
        thread.join(60)
    api.put("/v1/adapters/sums/aliases/prod", json={"version": 1}).raise_for_status()
    api.put("/v1/adapters/sums/aliases/staging", json={"version": 2}).raise_for_status()
    api.put("/v1/adapters/sums/aliases/prod", json={"version": 2}).raise_for_status()
    queued = submit(training_file=sums, adapter_name="support-bot", hyperparameters=fast)
    submit(training_file=sums, adapter_name="summaries", hyperparameters=fast)
    api.post(f"/v1/fine_tuning/jobs/{queued}/cancel").raise_for_status()
    return {"job": first}


def wait_for(api: httpx.Client, job_id: str, status: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if found["status"] == status:
            return
        if found["status"] in ("failed", "cancelled"):
            raise SystemExit(f"job {job_id} ended {found['status']}: {found.get('error')}")
        time.sleep(0.5)
    raise SystemExit(f"job {job_id} did not reach {status}")


def shoot(url: str, key: str, job_id: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"{url}/sign-in")
        page.fill("#api_key", key)
        page.click("button[type=submit]")
        page.wait_for_url(f"{url}/jobs")
        page.screenshot(path=str(DOCS / "dashboard-jobs.png"), full_page=True)
        page.goto(f"{url}/jobs/{job_id}")
        page.wait_for_selector("#loss-chart[data-ready=true]")
        page.screenshot(path=str(DOCS / "dashboard-job.png"), full_page=True)
        page.goto(f"{url}/adapters/sums")
        page.screenshot(path=str(DOCS / "dashboard-adapter.png"), full_page=True)
        browser.close()


def main() -> int:
    name = f"lf_screens_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
    database_url = db.normalize_url(
        make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    )
    try:
        db.upgrade(database_url)
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(home=Path(tmp) / "home", lease_seconds=30)
            services = build_services(
                settings, database_url=database_url, store=LocalObjectStore(Path(tmp) / "objects")
            )
            services.dispatch_validation = lambda job_id: run_validation(services, job_id)
            with services.engine.begin() as conn:
                tenant = tenants.create_tenant(conn, "acme")
                _, key = tenants.create_api_key(conn, settings.secret_key, tenant.id, role="admin")
                base_catalog.register_base_model(
                    conn,
                    base_catalog.NewBaseModel(
                        name="tiny-llama", source=str(TINY_BASE), source_kind="dir"
                    ),
                )
            with serve_in_thread(create_app(services)) as url:
                seeded = seed(services, url, key)
                shoot(url, key, seeded["job"])
            services.close()
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
    for shot in ("jobs", "job", "adapter"):
        print(f"wrote docs/dashboard-{shot}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
