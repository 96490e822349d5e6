"""`loraforge up` and `demo` own what they start: SIGTERM stops all of it, PostgreSQL included,
and a second `up` on a home in use refuses."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from sqlalchemy import text

from control_plane import db
from control_plane.settings import Settings
from loraforge.embedded import EmbeddedPostgres, embedded_platform, postmaster_pid
from loraforge.supervise import HomeInUseError
from tests.faults.harness import (
    _alive,
    _name,
    platform_env,
    register_tiny_base,
    running_platform,
    submit,
    upload_dataset,
    wait_for,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_sigterm_to_up_stops_every_process_it_started_postgres_included(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with running_platform(home) as platform:
        started = platform.descendants()
        postmaster = platform.postgres_pid()
        assert postmaster is not None and psutil.pid_exists(postmaster)
        assert platform.trainer_actors(), "no Ray trainer actor among the children"
        assert any("celery" in _name(p) for p in started)

        # A second `up` on the same home refuses at once and names the running one.
        second = subprocess.run(
            [sys.executable, "-m", "loraforge.cli", "up", "--no-default-base"],
            env=platform_env(home, platform.port + 1),
            capture_output=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert f"pid {platform.process.pid}" in second.stderr.decode()
        assert platform.process.poll() is None, "the refused second up hurt the first"

        seconds = platform.stop(signal.SIGTERM, timeout=60)

    assert platform.process.returncode == 0, platform.log()
    # The stop is bounded: a trainer's grace (30 s) at most, a few seconds when idle.
    assert seconds < 35, seconds
    left = [p for p in started if _alive(p)]
    assert not left, [_name(p) for p in left]
    assert not _alive(psutil.Process(postmaster)) if psutil.pid_exists(postmaster) else True


def test_sigterm_to_up_mid_job_hands_the_job_back_before_ray_goes(tmp_path: Path) -> None:
    """The trainer stops at its next step, checkpoints it and hands the job back, then leaves
    the sleepers and the trainer registry: the job is queued again at once with its attempt not
    used, rather than left on a lease that only expiry returns. (`ray.init` had replaced the
    worker's SIGTERM handler with Ray's, which ended the worker at once.)"""
    home = tmp_path / "home"
    with running_platform(home) as platform, platform.client() as client:
        register_tiny_base(client)
        job_id = submit(client, upload_dataset(client, tmp_path), "stopped")
        wait_for(
            "a checkpoint",
            lambda: client.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")["data"],
            180,
        )
        seconds = platform.stop(signal.SIGTERM, timeout=60)
    assert platform.process.returncode == 0, platform.log()
    assert seconds < 35, seconds

    postgres = EmbeddedPostgres(home / "pgdata")
    engine = db.make_engine(postgres.start(), pool_size=1)
    try:
        with engine.connect() as conn:
            job = conn.execute(
                text("SELECT status, attempt, interruptions FROM jobs WHERE id = :id"),
                {"id": job_id},
            ).one()
            messages = list(
                conn.execute(
                    text("SELECT message FROM job_events WHERE job_id = :id ORDER BY id"),
                    {"id": job_id},
                ).scalars()
            )
            left = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM queue_sleepers), (SELECT count(*) FROM trainers)"
                )
            ).one()
    finally:
        engine.dispose()
        postgres.stop()
    assert (job.status, job.attempt, job.interruptions) == ("queued", 0, 0), (job, messages)
    assert any(m.startswith("Handed back to the queue") for m in messages), messages
    assert tuple(left) == (0, 0)


def test_the_embedded_platform_leaves_nothing_running_when_its_block_ends(
    tmp_path: Path,
) -> None:
    """What `loraforge demo` runs its job in: on leaving the block, its children and its
    PostgreSQL are gone, and the home is free for the next run."""
    settings = Settings(home=tmp_path / "home", lease_seconds=4, trainer_threads=1)
    me = psutil.Process()
    with embedded_platform(settings, default_base=False) as platform:
        wait_for(
            "a trainer actor",
            lambda: any("TrainerActor" in _name(p) for p in me.children(True)),
            180,
        )
        started = me.children(recursive=True)
        postmaster = postmaster_pid(settings.home / "pgdata")
        assert postmaster is not None
        with pytest.raises(HomeInUseError), embedded_platform(settings, default_base=False):
            pass
        assert platform.supervisor.children[0].exited() is None
    left = [p for p in started if _alive(p)]
    assert not left, [_name(p) for p in left]
    assert not psutil.pid_exists(postmaster) or not _alive(psutil.Process(postmaster))
    with embedded_platform(settings, trainer=False, default_base=False):
        pass  # the lock went with the first platform
