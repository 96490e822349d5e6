"""`loraforge demo`: the whole platform on the embedded default, end to end, on a real model.

Brings up the embedded platform (PostgreSQL through pgserver, the API, celery, a Ray trainer),
makes SmolLM2-135M-Instruct available, uploads the shipped dataset (a skill the base lacks and a
program can check), trains, shows progress with the loss, pulls the published version, and
prints held-out answers of the base and of the adapter side by side with a score for each.
"""

from __future__ import annotations

import json
import time
from typing import Any

from control_plane import registry
from control_plane.api.app import create_app
from control_plane.api.serve import serve_in_thread
from control_plane.job_status import TERMINAL, JobStatus
from control_plane.settings import Settings
from loraforge.client import Client
from loraforge.embedded import embedded_platform
from workers.bases.smollm2 import MODEL_NAME

ADAPTER_NAME = "demo-json-extract"


def _follow(client: Client, job_id: str) -> dict[str, Any]:
    """A progress bar over the job's optimizer steps, with the loss; returns the final job."""
    from tqdm import tqdm

    bar = tqdm(total=1, unit="step", desc="training", dynamic_ncols=True)
    after: str | None = None
    try:
        while True:
            page = client.list_events(job_id, after=after, order="asc")
            for event in page["data"]:
                after = event["id"]
                data = event.get("data") or {}
                if event["type"] == "metrics" and "step" in data:
                    bar.total = max(int(data.get("total_steps") or bar.total), 1)
                    bar.n = int(data["step"])
                    loss = data.get("train_loss")
                    if loss is not None:
                        bar.set_postfix(loss=f"{loss:.3f}")
                    bar.refresh()
                elif event["type"] != "metrics":
                    bar.write(f"  {event['message']}")
            job = client.retrieve_job(job_id)
            if job["status"] in TERMINAL and not page["has_more"]:
                return dict(job)
            time.sleep(1.0)
    finally:
        bar.close()


def run_demo(settings: Settings) -> int:
    from loraforge.demo.evaluation import evaluate, format_rows, summary
    from loraforge.demo.skill import DEMO_HYPERPARAMETERS, demo_data_dir, load_heldout
    from workers.bases.registration import ensure_default_base
    from workers.bases.smollm2 import ensure_smollm2

    # The platform stops (every child, and PostgreSQL) before the scoring, which needs no server.
    with embedded_platform(settings, default_base=False) as platform:
        services = platform.services
        ensure_default_base(services, progress=True)
        base_dir = ensure_smollm2(settings.home / "bases", progress=False)  # cached by now
        with (
            serve_in_thread(create_app(services)) as base_url,
            Client(base_url, platform.admin_key, timeout=120) as client,
        ):
            print(f"loraforge is up at {base_url} (admin key in {settings.home / 'admin-key'})")
            uploaded = client.upload_file(demo_data_dir() / "train.jsonl")
            print(
                f"uploaded {uploaded['id']}: {uploaded['examples']} examples, {uploaded['tokens']} tokens"
            )
            started = time.monotonic()
            job = client.create_job(
                model=MODEL_NAME,
                training_file=uploaded["id"],
                adapter_name=ADAPTER_NAME,
                hyperparameters=DEMO_HYPERPARAMETERS.model_dump(mode="json"),
            )
            print(f"job {job['id']} submitted")
            final = _follow(client, job["id"])
            if final["status"] != JobStatus.SUCCEEDED:
                print(f"job {final['status']}: {json.dumps(final.get('error'))}")
                return 1
            print(f"trained in {time.monotonic() - started:.0f}s")
            version = client.get_version(ADAPTER_NAME, "latest")
            with services.engine.connect() as conn:
                record = registry.get_version_by_id(conn, version["id"])
            assert record is not None
            where = services.store.location(record.object_prefix)
            print(f"adapter version {final['fine_tuned_model']} is stored at {where}")
            target = client.pull(
                f"{ADAPTER_NAME}@{version['version']}", settings.home / "pulled" / ADAPTER_NAME
            )
            print(f"pulled to {target}")
    heldout = load_heldout()
    print(f"scoring {len(heldout)} held-out prompts (none is in the training set)...")
    base_score, adapter_score, rows = evaluate(base_dir, target, heldout)
    print(format_rows(rows))
    print(summary(base_score, adapter_score, len(heldout)))
    return 0
