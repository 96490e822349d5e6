"""How an idle trainer sleeps: woken alone, by a job queued for it, not with every other.

A job queued takes one sleeper out of `queue_sleepers` and notifies that trainer's own channel
(revision 0017's `queue_wake`, run where the job is queued: `control_plane.queue`). A trainer
that claimed nothing calls `WakeUps.sleep` between its claims:

- the first call after an empty claim puts the trainer among the sleepers and returns at once,
  and the trainer claims once more: a job queued between its empty claim and its registration
  looked for sleepers before there was one, and the registration waited for that job's
  transaction to commit (the sleepers' advisory lock), so this claim sees it;
- the next call waits on the trainer's channel until a job wakes it (its row taken out) or
  `timeout` passes (the row refreshed, then the trainer claims again: the poll that bounds how
  long any missed wake-up can cost: `IDLE_POLL_S` by default).

No one wakes for a job requeued to back off (a retry) when it is requeued; `wake_due`, run by
celery's beat every `WAKE_DUE_INTERVAL_S` (revision 0018's `queue_wake_due`), wakes a trainer for
it once it is due, and one trainer when a ready job waits that no wake-up reached. With beat
running, the poll only bounds a lost wake-up where beat does not run, so it can be long.

A trainer that claimed a job calls `WakeUps.took`: it leaves the sleepers, and when a job had
taken its row without its waking for it, it passes one wake-up on, since that job may be another
than the one it claimed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

import sqlalchemy.exc
from sqlalchemy import Engine, text

from control_plane.queue import QueueListener
from control_plane.records import JobRecord

log = logging.getLogger(__name__)

# How long an idle trainer waits for a wake-up before it claims anyway (its poll).
IDLE_POLL_S = 30.0

# How often celery's beat runs `wake_due` (`loraforge.tasks`): the most a job that backed off
# waits past its time for a trainer asleep.
WAKE_DUE_INTERVAL_S = 2.0

# How soon a sleeping trainer sees that it was asked to stop (its wait is cut in slices this long).
STOP_CHECK_S = 1.0

# How long a sleeper's row stands past the wait it was refreshed for: a trainer gone without
# removing its row stops being woken once its row is this stale (the reaper then deletes it).
STALE_GRACE_S = 10.0


def wake_channel(worker_id: str) -> str:
    """The channel a trainer sleeps on: its own, a valid identifier whatever its id holds."""
    return "loraforge_wake_" + hashlib.sha256(worker_id.encode()).hexdigest()[:32]


def add_sleeper(
    engine: Engine, worker_id: str, resident_base_id: str | None, patience_s: float
) -> bool:
    """Put (or keep) the trainer among the sleepers, its row standing `patience_s`; committed
    after every enqueuer that looked for sleepers before. Whether its earlier row was still
    there (False: a job took it out, or it had none)."""
    with engine.begin() as conn:
        return bool(
            conn.execute(
                text("SELECT queue_sleep(:worker, :channel, :base, :patience)"),
                {
                    "worker": worker_id,
                    "channel": wake_channel(worker_id),
                    "base": resident_base_id,
                    "patience": patience_s,
                },
            ).scalar()
        )


def remove_sleeper(engine: Engine, worker_id: str) -> bool:
    """Take the trainer out of the sleepers; whether its row was still there."""
    with engine.begin() as conn:
        return (
            conn.execute(
                text("DELETE FROM queue_sleepers WHERE worker_id = :worker RETURNING 1"),
                {"worker": worker_id},
            ).first()
            is not None
        )


def wake_one(engine: Engine, base_model_id: str | None) -> str | None:
    """Wake one sleeper as a job for this base would (any base: None); the trainer woken (None:
    none slept, and `loraforge_jobs` was notified)."""
    with engine.begin() as conn:
        woken = conn.execute(text("SELECT queue_wake(:base)"), {"base": base_model_id}).scalar()
    return str(woken) if woken is not None else None


def wake_due(engine: Engine) -> int:
    """Wake a trainer for each job that backed off and came due since the last call (anyone's),
    or, when none did, one trainer if a ready job is queued; the wake-ups sent."""
    with engine.begin() as conn:
        return int(conn.execute(text("SELECT queue_wake_due()")).scalar_one())


class WakeUps:
    """One trainer's sleep between empty claims (the module says how): its listener on its own
    channel, and whether it stands among the sleepers."""

    def __init__(self, engine: Engine, database_url: str, worker_id: str) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.listener = QueueListener(database_url, channels=(wake_channel(worker_id),))
        self.asleep = False  # its row stands (as far as it knows)
        self.owed = False  # a job took its row while it was not waiting for it
        self.wakes = 0  # wake-ups received (what tests read)

    def sleep(
        self,
        timeout: float,
        resident_base_id: str | None,
        stop: threading.Event | None = None,
    ) -> None:
        """After an empty claim: register and return (claim again), or wait for a wake-up (or
        `stop`, seen within STOP_CHECK_S)."""
        self.owed = False  # the claim found nothing a wake-up taken could have been for
        if not self.asleep:
            self.listener.drain()  # wake-ups meant for an earlier sleep
            add_sleeper(self.engine, self.worker_id, resident_base_id, self._patience(timeout))
            self.asleep = True
            return
        if self._wait(timeout, stop):
            self.asleep = False  # the job that woke it took its row out
            self.wakes += 1
            return
        if stop is not None and stop.is_set():
            return  # stopping: `close` leaves the sleepers
        # The wait timed out: stand again, and claim (a poll). A row gone here was taken by a
        # job whose wake-up has not arrived (a listener reconnecting loses it).
        still_there = add_sleeper(
            self.engine, self.worker_id, resident_base_id, self._patience(timeout)
        )
        self.owed = not still_there

    def _wait(self, timeout: float, stop: threading.Event | None) -> bool:
        """Whether a wake-up came within `timeout`; waiting in slices to see `stop`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0 and not (stop and stop.is_set()):
            if self.listener.wait(min(left, STOP_CHECK_S)):
                return True
        return False

    def took(self, job: JobRecord) -> None:
        """After a claim that returned `job`: leave the sleepers, passing a wake-up taken for
        another job on."""
        if self.asleep and not remove_sleeper(self.engine, self.worker_id):
            self.owed = True
        if self.owed:
            wake_one(self.engine, job.base_model_id)
        self.asleep = self.owed = False

    def close(self) -> None:
        """Leave the sleepers (a job no longer wakes a trainer that stopped), passing on a
        wake-up taken for it, and stop listening. With the database away, its row goes stale."""
        try:
            if self.asleep and not remove_sleeper(self.engine, self.worker_id):
                wake_one(self.engine, None)
            self.asleep = False
        except sqlalchemy.exc.DBAPIError as exc:
            log.warning("could not leave the sleepers (%s)", str(exc).strip()[:200])
        finally:
            self.listener.close()

    def __enter__(self) -> WakeUps:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _patience(timeout: float) -> float:
        return 2 * timeout + STALE_GRACE_S
