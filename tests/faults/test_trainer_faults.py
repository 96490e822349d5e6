"""Training goes on through platform faults, with no human action and no attempt used up."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.faults.harness import (
    RunningPlatform,
    event_messages,
    register_tiny_base,
    running_platform,
    submit,
    upload_dataset,
    wait_for,
    wait_for_status,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def _checkpointed(client, job_id: str) -> int | None:  # type: ignore[no-untyped-def]
    page = client.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")
    steps = [c["step_number"] for c in page["data"]]
    return max(steps) if steps else None


def test_a_killed_trainer_is_replaced_and_its_job_resumes_from_its_checkpoint(
    tmp_path: Path,
) -> None:
    with running_platform(tmp_path / "home") as platform, platform.client() as client:
        register_tiny_base(client)
        file_id = upload_dataset(client, tmp_path)
        job_id = submit(client, file_id, "killed")
        step = wait_for("a checkpoint", lambda: _checkpointed(client, job_id), 180)
        assert _trainers_alive(platform) == 1
        [actor] = platform.trainer_actors()
        os.kill(actor.pid, signal.SIGKILL)  # mid-job: no clean-up, no lease release

        job = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"}, 300)
        assert job["status"] == "succeeded", job
        assert job["attempt"] == 1, "a trainer's death is the platform's fault, not the job's"
        resumed = [m for m in event_messages(client, job_id) if m.startswith("resumed from step")]
        assert resumed and int(resumed[0].split()[3]) >= step > 0
        assert len(client.list_versions("killed")) == 1
        replacement = platform.trainer_actors()
        assert replacement and replacement[0].pid != actor.pid
        assert "trainer 0 stopped" in platform.log()
        # Readiness counts the replacement, not the dead one (silent past a lease: gone).
        wait_for("one trainer alive", lambda: _trainers_alive(platform) == 1, 30)


def _trainers_alive(platform: RunningPlatform) -> int:
    return int(httpx.get(platform.url + "/readyz", timeout=10).json()["trainers"]["alive"])


def test_postgres_stopping_mid_job_and_while_idle_costs_neither_job_anything(
    tmp_path: Path,
) -> None:
    with running_platform(tmp_path / "home") as platform, platform.client() as client:
        register_tiny_base(client)
        file_id = upload_dataset(client, tmp_path)
        job_id = submit(client, file_id, "blip")
        wait_for("a checkpoint", lambda: _checkpointed(client, job_id), 180)

        # Mid-job: PostgreSQL goes away at once (as a crash would); `up` restarts it.
        platform.crash_postgres()
        job = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"}, 300)
        assert job["status"] == "succeeded", job
        assert job["attempt"] == 1
        assert "stopped answering; restarting it" in platform.log()

        # While the trainer is idle: it must still hear about the next job.
        platform.crash_postgres()
        next_job = wait_for("the API back", lambda: _try_submit(client, file_id), 60)
        done = wait_for_status(client, next_job, {"succeeded", "failed", "cancelled"}, 300)
        assert done["status"] == "succeeded", done
        assert platform.trainer_actors(), "the trainer did not survive the outages"


def _try_submit(client, file_id: str) -> str | None:  # type: ignore[no-untyped-def]
    from loraforge.client import LoraforgeError

    try:
        return submit(client, file_id, "after-idle-blip", n_epochs=2)
    except LoraforgeError as exc:
        assert exc.status == 503, exc  # while the database comes back: retryable, never 500
        return None
