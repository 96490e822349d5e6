"""A claimed job's line to the platform, the same for a trainer and for rank 0 of a Ray Train job.

What both the runner (one trainer, one process) and `workers.distributed` (rank 0 of a job over
several Ray Train workers) need, written once: the heartbeat that keeps the job's lease and
brings a cancellation or a lost lease to the training loop (`LeaseHeartbeat`), the recipe's
hooks that turn training events into job events and upload checkpoints (`job_hooks`), and the
job's base fetched from the object store into the local cache (`materialize_base`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import psycopg
import sqlalchemy.exc

from control_plane import jobs, sweep_stopping, trainers
from control_plane.events import add_event
from control_plane.messages import first_line
from control_plane.queue import JobQueue
from control_plane.records import BaseModelRecord, JobRecord
from control_plane.services import Services
from control_plane.storage import ObjectStore, base_model_prefix, checkpoint_prefix
from control_plane.trainers import TrainerReport
from workers.bases.checkpoints import BaseCache, BaseModelError
from workers.training.interface import TrainHooks

log = logging.getLogger(__name__)

T = TypeVar("T")

DATABASE_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    psycopg.OperationalError,
)
"""What a database that is restarting or failing over raises: a blip, not the job's fault."""
# A sweep's evaluations left unread (the median rule then stops nothing): a blip, or no
# connection free in the pool.
UNREAD_SWEEP: tuple[type[Exception], ...] = (*DATABASE_ERRORS, sqlalchemy.exc.TimeoutError)


def through_blips(call: Callable[[], T], *, what: str, patience_s: float = 120.0) -> T:
    """`call()`, retried while the database is unreachable: backoff from 0.5 s doubling to 5 s,
    for up to `patience_s` (then the error goes up). One warning when the blip starts and one
    when it ends, not one per retry."""
    delay, deadline, notice = 0.5, time.monotonic() + patience_s, OutageNotice(what)
    while True:
        try:
            result = call()
        except DATABASE_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                raise
            notice.failed(exc)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        notice.recovered()
        return result


class OutageNotice:
    """One warning when a repeated database call starts failing and one when it works again,
    not a line (let alone a traceback) per failed try: a long outage must not flood the log."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        if not self.failing:
            log.warning("%s: database unavailable (%s); retrying", self.what, first_line(exc))
            self.failing = True

    def recovered(self) -> None:
        if self.failing:
            log.warning("%s: database back", self.what)
            self.failing = False


@dataclass
class JobSignals:
    """Set by the heartbeat (and the runner's shutdown), read by the training loop between steps."""

    cancel: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    # The runner's stop: the worker is shutting down and hands the job back.
    shutdown: threading.Event = field(default_factory=threading.Event)
    # The job was asked to pause: it stops at the next step, with a checkpoint.
    pause: threading.Event = field(default_factory=threading.Event)
    progress: float | None = None
    eta_seconds: float | None = None
    # The latest `metrics` event's data and the tokens trained so far, for the trainer registry.
    last_metrics: dict[str, Any] = field(default_factory=dict)
    tokens_trained: int = 0
    # Set when the job ends through a failure (for good or for another attempt).
    failed: bool = False

    def should_stop(self) -> bool:
        return (
            self.shutdown.is_set()
            or self.pause.is_set()
            or self.cancel.is_set()
            or self.lease_lost.is_set()
        )

    def handing_back(self) -> bool:
        """Stopping for a shutdown or a pause only: the job goes back (to the queue, or
        `paused`) with a checkpoint, to go on from it."""
        stopping = self.shutdown.is_set() or self.pause.is_set()
        return stopping and not (self.cancel.is_set() or self.lease_lost.is_set())


class _Beating:
    """A daemon thread that calls `_beat` every `interval_s` seconds while entered; leaving
    stops it and waits for it. `_on_enter` and `_on_exit` run around the thread."""

    def __init__(self, name: str, interval_s: float) -> None:
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._on_enter()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._on_exit()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self._beat():
                return

    def _beat(self) -> bool:
        """One beat; False ends the beating."""
        raise NotImplementedError

    def _on_enter(self) -> None:
        pass

    def _on_exit(self) -> None:
        pass


class LeaseHeartbeat(_Beating):
    """Renews a claimed job's lease every `interval_s` seconds from a daemon thread while it is
    entered, reporting the job's progress.

    A lost lease sets `signals.lease_lost` and ends the beating (another worker may hold the job
    now); a requested cancellation sets `signals.cancel`, a requested pause `signals.pause`. A
    beat that fails for the database is
    tried again at the next one (the lease has slack for a blip), with one warning for the whole
    outage; any other failure is logged with its traceback.
    """

    def __init__(
        self,
        queue: JobQueue,
        job_id: str,
        worker_id: str,
        signals: JobSignals,
        *,
        interval_s: float,
    ) -> None:
        super().__init__(f"heartbeat-{job_id}", interval_s)
        self.queue, self.job_id, self.worker_id, self.signals = queue, job_id, worker_id, signals
        self._notice = OutageNotice(f"heartbeat of job {job_id} by {worker_id}")

    def _beat(self) -> bool:
        signals = self.signals
        try:
            beat = self.queue.heartbeat(
                self.job_id,
                self.worker_id,
                progress=signals.progress,
                eta_seconds=signals.eta_seconds,
                trained_tokens=signals.last_metrics.get("trained_tokens"),
            )
        except DATABASE_ERRORS as exc:
            self._notice.failed(exc)
            return True
        except Exception:
            log.warning(
                "heartbeat of job %s by %s failed; retrying in %.1fs",
                self.job_id,
                self.worker_id,
                self.interval_s,
                exc_info=True,
            )
            return True
        self._notice.recovered()
        if not beat.held:
            log.warning("job %s: %s lost its lease", self.job_id, self.worker_id)
            signals.lease_lost.set()
            return False
        if beat.cancel_requested:
            signals.cancel.set()
        # A pause withdrawn before the training loop saw it lets the job go on.
        if beat.pause_requested:
            signals.pause.set()
        else:
            signals.pause.clear()
        return True


class TrainerPresence(_Beating):
    """Upserts this trainer's row in the trainer registry every `interval_s` seconds from a
    daemon thread while entered, idle or busy, with what `snapshot()` says; removes the row on
    a clean exit (a trainer that dies just goes silent and shows as gone after a lease).

    Presence is best effort: a failed report (a database blip) is one warning when the failing
    starts and one when it ends, and never touches training.
    """

    def __init__(
        self, services: Services, snapshot: Callable[[], TrainerReport], *, interval_s: float
    ) -> None:
        super().__init__("trainer-presence", interval_s)
        self.services, self.snapshot = services, snapshot
        self._notice = OutageNotice("trainer registry")

    def _on_enter(self) -> None:
        self.report_once()

    def _on_exit(self) -> None:
        try:
            with self.services.engine.begin() as conn:
                trainers.remove(conn, self.snapshot().id)
        except DATABASE_ERRORS as error:
            log.warning("trainer registry: could not remove this trainer (%s)", first_line(error))

    def report_once(self) -> bool:
        try:
            with self.services.engine.begin() as conn:
                trainers.report(conn, self.snapshot())
        except DATABASE_ERRORS as exc:
            self._notice.failed(exc)
            return False
        self._notice.recovered()
        return True

    def _beat(self) -> bool:
        self.report_once()
        return True


def record_event(
    services: Services, job_id: str, kind: str, message: str, data: dict[str, Any]
) -> None:
    """A training event as a job event (`metrics` events keep their type); waits out a
    database blip rather than failing the job."""

    def write() -> None:
        with services.engine.begin() as conn:
            add_event(
                conn, job_id, message, type="metrics" if kind == "metrics" else "message", data=data
            )

    through_blips(
        write, what=f"job {job_id} event", patience_s=services.settings.database_patience_seconds
    )


def job_hooks(services: Services, job: JobRecord, signals: JobSignals) -> TrainHooks:
    """The recipe's hooks for a claimed job: events become job events (metrics also feed the
    heartbeat's progress), checkpoints go to the object store, the signals stop the loop, and
    a worker handing the job back checkpoints first."""

    def on_event(kind: str, message: str, data: dict[str, Any]) -> None:
        if kind == "metrics":
            signals.progress = data.get("fraction_done", signals.progress)
            signals.eta_seconds = data.get("eta_s", signals.eta_seconds)
            signals.last_metrics = data
            signals.tokens_trained += int(data.get("tokens", 0))
        record_event(services, job.id, kind, message, data)

    def trails_its_sweep(step: int, lowest: float) -> tuple[str, dict[str, Any]] | None:
        """The sweep's median rule; a database that does not answer (or no connection is free)
        stops nothing."""
        try:
            with services.engine.connect() as conn:
                peers = sweep_stopping.peers_at(conn, job, step)
        except UNREAD_SWEEP:
            log.warning("job %s: its sweep unread at step %d (database); it goes on", job.id, step)
            return None
        return sweep_stopping.verdict(peers, lowest)

    return TrainHooks(
        on_event=on_event,
        should_stop=signals.should_stop,
        on_checkpoint=lambda step, directory: store_checkpoint(services, job, step, directory),
        checkpoint_on_stop=signals.handing_back,
        trails_its_sweep=trails_its_sweep,
    )


def store_checkpoint(services: Services, job: JobRecord, step: int, directory: Path) -> None:
    """Upload a checkpoint directory under the job and list it (idempotent per step)."""
    prefix = checkpoint_prefix(job.tenant_id, job.id, step)
    services.store.put_directory(prefix, directory, skip_existing=True)

    def record() -> None:
        with services.engine.begin() as conn:
            jobs.add_checkpoint(conn, job.id, step, prefix, {"step": step})

    through_blips(
        record,
        what=f"job {job.id} checkpoint {step}",
        patience_s=services.settings.database_patience_seconds,
    )


def materialize_base(store: ObjectStore, cache: BaseCache, base: BaseModelRecord) -> Path:
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

    def fetch(target: Path) -> None:
        if not store.download_prefix(prefix, target):
            raise BaseModelError(f"base {base.name}: nothing stored under {prefix}")

    return cache.get(base.sha256, fetch)
