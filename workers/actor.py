"""Ray trainer actors: one long-lived actor per GPU (one on the CPU where there is none).

Each actor owns a `JobRunner`, so the base it loaded stays resident across the jobs it claims.
Ray's token authentication (on by default for a local cluster since Ray 2.60) stays on: a local
instance started here writes its token under `~/.ray`, and processes Ray starts inherit it; to
join a remote cluster, set `RAY_AUTH_TOKEN` (or the token file) as Ray documents.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import torch

from control_plane.services import build_services
from control_plane.settings import Settings
from control_plane.wakeups import IDLE_POLL_S
from workers.runner import JobRunner
from workers.training.recipe import ResidentBase

# How long the check that the head refuses this process's token waits for the head's answer
# (a GCS answers a client at once; one that does not is left to ray.init).
GCS_PROBE_SECONDS = 5.0


class RayJoinError(Exception):
    """This process could not join the Ray cluster at `LORAFORGE_RAY_ADDRESS`; the message says
    what to set or start."""


def init_ray(settings: Settings, *, num_cpus: int | None = None) -> None:
    """Join `LORAFORGE_RAY_ADDRESS`, or start a local Ray instance (the embedded default).

    Raises `RayJoinError` when the cluster cannot be joined, at once where the head refuses
    this process's authentication (Ray itself only says "Failed to connect" after retrying for
    20 s, with the reason in its C++ log lines)."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(_import_roots())}}
    if settings.ray_address:
        if _refuses_this_process(settings.ray_address):
            raise RayJoinError(why_not_joined(settings.ray_address))
        try:
            ray.init(address=settings.ray_address, runtime_env=runtime_env, log_to_driver=True)
        except (ConnectionError, ray.exceptions.AuthenticationError) as exc:
            raise RayJoinError(why_not_joined(settings.ray_address)) from exc
    else:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
        )


def _answers(address: str) -> bool:
    """Whether something accepts a connection at `address` ([ray://]host:port) within 3 s."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError):
        return False
    return True


def _refuses_this_process(address: str) -> bool:
    """Whether the head's GCS at `address` (host:port) answers and refuses this process's
    authentication. `ray.init` asks it 20 times, a second apart, and then says only that it
    could not connect; one client of the GCS is told at once. Anything else (a `ray://`
    address, nothing answering yet, something that is not a GCS, no answer within
    `GCS_PROBE_SECONDS`) is left to `ray.init` and its retries."""
    if address.startswith("ray://") or not _answers(address):
        return False
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # no stub; Ray's own client

    answered, refused = threading.Event(), threading.Event()

    def probe() -> None:
        try:
            GcsClient(address=address)
        except ray.exceptions.AuthenticationError:
            refused.set()
        except Exception:  # not a refusal: ray.init says what it is
            pass
        answered.set()

    # A listener that is not a GCS (a proxy, the wrong port) holds the client for 40 s.
    threading.Thread(target=probe, name="ray-auth-probe", daemon=True).start()
    answered.wait(GCS_PROBE_SECONDS)
    return refused.is_set()


def why_not_joined(address: str, environ: Mapping[str, str] = os.environ) -> str:
    """Why joining the cluster at `address` failed, in words that say what to do: a head that
    answers but refuses is token authentication (on by default for `ray start` in Ray 2.60)
    with no token or the wrong one; a head that does not answer is not running there."""
    if not _answers(address):
        return (
            f"Nothing answers at {address} (LORAFORGE_RAY_ADDRESS): start the head there "
            "(`ray start --head --port=6379`, or a KubeRay RayCluster) or correct the address."
        )
    fix = (
        "RAY_AUTH_TOKEN=<the cluster's token> (`ray get-auth-token` on the head prints it; "
        "on Kubernetes, the Secret named by the chart's ray.auth.existingSecret) or "
        "RAY_AUTH_TOKEN_PATH=<a file holding it>"
    )
    if environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (
            f"The Ray cluster at {address} answered but refused this process: it requires "
            f"token authentication. Set RAY_AUTH_MODE=token and {fix}."
        )
    return f"The Ray cluster at {address} refused this process's authentication token. Set {fix}."


def _import_roots() -> list[str]:
    """Where `control_plane` and `workers` are importable from, for Ray's worker processes."""
    root = str(Path(__file__).resolve().parent.parent)
    existing = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [root, *existing]


@ray.remote(max_concurrency=4)
class TrainerActor:
    """A trainer: claims jobs (preferring its resident base), trains, publishes, repeats."""

    def __init__(
        self, settings_json: str, database_url: str, worker_id: str, work_dir: str
    ) -> None:
        settings = Settings.model_validate_json(settings_json)
        torch.set_num_threads(trainer_threads(settings))
        self.services = build_services(settings, database_url=database_url)
        self.runner = JobRunner(self.services, worker_id, work_dir=Path(work_dir))
        self.stop_event = threading.Event()
        self.loop_lock = threading.Lock()

    def run(self, max_jobs: int | None = None, idle_wait: float = IDLE_POLL_S) -> int:
        """The claim → train → publish loop; returns how many jobs it ran.

        One loop per actor: the actor takes concurrent calls (for `stop` and `stats`), and a
        second loop would train two jobs at once on the one resident base.
        """
        if not self.loop_lock.acquire(blocking=False):
            raise RuntimeError(f"trainer {self.runner.worker_id} is already running its loop")
        try:
            return self.runner.run_forever(self.stop_event, idle_wait=idle_wait, max_jobs=max_jobs)
        finally:
            self.loop_lock.release()

    def stop(self) -> None:
        self.stop_event.set()

    def stats(self) -> dict[str, Any]:
        return {
            "worker_id": self.runner.worker_id,
            "pid": os.getpid(),
            "jobs_done": self.runner.jobs_done,
            "base_loads": ResidentBase.load_count,
            "resident_base_id": self.runner.resident_base_id,
            "torch_threads": torch.get_num_threads(),
        }


def trainer_threads(settings: Settings) -> int:
    """`settings.trainer_threads`, else every CPU this process may run on."""
    return settings.trainer_threads or len(os.sched_getaffinity(0))


def trainer_count() -> int:
    """One trainer per GPU; one on the CPU where there is none."""
    return max(torch.cuda.device_count(), 1)


def start_trainers(settings: Settings, database_url: str, *, count: int | None = None) -> list[Any]:
    """Start the trainer actors of this node; returns their handles (call `run` once on each
    to start its loop)."""
    init_ray(settings)
    return [
        start_trainer(settings, database_url, index) for index in range(count or trainer_count())
    ]


def start_trainer(settings: Settings, database_url: str, index: int, *, generation: int = 0) -> Any:
    """Start trainer `index` of this node (`generation` counts its replacements, so that a
    replacement never takes the lease identity of the actor it replaces)."""
    init_ray(settings)
    gpus = 1 if _has_gpu() else 0
    suffix = f".{generation}" if generation else ""
    worker_id = f"{socket.gethostname()}-trainer-{index}{suffix}-{os.getpid()}"
    # `ray.remote` made the class an actor class: mypy sees the class it was written as.
    return TrainerActor.options(num_gpus=gpus, num_cpus=1, name=None).remote(  # type: ignore[attr-defined]
        settings.model_dump_json(),
        database_url,
        worker_id,
        str(settings.home / "worker" / f"trainer-{index}"),
    )


def _has_gpu() -> bool:
    return bool(torch.cuda.is_available())
