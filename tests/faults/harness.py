"""A real `loraforge up` in a child process, for the fault-injection tier.

The platform runs as a user runs it: `python -m loraforge.cli up` with its own home, its own
embedded PostgreSQL (pgserver, so a test can stop and restart it), celery with beat, and a
`loraforge worker` child with a Ray trainer actor; the tiny test base is registered over the API.
Leases are short (4 s) so that a lost trainer's job comes back within seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from loraforge.client import Client, LoraforgeError
from loraforge.embedded import postmaster_pid
from tests.factories import ADDITION_CHATS as RECORDS
from tests.fixtures.testbase import TEST_BASE_PATH

BASE_NAME = "tiny"
# Long enough on the tiny base (a few hundred steps, checkpoints every 8) to fault it mid-job.
LONG_JOB = {
    "n_epochs": 40,
    "batch_size": 2,
    "learning_rate_multiplier": 5,
    "lora_rank": 8,
    "max_seq_length": 64,
    "checkpoint_every_steps": 8,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@contextlib.contextmanager
def loraforge_child(
    args: list[str], env: dict[str, str], log_path: Path, *, grace_s: float = 30
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m loraforge.cli ARGS` with its output in `log_path`, for the block's duration;
    then SIGTERM, and SIGKILL after `grace_s`."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "loraforge.cli", *args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def platform_env(home: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFORGE_")}
    env.update(
        LORAFORGE_HOME=str(home),
        LORAFORGE_PORT=str(port),
        LORAFORGE_LEASE_SECONDS="4",
        LORAFORGE_RETRY_BACKOFF_SECONDS="0",
        LORAFORGE_TRAINER_THREADS="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


@dataclass
class RunningPlatform:
    """One `loraforge up` process and what the tests need to reach into it."""

    process: subprocess.Popen[bytes]
    home: Path
    port: int
    log_path: Path
    key: str = ""
    started: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = None, timeout: float = 30) -> Client:
        return Client(self.url, key or self.key, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        """Every live process this `up` started, directly or not (zombies left out)."""
        try:
            found = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            found = []
        return [p for p in found if _alive(p)]

    def trainer_actors(self) -> list[psutil.Process]:
        return [p for p in self.descendants() if "TrainerActor" in _name(p)]

    def postgres_pid(self) -> int | None:
        return postmaster_pid(self.home / "pgdata")

    def crash_postgres(self) -> None:
        """PostgreSQL goes away at once, as a crash would (SIGQUIT: `pg_ctl stop -m
        immediate`); returns once `up` has started it again."""
        pid = self.postgres_pid()
        assert pid is not None, "no PostgreSQL is running"
        psutil.Process(pid).send_signal(signal.SIGQUIT)
        try:
            wait_for("PostgreSQL restarted", lambda: self.postgres_pid() not in (None, pid), 60)
        except AssertionError as timed_out:
            # What `up` said of its PostgreSQL meanwhile, so a slow restart says why.
            said = [line for line in self.log().splitlines() if "PostgreSQL" in line]
            raise AssertionError(f"{timed_out}; `up` said: {said[-10:]}") from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60) -> float:
        """Send `signum` to `up`; seconds until it exited."""
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signum)
        self.process.wait(timeout=timeout)
        return time.monotonic() - started


def _name(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline()) or proc.name()
    return ""


def _alive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


def start_platform(home: Path, *, trainer: bool = True, timeout: float = 180) -> RunningPlatform:
    """Start `loraforge up` and wait until it serves (and, with a trainer, until it runs)."""
    port = free_port()
    log_path = home.parent / f"{home.name}-up.log"
    args = [sys.executable, "-m", "loraforge.cli", "up", "--no-default-base", "--port", str(port)]
    if not trainer:
        args.append("--no-trainer")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args, env=platform_env(home, port), stdout=log, stderr=subprocess.STDOUT
        )
    platform = RunningPlatform(process, home, port, log_path)

    def serving() -> bool:
        assert process.poll() is None, f"loraforge up exited:\n{platform.log()}"
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(platform.url + "/healthz", timeout=2).status_code == 200
        return False

    wait_for("the API", serving, timeout)
    platform.key = (home / "admin-key").read_text().strip()
    if trainer:
        wait_for("a trainer actor", platform.trainer_actors, timeout)
    return platform


@contextlib.contextmanager
def running_platform(home: Path, *, trainer: bool = True) -> Iterator[RunningPlatform]:
    platform = start_platform(home, trainer=trainer)
    try:
        yield platform
    finally:
        if platform.process.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                platform.stop(timeout=60)
        if platform.process.poll() is None:
            platform.process.kill()


def register_tiny_base(client: Client) -> None:
    """The tiny test base, registered over the API and imported by celery."""
    client.request(
        "POST", "/v1/base_models", json={"name": BASE_NAME, "source": str(TEST_BASE_PATH)}
    )

    def ready() -> bool:
        base = client.request("GET", f"/v1/base_models/{BASE_NAME}")
        assert base["status"] != "failed", base
        return bool(base["status"] == "ready")

    wait_for("the base import", ready, 120)


def upload_dataset(client: Client, directory: Path, records: list[dict[str, Any]] = RECORDS) -> str:
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(client.upload_file(path)["id"])


def submit(client: Client, file_id: str, adapter: str, **hyperparameters: Any) -> str:
    job = client.create_job(
        model=BASE_NAME,
        training_file=file_id,
        adapter_name=adapter,
        hyperparameters={**LONG_JOB, **hyperparameters},
    )
    return str(job["id"])


def wait_for_status(
    client: Client, job_id: str, statuses: set[str], timeout: float
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        try:
            job = client.retrieve_job(job_id)
        except LoraforgeError as exc:
            assert exc.status == 503, exc  # while a dependency comes back: retryable, never 500
            return None
        return dict(job) if job["status"] in statuses else None

    result: dict[str, Any] = wait_for(f"job {job_id} to reach {statuses}", reached, timeout, 0.5)
    return result


def event_messages(client: Client, job_id: str) -> list[str]:
    messages: list[str] = []
    after = None
    while True:
        page = client.list_events(job_id, after=after, order="asc")
        messages += [e["message"] for e in page["data"]]
        if not page["has_more"]:
            return messages
        after = page["data"][-1]["id"]
