"""One job over several GPUs (or CPU workers): Ray Train's `TorchTrainer`, the same recipe.

A trainer actor that claims a job with `num_gpus > 1` calls `train_on_ray_train`: Ray Train
starts `num_gpus` workers with a process group (nccl on GPUs, gloo on CPUs); each loads the
job's base (from its node's cache, as a trainer does) and runs `train_adapter` as one rank.
Rank 0 talks to the platform as a single trainer would, through the same `workers.job_io`: job
events, checkpoints to the object store, the cancel/lease check (through the job's heartbeat,
under the claiming trainer's worker id), and at the end it hands the adapter back through a
Ray Train checkpoint.
"""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from control_plane.hyperparameters import Hyperparameters
from control_plane.records import BaseModelRecord, JobRecord
from control_plane.services import Services, build_services
from control_plane.settings import Settings
from workers.bases.checkpoints import BaseCache
from workers.job_io import JobSignals, LeaseHeartbeat, job_hooks, materialize_base
from workers.training.recipe import (
    ResidentBase,
    TrainHooks,
    TrainingError,
    TrainResult,
    train_adapter,
)

ADAPTER_REPORT = "loraforge_adapter"


def pack_dir(directory: Path | None) -> dict[str, bytes] | None:
    """A small directory (a checkpoint, an adapter) as {relative path: bytes}, to ship to
    workers on other nodes."""
    if directory is None:
        return None
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def unpack_dir(files: dict[str, bytes] | None, target: Path) -> Path | None:
    if files is None:
        return None
    for name, data in files.items():
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return target


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker, inside the process group Ray Train set up."""
    import ray.train
    import torch

    rank = ray.train.get_context().get_world_rank()
    settings = Settings.model_validate_json(config["settings_json"])
    services = build_services(settings, database_url=config["database_url"])
    job: JobRecord = config["job"]
    hp: Hyperparameters = config["hp"]
    signals = JobSignals()
    # Rank 0 keeps the job's lease (under the claiming trainer's id) and hears a cancellation.
    heartbeat: AbstractContextManager[object] = (
        LeaseHeartbeat(
            services.queue,
            job.id,
            config["worker_id"],
            signals,
            interval_s=config["heartbeat_seconds"],
        )
        if rank == 0
        else nullcontext()
    )
    try:
        with heartbeat:
            if not torch.cuda.is_available():
                torch.set_num_threads(max(1, config["threads_per_worker"]))
            # The base, from this node's verified cache (or its directory), like any trainer.
            cache = BaseCache(settings.home / "worker" / "ray-train" / "bases")
            path = materialize_base(services.store, cache, config["base"])
            base = ResidentBase.load(path, precision=hp.precision)
            with tempfile.TemporaryDirectory(prefix=f"{job.id}-rank{rank}-") as tmp:
                work = Path(tmp)
                result = train_adapter(
                    base,
                    config["train_records"],
                    config["eval_records"],
                    hp,
                    job_hooks(services, job, signals) if rank == 0 else TrainHooks(),
                    work / "out",
                    unpack_dir(config["resume"], work / "resume"),
                    unpack_dir(config["init"], work / "init"),
                )
                metrics = {ADAPTER_REPORT: asdict(result) | {"adapter_dir": None}}
                if rank == 0 and result.adapter_dir is not None:
                    checkpoint = ray.train.Checkpoint.from_directory(str(result.adapter_dir))
                    ray.train.report(metrics, checkpoint=checkpoint)
                else:
                    ray.train.report(metrics)
    finally:
        services.close()


class ClusterBusyError(Exception):
    """The Ray cluster could run the job, but not now: its resources are held (retry later)."""


def check_cluster_fits(workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Refuse a job the Ray cluster cannot place, instead of waiting for it without end:
    `TrainingError` when the whole cluster is too small, `ClusterBusyError` when it is busy
    (trainer actors hold a CPU or a GPU each)."""
    import ray

    wanted = {"CPU": workers * cpus_per_worker} | ({"GPU": float(workers)} if use_gpu else {})
    total, free = ray.cluster_resources(), ray.available_resources()
    for resource, amount in wanted.items():
        asked = f"the job asks for {workers} Ray Train workers ({amount:g} {resource})"
        if total.get(resource, 0.0) < amount:
            raise TrainingError(
                f"{asked}; the Ray cluster has {total.get(resource, 0.0):g} {resource} in all: "
                "ask for fewer workers (num_gpus) or lower ray_train_cpus_per_worker"
            )
        if free.get(resource, 0.0) < amount:
            raise ClusterBusyError(
                f"{asked}; {free.get(resource, 0.0):g} of the cluster's "
                f"{total[resource]:g} {resource} are free now (trainer actors hold the rest)"
            )


def train_on_ray_train(
    services: Services,
    worker_id: str,
    job: JobRecord,
    base: BaseModelRecord,
    hp: Hyperparameters,
    train_records: list[dict[str, Any]],
    eval_records: list[dict[str, Any]] | None,
    output_dir: Path,
    *,
    resume_dir: Path | None = None,
    init_dir: Path | None = None,
    heartbeat_seconds: float = 1.0,
) -> TrainResult:
    """Train one job over `hp.num_gpus` Ray Train workers; returns rank 0's result, with the
    adapter copied into `output_dir / "adapter"`. Rank 0 renews the job's lease every
    `heartbeat_seconds`, as the claiming trainer does."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        raise TrainingError(
            f"the job asks for {hp.num_gpus} GPUs/workers: that needs a Ray cluster "
            "(run it on `loraforge worker`)"
        )
    use_gpu = bool(torch.cuda.is_available())
    settings = services.settings
    cpus = settings.ray_train_cpus_per_worker
    check_cluster_fits(hp.num_gpus, cpus, use_gpu)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={
            "settings_json": settings.model_dump_json(),
            "database_url": services.database_url,
            "worker_id": worker_id,
            "job": job,
            "base": base,
            "hp": hp,
            "train_records": train_records,
            "eval_records": eval_records,
            "resume": pack_dir(resume_dir),
            "init": pack_dir(init_dir),
            "threads_per_worker": max(1, int(cpus)),
            "heartbeat_seconds": heartbeat_seconds,
        },
        scaling_config=ScalingConfig(
            num_workers=hp.num_gpus, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=RunConfig(
            name=f"{job.id}-attempt{job.attempt}", storage_path=str(output_dir / "ray-train")
        ),
    )
    try:
        outcome = trainer.fit()
    except Exception as exc:  # Ray Train wraps the workers' errors
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, TrainingError) or "TrainingError" in str(exc):
            message = str(cause) if isinstance(cause, TrainingError) else _first_line(exc)
            raise TrainingError(message) from exc
        raise
    reported = (outcome.metrics or {}).get(ADAPTER_REPORT)
    if reported is None:
        raise TrainingError("the distributed run ended without a result from rank 0")
    adapter_dir = None
    if outcome.checkpoint is not None:
        adapter_dir = Path(outcome.checkpoint.to_directory(str(output_dir / "adapter")))
    return TrainResult(**(reported | {"adapter_dir": adapter_dir}))


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if "TrainingError" in ln]
    return lines[-1].split("TrainingError:", 1)[-1].strip() if lines else str(exc)
