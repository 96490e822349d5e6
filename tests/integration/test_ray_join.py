"""`loraforge worker` joining a Ray cluster started apart from it (`ray start --head`, token
authentication on, as Ray 2.60 has it by default), as a user joins an existing cluster: with the
token it trains a job from the queue; without it, it exits with a message naming what to set."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from control_plane.services import Services, build_services
from control_plane.settings import Settings
from tests.factories import ADDITION_CHATS as RECORDS
from tests.faults.harness import free_port, wait_for
from tests.integration.test_trainer import job_row, make_world, submit

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))


def _clean_env() -> dict[str, str]:
    """This machine's environment without any Ray or loraforge setting the test did not make."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LORAFORGE_"))}


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, str]]:
    """A Ray head of its own (own temp dir, so no other test's `ray.init()` finds it), with
    token authentication and a token of its own; yields (address, token)."""
    temp_dir = tempfile.mkdtemp(prefix="lfray-", dir="/tmp")  # short: Ray's socket paths
    port, token = free_port(), secrets.token_hex(16)
    env = {**_clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"127.0.0.1:{port}", token
    finally:
        # Not `ray stop`: that stops every Ray process on the machine, other tests' included.
        mine = [
            p
            for p in psutil.process_iter(["cmdline"])
            if any(temp_dir in part for part in (p.info["cmdline"] or []))
        ]
        for proc in mine:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(mine, timeout=30)


@pytest.fixture
def shared(database_url: str, tmp_path: Path) -> Iterator[tuple[Services, dict[str, str]]]:
    """The platform's database and object store, as this test and the worker both see them."""
    env = {
        "LORAFORGE_DATABASE_URL": database_url,
        "LORAFORGE_HOME": str(tmp_path / "worker-home"),
        "LORAFORGE_LOCAL_STORE_DIR": str(tmp_path / "objects"),
        "LORAFORGE_LEASE_SECONDS": "10",
        "LORAFORGE_TRAINER_THREADS": "1",
    }
    settings = Settings(
        home=tmp_path / "home", local_store_dir=tmp_path / "objects", lease_seconds=10
    )
    services = build_services(settings, database_url=database_url)
    yield services, env
    services.close()


def _worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "loraforge.cli", "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.parametrize(
    ("auth", "says"),
    [
        ({}, "requires token authentication. Set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN"),
        (
            {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
            "refused this process's authentication token. Set RAY_AUTH_TOKEN",
        ),
    ],
    ids=["no-token", "wrong-token"],
)
def test_a_worker_without_the_token_exits_naming_what_to_set(
    ray_head: tuple[str, str],
    shared: tuple[Services, dict[str, str]],
    tmp_path: Path,
    auth: dict[str, str],
    says: str,
) -> None:
    """Told by the head's first answer (Ray's own join tries for 20 s, then says only that it
    could not connect)."""
    address, _ = ray_head
    _, platform_env = shared
    env = {**_clean_env(), **platform_env, "LORAFORGE_RAY_ADDRESS": address, **auth}
    log_path = tmp_path / "worker.log"
    worker = _worker(env, log_path)
    try:
        code = worker.wait(timeout=180)
    finally:
        if worker.poll() is None:
            worker.kill()
    said = log_path.read_text()
    assert code == 2, said
    last = said.strip().splitlines()[-1]
    assert last.startswith("loraforge worker: The Ray cluster at " + address), said
    assert says in last, last
    assert "Traceback" not in said


def test_a_worker_with_the_token_joins_and_trains_a_job_from_the_queue(
    ray_head: tuple[str, str], shared: tuple[Services, dict[str, str]], tmp_path: Path
) -> None:
    address, token = ray_head
    services, platform_env = shared
    world = make_world(services)
    job_id = submit(services, world, records=RECORDS * 2, n_epochs=2)
    env = {
        **_clean_env(),
        **platform_env,
        "LORAFORGE_RAY_ADDRESS": address,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
    }
    log_path = tmp_path / "worker.log"
    worker = _worker(env, log_path)
    try:
        started = time.monotonic()

        def finished() -> bool:
            assert worker.poll() is None, log_path.read_text()
            return job_row(services, job_id).status in ("succeeded", "failed", "cancelled")

        wait_for("the job to finish on the joined cluster", finished, 300, every=0.5)
        done = job_row(services, job_id)
        assert done.status == "succeeded", (done, log_path.read_text())
        assert time.monotonic() - started < 300
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
    said = log_path.read_text()
    # It trained on the cluster it was pointed at, not in a local instance of its own.
    assert "Connected to Ray cluster." in said and "Started a local Ray instance" not in said
    assert "trainer(s) running" in said


def test_a_listener_that_is_not_a_head_is_left_to_rays_own_join(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Something accepting connections that is not a GCS (a proxy, the wrong port) holds Ray's
    client for 40 s: the check gives up after its own wait and says nothing was refused."""
    from workers import actor

    monkeypatch.setattr(actor, "GCS_PROBE_SECONDS", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        assert not actor._refuses_this_process(f"127.0.0.1:{silent.getsockname()[1]}")
