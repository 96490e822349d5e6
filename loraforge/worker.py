"""`loraforge worker`: this node's trainer actors, kept running until the process is stopped.

A trainer actor that dies (its process killed, out of memory, an error that escapes the runner)
is replaced by a new one after a backoff (1 s, doubling to 30 s; reset once a trainer has run
for a minute), with one log line that says why. Its job, whose lease the dead actor no longer
renews, goes back to the queue when the lease expires and is resumed from its newest checkpoint
by whichever trainer claims it. SIGTERM or Ctrl-C stops the trainers: a running job stops at its
next step, checkpoints it and goes back to the queue at once.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from control_plane.messages import first_line
from control_plane.settings import Settings
from loraforge.supervise import RestartBackoff, stop_on_sigterm
from workers.actor import start_trainer, trainer_count

log = logging.getLogger("loraforge.worker")


@dataclass
class TrainerSlot:
    """One trainer of this node and its current actor (replaced when it dies)."""

    index: int
    actor: Any
    generation: int = 0
    started_at: float = 0.0
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    restart_at: float | None = None


def _why(ref: Any) -> str:
    try:
        ray.get(ref)
    except ray.exceptions.RayError as exc:
        return first_line(exc)
    return "its loop returned"


def run_worker(settings: Settings, database_url: str, *, count: int | None = None) -> int:
    """Run and supervise `count` trainers (one per GPU, or one) until interrupted."""
    slots = [
        TrainerSlot(
            index, start_trainer(settings, database_url, index), started_at=time.monotonic()
        )
        for index in range(count or trainer_count())
    ]
    # `ray.init` (in the first `start_trainer`) installs Ray's own SIGTERM handler, which ends
    # the process at once: take SIGTERM back, so that it stops the trainers as Ctrl-C does and
    # their jobs are handed back (Kubernetes, `loraforge up`).
    stop_on_sigterm()
    loops = {slot.actor.run.remote(): slot for slot in slots}
    print(f"{len(slots)} trainer(s) running; Ctrl-C stops them", flush=True)
    try:
        while True:
            if loops:
                ready, _ = ray.wait(list(loops), num_returns=1, timeout=1.0)
            else:  # every trainer is waiting out its backoff
                ready = []
                time.sleep(1.0)
            now = time.monotonic()
            for ref in ready:
                slot = loops.pop(ref)
                delay = slot.backoff.next_delay(now - slot.started_at)
                slot.restart_at = now + delay
                message = (
                    f"loraforge worker: trainer {slot.index} stopped ({_why(ref)}); "
                    f"starting a new one in {delay:.0f} s"
                )
                log.warning(message)
                print(message, file=sys.stderr, flush=True)
            for slot in slots:
                if slot.restart_at is not None and now >= slot.restart_at:
                    slot.generation += 1
                    slot.actor = start_trainer(
                        settings, database_url, slot.index, generation=slot.generation
                    )
                    slot.started_at, slot.restart_at = now, None
                    loops[slot.actor.run.remote()] = slot
    except KeyboardInterrupt:
        # A running job stops at its next step, checkpoints it and goes back to the queue at once.
        live = list(loops.values())
        try:
            ray.get([slot.actor.stop.remote() for slot in live], timeout=10)
            ray.wait(list(loops), num_returns=len(loops), timeout=15)
        except ray.exceptions.RayError:
            pass  # an actor that died meanwhile has nothing to hand back
    finally:
        ray.shutdown()
    return 0
