"""Run claimed jobs on a resident base: fetch, train, checkpoint, publish, and the loop around it.

A `JobRunner` belongs to one trainer (one Ray actor, or one process in tests). It keeps one base
resident across jobs, renews each job's lease from a heartbeat thread (which is also how a
cancellation or a lost lease reaches the training loop), turns training events into job events,
uploads checkpoints, resumes a retried job from its newest checkpoint, and publishes the adapter
through the registry. Jobs that cannot succeed fail with their reason; the runner survives.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from control_plane import base_models, jobs, registry
from control_plane import files as file_repo
from control_plane.datasets import iter_examples
from control_plane.events import add_event
from control_plane.hyperparameters import Hyperparameters
from control_plane.queue import QueueListener
from control_plane.records import BaseModelRecord, FileRecord, JobRecord
from control_plane.services import Services
from control_plane.storage import ObjectStoreError, base_model_prefix, checkpoint_prefix
from workers.bases.checkpoints import BaseCache, BaseModelError
from workers.distributed import ClusterBusyError
from workers.training.lineage import build_lineage
from workers.training.recipe import (
    ResidentBase,
    TrainHooks,
    TrainingError,
    TrainResult,
    train_adapter,
)

log = logging.getLogger(__name__)


@dataclass
class _JobSignals:
    """Set by the heartbeat thread, read by the training loop between steps."""

    cancel: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    # The runner's stop: the worker is shutting down and hands the job back.
    shutdown: threading.Event = field(default_factory=threading.Event)
    progress: float | None = None
    eta_seconds: float | None = None

    def should_stop(self) -> bool:
        return self.cancel.is_set() or self.lease_lost.is_set() or self.shutdown.is_set()

    def handing_back(self) -> bool:
        """Stopping for a shutdown only: the job goes back to the queue, with a checkpoint."""
        return self.shutdown.is_set() and not (self.cancel.is_set() or self.lease_lost.is_set())


class JobRunner:
    """Trains claimed jobs one after another on one resident base."""

    def __init__(
        self,
        services: Services,
        worker_id: str,
        *,
        work_dir: Path,
        heartbeat_seconds: float = 1.0,
    ) -> None:
        self.services = services
        self.worker_id = worker_id
        self.work_dir = Path(work_dir)
        self.heartbeat_seconds = heartbeat_seconds
        self.cache = BaseCache(self.work_dir / "bases")
        self.resident: ResidentBase | None = None
        self.resident_base_id: str | None = None
        self.jobs_done = 0

    # -- the loop ---------------------------------------------------------------------------

    def run_forever(
        self,
        stop: threading.Event,
        *,
        idle_wait: float = 5.0,
        max_jobs: int | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> int:
        """Claim and run jobs until `stop` is set (or `max_jobs` ran); sleep on NOTIFY when idle."""
        ran = 0
        with QueueListener(self.services.database_url) as listener:
            while not stop.is_set() and (max_jobs is None or ran < max_jobs):
                self.services.queue.reap_expired_leases()
                job = self.services.queue.claim(
                    self.worker_id, prefer_base_model_id=self.resident_base_id
                )
                if job is None:
                    if on_idle is not None:
                        on_idle()
                    listener.wait(idle_wait)
                    continue
                self.run(job, shutdown=stop)
                ran += 1
        return ran

    # -- one job ----------------------------------------------------------------------------

    def run(self, job: JobRecord, shutdown: threading.Event | None = None) -> str:
        """Run one claimed job to an end state (or until its lease is lost); returns the status.

        When `shutdown` is set meanwhile, the job stops at the next step, checkpoints it and is
        handed back to the queue for another worker (status `queued`)."""
        signals = _JobSignals(shutdown=shutdown or threading.Event())
        stop_beat = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, signals, stop_beat), daemon=True)
        beat.start()
        job_dir = Path(tempfile.mkdtemp(prefix=f"{job.id}-", dir=self._ensure_dir("jobs")))
        try:
            return self._run(job, signals, job_dir)
        finally:
            stop_beat.set()
            beat.join()
            shutil.rmtree(job_dir, ignore_errors=True)
            self.jobs_done += 1

    def _run(self, job: JobRecord, signals: _JobSignals, job_dir: Path) -> str:
        queue = self.services.queue
        try:
            hp = Hyperparameters(**job.hyperparameters)
            with self.services.engine.connect() as conn:
                base = base_models.get_base_model(conn, job.base_model_id)
                train_file = file_repo.get_file_unscoped(conn, job.training_file_id)
                eval_file = (
                    file_repo.get_file_unscoped(conn, job.validation_file_id)
                    if job.validation_file_id
                    else None
                )
                checkpoint = jobs.latest_checkpoint(conn, job.id)
                parent = registry.job_parent_version(conn, job.id)
            if base is None or train_file is None:
                raise TrainingError("the job's base model or training file no longer exists")
            if job.parent_version_id is not None and parent is None:
                raise TrainingError("the adapter version this job continues from was deleted")
            train_records = self._records(train_file, job_dir / "train.jsonl")
            eval_records = self._records(eval_file, job_dir / "eval.jsonl") if eval_file else None
            resume_dir = init_dir = None
            if checkpoint is not None:
                resume_dir = self._download_checkpoint(checkpoint.object_prefix, job_dir / "resume")
            elif parent is not None:
                init_dir = registry.fetch_version_files(
                    self.services.store, parent, job_dir / "init"
                )
                self._event(job, f"Continuing from {parent.model_id}", {"parent": parent.model_id})
            hooks = TrainHooks(
                on_event=lambda kind, message, data: self._on_event(
                    job, signals, kind, message, data
                ),
                should_stop=signals.should_stop,
                on_checkpoint=lambda step, directory: self._on_checkpoint(job, step, directory),
                checkpoint_on_stop=signals.handing_back,
            )
            if hp.num_gpus > 1:
                result = self._train_distributed(
                    job, base, hp, train_records, eval_records, job_dir, resume_dir, init_dir
                )
            else:
                result = train_adapter(
                    self._resident_base(job, base, hp),
                    train_records,
                    eval_records,
                    hp,
                    hooks,
                    job_dir / "out",
                    resume_dir,
                    init_dir,
                )
        except (TrainingError, BaseModelError) as exc:
            code = "training_error" if isinstance(exc, TrainingError) else "base_model_unavailable"
            failed = queue.fail(
                job.id, self.worker_id, code=code, message=str(exc), retryable=False
            )
            return failed.status if failed else "lease_lost"
        except (ObjectStoreError, ClusterBusyError) as exc:  # retried later
            code = (
                "object_store_error"
                if isinstance(exc, ObjectStoreError)
                else "insufficient_resources"
            )
            failed = queue.fail(job.id, self.worker_id, code=code, message=str(exc))
            return failed.status if failed else "lease_lost"
        except Exception as exc:  # a bug or a fault: give the job back for another attempt
            log.exception("job %s failed on %s", job.id, self.worker_id)
            message = f"{type(exc).__name__}: {exc}"
            failed = queue.fail(job.id, self.worker_id, code="worker_error", message=message)
            return failed.status if failed else "lease_lost"
        if result.stopped:
            if signals.lease_lost.is_set():
                return "lease_lost"
            if signals.handing_back():
                reason = f"worker {self.worker_id} is shutting down"
                handed = queue.hand_back(job.id, self.worker_id, reason=reason)
                return handed.status if handed else "lease_lost"
            cancelled = queue.finish_cancelled(job.id, self.worker_id)
            return cancelled.status if cancelled else "lease_lost"
        assert result.adapter_dir is not None
        lineage = build_lineage(job, base, hp, train_file, eval_file, result, parent)
        try:
            published = registry.publish_job_adapter(
                self.services,
                job=job,
                worker_id=self.worker_id,
                adapter_dir=result.adapter_dir,
                lineage=lineage,
                metrics=lineage["metrics"],
            )
        except registry.RegistryError as exc:
            retry = isinstance(exc, registry.StoreUnavailableError)
            failed = queue.fail(
                job.id, self.worker_id, code="publish_failed", message=str(exc), retryable=retry
            )
            return failed.status if failed else "lease_lost"
        return "succeeded" if published is not None else "lease_lost"

    def _train_distributed(
        self,
        job: JobRecord,
        base: BaseModelRecord,
        hp: Hyperparameters,
        train_records: list[dict[str, Any]],
        eval_records: list[dict[str, Any]] | None,
        job_dir: Path,
        resume_dir: Path | None,
        init_dir: Path | None,
    ) -> TrainResult:
        """A job over `hp.num_gpus` Ray Train workers; they load the base themselves, so the
        one resident here stays as it is."""
        from workers.distributed import train_on_ray_train

        self._event(job, f"Training on {hp.num_gpus} Ray Train workers", {"workers": hp.num_gpus})
        return train_on_ray_train(
            self.services,
            self.worker_id,
            job,
            base,
            hp,
            train_records,
            eval_records,
            job_dir / "out",
            resume_dir=resume_dir,
            init_dir=init_dir,
        )

    # -- the base -------------------------------------------------------------------------------

    def _resident_base(
        self, job: JobRecord, base: BaseModelRecord, hp: Hyperparameters
    ) -> ResidentBase:
        """The job's base, loaded once and kept; a job for another base evicts the resident one."""
        if self.resident is not None and self.resident_base_id == base.id:
            self._event(
                job, f"Base {base.name} already resident; not reloaded", {"base_loaded": False}
            )
            return self.resident
        if self.resident is not None:
            self._event(job, f"Evicting resident base to load {base.name}", {})
            self.resident = None
            self.resident_base_id = None
        started = time.monotonic()
        path = self.materialize_base(base)
        self.resident = ResidentBase.load(path, precision=hp.precision)
        self.resident_base_id = base.id
        self._event(
            job,
            f"Loaded base {base.name} in {time.monotonic() - started:.1f}s ({self.resident.precision})",
            {
                "base_loaded": True,
                "load_count": ResidentBase.load_count,
                "precision": self.resident.precision,
            },
        )
        return self.resident

    def materialize_base(self, base: BaseModelRecord) -> Path:
        """A verified local checkpoint directory for a registered base.

        Bases registered with their weights' sha256 are fetched from the object store into the
        local cache (and re-fetched when a cached copy no longer matches); a directory base
        registered by path alone is used where it lies.
        """
        if base.sha256 is None:
            path = Path(base.source.removeprefix("file://"))
            if base.source_kind != "dir" or not path.is_dir():
                raise BaseModelError(
                    f"base {base.name}: {base.source} is not a directory on this worker "
                    "and no stored copy is recorded"
                )
            return path
        prefix = base_model_prefix(base.sha256)
        store = self.services.store

        def fetch(target: Path) -> None:
            keys = store.list_keys(prefix)
            if not keys:
                raise BaseModelError(f"base {base.name}: nothing stored under {prefix}")
            for key in keys:
                store.download_to(key, target / key[len(prefix) :])

        return self.cache.get(base.sha256, fetch)

    # -- data and checkpoints --------------------------------------------------------------------

    def _records(self, record: FileRecord, local: Path) -> list[dict[str, Any]]:
        self.services.store.download_to(record.object_key, local, expected_sha256=record.sha256)
        with local.open("rb") as fh:
            return list(iter_examples(fh))

    def _download_checkpoint(self, prefix: str, target: Path) -> Path:
        store = self.services.store
        for key in store.list_keys(prefix):
            store.download_to(key, target / key[len(prefix) :])
        return target

    def _on_checkpoint(self, job: JobRecord, step: int, directory: Path) -> None:
        store_checkpoint(self.services, job, step, directory)

    # -- events and heartbeat ------------------------------------------------------------------

    def _on_event(
        self, job: JobRecord, signals: _JobSignals, kind: str, message: str, data: dict[str, Any]
    ) -> None:
        if kind == "metrics":
            signals.progress = data.get("fraction_done", signals.progress)
            signals.eta_seconds = data.get("eta_s", signals.eta_seconds)
        record_event(self.services, job.id, kind, message, data)

    def _event(self, job: JobRecord, message: str, data: dict[str, Any]) -> None:
        record_event(self.services, job.id, "log", message, data)

    def _heartbeat(self, job: JobRecord, signals: _JobSignals, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_seconds):
            try:
                beat = self.services.queue.heartbeat(
                    job.id,
                    self.worker_id,
                    progress=signals.progress,
                    eta_seconds=signals.eta_seconds,
                )
            except Exception:  # a database blip: the lease has slack, try again next beat
                log.warning("heartbeat for %s failed", job.id, exc_info=True)
                continue
            if not beat.held:
                signals.lease_lost.set()
                return
            if beat.cancel_requested:
                signals.cancel.set()

    def _ensure_dir(self, name: str) -> Path:
        path = self.work_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def record_event(
    services: Services, job_id: str, kind: str, message: str, data: dict[str, Any]
) -> None:
    """A training event as a job event (`metrics` events keep their type)."""
    with services.engine.begin() as conn:
        add_event(
            conn, job_id, message, type="metrics" if kind == "metrics" else "message", data=data
        )


def store_checkpoint(services: Services, job: JobRecord, step: int, directory: Path) -> None:
    """Upload a checkpoint directory under the job and list it (idempotent per step)."""
    prefix = checkpoint_prefix(job.tenant_id, job.id, step)
    store = services.store
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        key = prefix + path.relative_to(directory).as_posix()
        if store.head(key) is None:
            store.put_file(key, path)
    with services.engine.begin() as conn:
        jobs.add_checkpoint(conn, job.id, step, prefix, {"step": step})
