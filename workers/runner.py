"""Run claimed jobs on a resident base: fetch, train, checkpoint, publish, and the loop around it.

A `JobRunner` belongs to one trainer (one Ray actor, or one process in tests). It keeps one base
resident across jobs, keeps each job's lease by heartbeat (which is also how a cancellation or a
lost lease reaches the training loop), resumes a retried job from its newest checkpoint, hands a
job over several workers to `workers.distributed`, and publishes the adapter through the
registry. Jobs that cannot succeed fail with their reason (`FAILURES`); the runner survives.
What it shares with rank 0 of a distributed job (events, checkpoints, the heartbeat, the base
cache) lives in `workers.job_io`.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from control_plane import base_catalog, jobs, registry
from control_plane import files as file_repo
from control_plane.datasets import iter_examples
from control_plane.hyperparameters import Hyperparameters
from control_plane.job_status import JobStatus
from control_plane.messages import first_line
from control_plane.queue import quarter_of_a_lease
from control_plane.records import BaseModelRecord, FileRecord, JobRecord
from control_plane.services import Services
from control_plane.storage import ObjectStoreError
from control_plane.trainers import TrainerReport
from control_plane.wakeups import IDLE_POLL_S, WakeUps
from workers.bases.checkpoints import BaseCache, BaseModelError
from workers.distributed import ClusterBusyError, train_on_ray_train
from workers.job_io import (
    DATABASE_ERRORS,
    JobSignals,
    LeaseHeartbeat,
    TrainerPresence,
    job_hooks,
    materialize_base,
    record_event,
    through_blips,
)
from workers.training.device import describe_device
from workers.training.lineage import build_lineage
from workers.training.recipe import ResidentBase, TrainingError, TrainResult, train_adapter

log = logging.getLogger(__name__)

LEASE_LOST: Final = "lease_lost"
"""What `JobRunner.run` returns when the job's lease went elsewhere: its state is not this
worker's to tell any more."""

RunOutcome = JobStatus | Literal["lease_lost"]

FAILURES: dict[type[Exception], tuple[str, bool]] = {
    TrainingError: ("training_error", False),
    BaseModelError: ("base_model_unavailable", False),
    ObjectStoreError: ("object_store_error", True),
    ClusterBusyError: ("insufficient_resources", True),
    registry.RegistryError: ("publish_failed", False),
    registry.StoreUnavailableError: ("publish_failed", True),
}
"""How a failure ends a job: exception type → (error code, whether another attempt may succeed).
The most specific type along the exception's MRO wins; an exception not listed is a bug or a
fault, logged with its traceback and retried as `worker_error`."""


def _counted_as(outcome: RunOutcome, signals: JobSignals) -> str:
    """Which of the trainer's outcome counters a finished run adds to: a failure (for good, or
    back to the queue for another attempt) is `failed`; a cancellation, a hand-back or a lost
    lease is `let_go`."""
    if outcome == JobStatus.SUCCEEDED:
        return "succeeded"
    if outcome == JobStatus.FAILED or (outcome == JobStatus.QUEUED and signals.failed):
        return "failed"
    return "let_go"


def failure_of(exc: Exception) -> tuple[str, bool] | None:
    """The job's (error code, retryable) for `exc`, or None when `FAILURES` does not know it."""
    for kind in type(exc).__mro__:
        if kind in FAILURES:
            return FAILURES[kind]
    return None


@dataclass(frozen=True)
class _JobInputs:
    """What a job trains from, read once at its start."""

    hp: Hyperparameters
    base: BaseModelRecord
    train_file: FileRecord
    eval_file: FileRecord | None
    parent: registry.AdapterVersionRecord | None
    resume_prefix: str | None


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
        self.resident_base_name: str | None = None
        # Since this trainer started, for the registry's counters (and so /metrics).
        self.counts = {"claims": 0, "succeeded": 0, "failed": 0, "let_go": 0, "tokens_trained": 0}
        # What the trainer registry shows: the job in hand and its signals (metrics, progress).
        self.current: tuple[JobRecord, JobSignals] | None = None
        # The latest job's last metrics (its speed, step time, peak memory), kept while idle.
        self.last_metrics: dict[str, Any] = {}
        self.started_pid = os.getpid()
        self.device = describe_device()

    # -- the loop ---------------------------------------------------------------------------

    def run_forever(
        self,
        stop: threading.Event,
        *,
        idle_wait: float = IDLE_POLL_S,
        max_jobs: int | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> int:
        """Claim and run jobs until `stop` is set (or `max_jobs` ran); when idle, sleep until a
        queued job wakes this trainer alone, or `idle_wait` passes (`control_plane.wakeups`)."""
        ran = 0
        wakeups = through_blips(
            lambda: WakeUps(self.services.engine, self.services.database_url, self.worker_id),
            what="LISTEN",
            patience_s=600,
        )
        presence = TrainerPresence(self.services, self.snapshot, interval_s=self.presence_seconds())
        with wakeups, presence:
            while not stop.is_set() and (max_jobs is None or ran < max_jobs):
                job = through_blips(self._reap_and_claim, what="claim", patience_s=600)
                if job is None:
                    if on_idle is not None:
                        on_idle()
                    through_blips(
                        lambda: wakeups.sleep(idle_wait, self.resident_base_id, stop),
                        what="sleep",
                        patience_s=600,
                    )
                    continue
                through_blips(functools.partial(wakeups.took, job), what="wake-up", patience_s=600)
                self.run(job, shutdown=stop)
                ran += 1
        return ran

    @property
    def jobs_done(self) -> int:
        """Runs ended since this trainer started, whatever their outcome."""
        return self.counts["succeeded"] + self.counts["failed"] + self.counts["let_go"]

    def presence_seconds(self) -> float:
        """How often the trainer registry hears from this trainer: four times a lease."""
        return quarter_of_a_lease(self.services.settings.lease_seconds)

    def snapshot(self) -> TrainerReport:
        """This trainer as the trainer registry shows it."""
        metrics = self.current[1].last_metrics if self.current else self.last_metrics
        peak_mib = metrics.get("peak_memory_mib")
        training = self.current[1].tokens_trained if self.current else 0
        return TrainerReport(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=self.started_pid,
            device=self.device,
            resident_base=self.resident_base_name,
            current_job_id=self.current[0].id if self.current else None,
            tokens_per_second=metrics.get("tokens_per_s"),
            step_seconds=metrics.get("step_s"),
            peak_memory_bytes=int(peak_mib * 2**20) if peak_mib is not None else None,
            claims=self.counts["claims"],
            succeeded=self.counts["succeeded"],
            failed=self.counts["failed"],
            let_go=self.counts["let_go"],
            tokens_trained=self.counts["tokens_trained"] + training,
        )

    def _reap_and_claim(self) -> JobRecord | None:
        self.services.queue.reap_if_due()
        return self.services.queue.claim(self.worker_id, prefer_base_model_id=self.resident_base_id)

    # -- one job ----------------------------------------------------------------------------

    def run(self, job: JobRecord, shutdown: threading.Event | None = None) -> RunOutcome:
        """Run one claimed job to an end state (or until its lease is lost); returns the status
        (or `LEASE_LOST`).

        When `shutdown` is set meanwhile, the job stops at the next step, checkpoints it and is
        handed back to the queue for another worker (status `queued`)."""
        signals = JobSignals(shutdown=shutdown or threading.Event())
        job_dir = Path(tempfile.mkdtemp(prefix=f"{job.id}-", dir=self._ensure_dir("jobs")))
        heartbeat = LeaseHeartbeat(
            self.services.queue,
            job.id,
            self.worker_id,
            signals,
            interval_s=self.heartbeat_seconds,
        )
        self.current = (job, signals)
        self.counts["claims"] += 1
        outcome: RunOutcome = LEASE_LOST
        try:
            with heartbeat:
                outcome = self._run(job, signals, job_dir)
                return outcome
        finally:
            self.current = None
            self.last_metrics = signals.last_metrics or self.last_metrics
            self.counts["tokens_trained"] += signals.tokens_trained
            self.counts[_counted_as(outcome, signals)] += 1
            shutil.rmtree(job_dir, ignore_errors=True)

    def _run(self, job: JobRecord, signals: JobSignals, job_dir: Path) -> RunOutcome:
        """Train and publish; a failure anywhere ends the job as `FAILURES` says."""
        try:
            inputs = self._inputs(job)
            result = self._train(job, inputs, signals, job_dir)
            if not result.stopped:
                return self._publish(job, inputs, result)
        except Exception as exc:
            return self._fail(job, exc)
        return self._stopped(job, signals)

    def _inputs(self, job: JobRecord) -> _JobInputs:
        hp = Hyperparameters(**job.hyperparameters)
        with self.services.engine.connect() as conn:
            base = base_catalog.get_base_model(conn, job.base_model_id)
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
        resume_prefix = checkpoint.object_prefix if checkpoint is not None else None
        return _JobInputs(hp, base, train_file, eval_file, parent, resume_prefix)

    def _train(
        self, job: JobRecord, inputs: _JobInputs, signals: JobSignals, job_dir: Path
    ) -> TrainResult:
        """The job's data and starting point fetched, then trained here on the resident base,
        or over `num_gpus` Ray Train workers."""
        store, hp = self.services.store, inputs.hp
        train_records = self._records(inputs.train_file, job_dir / "train.jsonl")
        eval_records = (
            self._records(inputs.eval_file, job_dir / "eval.jsonl") if inputs.eval_file else None
        )
        resume_dir = init_dir = None
        if inputs.resume_prefix is not None:
            resume_dir = job_dir / "resume"
            store.download_prefix(inputs.resume_prefix, resume_dir)
        elif inputs.parent is not None:
            init_dir = registry.fetch_version_files(store, inputs.parent, job_dir / "init")
            parent_id = inputs.parent.model_id
            self._event(job, f"Continuing from {parent_id}", {"parent": parent_id})
        if hp.num_gpus > 1:
            # Ray Train's workers load the base themselves: the one resident here stays as it is.
            self._event(
                job, f"Training on {hp.num_gpus} Ray Train workers", {"workers": hp.num_gpus}
            )
            return train_on_ray_train(
                self.services,
                self.worker_id,
                job,
                inputs.base,
                hp,
                train_records,
                eval_records,
                job_dir / "out",
                resume_dir=resume_dir,
                init_dir=init_dir,
                heartbeat_seconds=self.heartbeat_seconds,
            )
        return train_adapter(
            self._resident_base(job, inputs.base, hp),
            train_records,
            eval_records,
            hp,
            job_hooks(self.services, job, signals),
            job_dir / "out",
            resume_dir,
            init_dir,
        )

    def _publish(self, job: JobRecord, inputs: _JobInputs, result: TrainResult) -> RunOutcome:
        assert result.adapter_dir is not None
        lineage = build_lineage(
            job,
            inputs.base,
            inputs.hp,
            inputs.train_file,
            inputs.eval_file,
            result,
            inputs.parent,
        )
        published = registry.publish_job_adapter(
            self.services,
            job=job,
            worker_id=self.worker_id,
            adapter_dir=result.adapter_dir,
            lineage=lineage,
            metrics=lineage["metrics"],
        )
        return JobStatus.SUCCEEDED if published is not None else LEASE_LOST

    def _stopped(self, job: JobRecord, signals: JobSignals) -> RunOutcome:
        """A job stopped before its end: its lease lost, handed back, or cancelled."""
        queue = self.services.queue
        if signals.lease_lost.is_set():
            return LEASE_LOST
        if signals.handing_back():
            reason = (
                f"worker {self.worker_id} is shutting down"
                if signals.shutdown.is_set()
                else f"asked to; stopped by {self.worker_id} with a checkpoint"
            )
            handed = queue.hand_back(job.id, self.worker_id, reason=reason)
            return handed.status if handed else LEASE_LOST
        cancelled = queue.finish_cancelled(job.id, self.worker_id)
        return cancelled.status if cancelled else LEASE_LOST

    def _fail(self, job: JobRecord, exc: Exception) -> RunOutcome:
        """End the job for `exc` with its code, for good or for another attempt (`FAILURES`).

        A database that stayed away past the trainer's patience is the platform's fault, not
        the job's: the job is left to its lease (expired by now, or soon), and the reaper hands
        it back as an interruption, with its attempt and from its newest checkpoint."""
        if isinstance(exc, DATABASE_ERRORS):
            log.warning(
                "job %s: the database stayed unavailable (%s); leaving the job to its lease",
                job.id,
                first_line(exc),
            )
            return LEASE_LOST
        self._mark_failed()
        known = failure_of(exc)
        if known is None:
            log.exception("job %s failed on %s", job.id, self.worker_id)
            code, retryable, message = "worker_error", True, f"{type(exc).__name__}: {exc}"
        else:
            (code, retryable), message = known, str(exc)
        failed = through_blips(
            lambda: self.services.queue.fail(
                job.id, self.worker_id, code=code, message=message, retryable=retryable
            ),
            what=f"job {job.id} failure",
        )
        return failed.status if failed else LEASE_LOST

    def _mark_failed(self) -> None:
        """The job in hand ends through a failure: counted as `failed` whatever its status."""
        if self.current is not None:
            self.current[1].failed = True

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
            self.resident_base_name = None
        started = time.monotonic()
        path = materialize_base(self.services.store, self.cache, base)
        self.resident = ResidentBase.load(path, precision=hp.precision)
        self.resident_base_id = base.id
        self.resident_base_name = base.name
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

    # -- data and events -----------------------------------------------------------------------

    def _records(self, record: FileRecord, local: Path) -> list[dict[str, Any]]:
        self.services.store.download_to(record.object_key, local, expected_sha256=record.sha256)
        with local.open("rb") as fh:
            return list(iter_examples(fh))

    def _event(self, job: JobRecord, message: str, data: dict[str, Any]) -> None:
        record_event(self.services, job.id, "log", message, data)

    def _ensure_dir(self, name: str) -> Path:
        path = self.work_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
