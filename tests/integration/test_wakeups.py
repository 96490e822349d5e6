"""Idle trainers against a real PostgreSQL: a queued job wakes one sleeping trainer, never every
one, and no wake-up is lost between a trainer's empty claim and its sleep."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Engine, text

from control_plane.queue import (
    JOBS_CHANNEL,
    REOPEN_EVERY_S,
    JobQueue,
    QueueListener,
    _notify_queued,
)
from control_plane.wakeups import (
    WAKE_DUE_INTERVAL_S,
    WakeUps,
    add_sleeper,
    remove_sleeper,
    wake_channel,
    wake_due,
    wake_one,
)
from tests.factories import create_validating_job, make_base, make_file, make_tenant
from tests.faults.tcp_proxy import CuttableProxy


@pytest.fixture
def world(engine: Engine) -> dict[str, str]:
    tenant = make_tenant(engine, "acme", max_running_jobs=1000)
    base = make_base(engine)
    other = make_base(engine, "other-llama")
    file = make_file(engine, tenant.id)
    return {"tenant": tenant.id, "base": base.id, "other": other.id, "file": file.id}


def _wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _sleepers(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(
            conn.execute(text("SELECT worker_id FROM queue_sleepers ORDER BY since")).scalars()
        )


def _succeeded(engine: Engine, job_id: str) -> bool:
    with engine.connect() as conn:
        status = conn.execute(text("SELECT status FROM jobs WHERE id = :id"), {"id": job_id})
        return status.scalar() == "succeeded"


class Trainer(threading.Thread):
    """A trainer's loop as `JobRunner.run_forever` runs it (claim; on nothing, sleep; on a job,
    `took`), each job completed at once; counting its claims."""

    def __init__(self, engine: Engine, url: str, name: str, idle_wait: float = 60.0) -> None:
        super().__init__(daemon=True)
        self.queue = JobQueue(engine, max_running_per_tenant=1000)
        self.wakeups = WakeUps(engine, url, name)
        self.name, self.idle_wait = name, idle_wait
        self.claims = 0
        self.taken: list[str] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def run(self) -> None:
        try:
            with self.wakeups:
                while not self.stop.is_set():
                    job = self.queue.claim(self.name)
                    self.claims += 1
                    if job is None:
                        self.wakeups.sleep(self.idle_wait, None)
                        continue
                    self.wakeups.took(job)
                    self.taken.append(job.id)
                    assert self.queue.complete(job.id, self.name) is not None
        except BaseException as exc:
            self.errors.append(exc)


@pytest.fixture
def trainers(engine: Engine, database_url: str) -> Iterator[list[Trainer]]:
    """Four trainers, each asleep (registered, its claim after registering made)."""
    started = [Trainer(engine, database_url, f"t{n}") for n in range(4)]
    for trainer in started:
        trainer.start()
    _wait_for(
        lambda: len(_sleepers(engine)) == 4 and all(t.claims == 2 for t in started),
        "four trainers asleep",
    )
    yield started
    for trainer in started:
        trainer.stop.set()
    for _ in started:
        wake_one(engine, None)  # out of its wait, each finds `stop` set
    for trainer in started:
        trainer.join(10)
        assert not trainer.errors, trainer.errors


def test_a_queued_job_wakes_one_sleeping_trainer_not_every_one(
    engine: Engine, world: dict[str, str], trainers: list[Trainer]
) -> None:
    queue = JobQueue(engine)
    for n in range(6):
        before = sum(t.claims for t in trainers)
        job_id = create_validating_job(engine, world["tenant"], world["base"], world["file"])
        queue.mark_queued(job_id)
        _wait_for(functools.partial(_succeeded, engine, job_id), f"job {n} run")
        # The woken trainer claimed it, completed it, found nothing, registered and looked once
        # more: three claims, whatever the number of trainers asleep. (Its look after
        # registering is counted once that claim returns, after its row is seen: waited for.)
        _wait_for(
            lambda before=before: (
                len(_sleepers(engine)) == 4 and sum(t.claims for t in trainers) - before >= 3
            ),
            "the woken trainer asleep again",
        )
        time.sleep(0.3)  # claims of trainers woken wrongly would land here
        assert sum(t.claims for t in trainers) - before == 3
    taken = [j for t in trainers for j in t.taken]
    assert len(taken) == len(set(taken)) == 6
    # The sleeper idle longest is woken first: each job went to another trainer.
    assert sorted(len(t.taken) for t in trainers) == [1, 1, 2, 2]


def test_a_job_wakes_a_sleeper_holding_its_base_then_one_holding_none_then_the_longest_idle(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    base, other = world["base"], world["other"]
    names = ("holds-other", "holds-none", "holds-base")
    for name, resident in zip(names, (other, None, base), strict=True):
        assert add_sleeper(engine, name, resident, 60) is False
    listeners = {n: QueueListener(database_url, channels=(wake_channel(n),)) for n in names}
    fallback = QueueListener(database_url, channels=(JOBS_CHANNEL,))
    try:
        assert [wake_one(engine, base) for _ in names] == [
            "holds-base",
            "holds-none",
            "holds-other",
        ]
        for name in names:
            assert listeners[name].wait(5) == [(wake_channel(name), base)]
        assert fallback.drain() == []
        assert _sleepers(engine) == []
        # No sleeper: the broadcast channel, as before (for a listener that does not sleep).
        assert wake_one(engine, base) is None
        assert fallback.wait(5) == [(JOBS_CHANNEL, base)]
    finally:
        for listener in (*listeners.values(), fallback):
            listener.close()


def test_a_registration_waits_for_an_enqueuer_that_looked_for_sleepers_before_it(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    """The lost wake-up: a job queued after a trainer's empty claim but before it registered
    found no sleeper. Its registration waits for that job to commit, so the claim after it
    sees the job."""
    job_id = create_validating_job(engine, world["tenant"], world["base"], world["file"])
    queue = JobQueue(engine)
    assert queue.claim("t1") is None
    registered = threading.Event()
    with WakeUps(engine, database_url, "t1") as wakeups:
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE jobs SET status = 'queued', run_after = now() WHERE id = :id"),
                {"id": job_id},
            )
            _notify_queued(conn, world["base"])  # no sleeper yet
            register = threading.Thread(
                target=lambda: (wakeups.sleep(60, None), registered.set()), daemon=True
            )
            register.start()
            assert not registered.wait(0.5), "registered while a job that missed it was uncommitted"
        assert registered.wait(10)
        register.join(10)
        claimed = queue.claim("t1")
        assert claimed is not None and claimed.id == job_id
        wakeups.took(claimed)
    assert _sleepers(engine) == []


def test_a_trainer_that_took_a_job_after_its_row_was_taken_passes_the_wake_up_on(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    queue = JobQueue(engine)
    first_id = create_validating_job(engine, world["tenant"], world["base"], world["file"])
    second_id = create_validating_job(engine, world["tenant"], world["base"], world["file"])
    with WakeUps(engine, database_url, "t1") as t1, WakeUps(engine, database_url, "t2") as t2:
        t1.sleep(60, None)
        t2.sleep(60, None)
        assert _sleepers(engine) == ["t1", "t2"]
        # The first job wakes t1, which claims it (before it ever waited) ...
        queue.mark_queued(first_id)
        assert _sleepers(engine) == ["t2"]
        claimed = queue.claim("t1")
        assert claimed is not None and claimed.id == first_id
        t1.took(claimed)
        # ... and, its row taken without its wait, wakes t2 for whatever that job was.
        assert _sleepers(engine) == []
        t2.sleep(5, None)
        assert t2.wakes == 1 and not t2.asleep

        # A trainer whose row still stood when it claimed passes nothing on.
        t1.sleep(60, None)
        t2.sleep(60, None)
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE jobs SET status = 'queued', run_after = now() WHERE id = :id"),
                {"id": second_id},
            )
        claimed = queue.claim("t1")
        assert claimed is not None and claimed.id == second_id
        t1.took(claimed)
        assert _sleepers(engine) == ["t2"]
        assert t2.listener.wait(0.3) == []


def test_a_wait_that_times_out_stands_again_and_owes_a_wake_up_taken_meanwhile(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    """A sleeper's wake-up that never arrives (its listener reconnected): the timed-out wait
    finds its row gone, and the job it then claims passes a wake-up on."""
    queue = JobQueue(engine)
    job_id = create_validating_job(engine, world["tenant"], world["base"], world["file"])
    with WakeUps(engine, database_url, "t1") as t1, WakeUps(engine, database_url, "t2") as t2:
        t1.sleep(0.2, None)
        queue.mark_queued(job_id)  # takes t1's row
        t1.listener.close()  # ... and its notification is lost with the connection
        t2.sleep(60, None)
        t1.sleep(0.2, None)  # times out, registers again
        assert t1.owed and _sleepers(engine) == ["t2", "t1"]
        claimed = queue.claim("t1")
        assert claimed is not None and claimed.id == job_id
        t1.took(claimed)
        assert t2.listener.wait(5) == [(wake_channel("t2"), world["base"])]
        assert _sleepers(engine) == []


def test_a_stale_sleeper_is_not_woken_and_the_reaper_deletes_it(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    add_sleeper(engine, "gone", world["base"], 60)
    add_sleeper(engine, "here", None, 60)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE queue_sleepers SET stale_after = now() - interval '1 s' "
                "WHERE worker_id = 'gone'"
            )
        )
    assert wake_one(engine, world["base"]) == "here"
    assert _sleepers(engine) == ["gone"]
    JobQueue(engine).reap_expired_leases()
    assert _sleepers(engine) == []


def test_a_trainer_that_stops_leaves_the_sleepers_and_passes_on_a_wake_up_taken(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    with WakeUps(engine, database_url, "t3") as t3, WakeUps(engine, database_url, "t2") as t2:
        t3.sleep(60, None)
        t2.sleep(60, None)
        with WakeUps(engine, database_url, "t1") as t1:
            t1.sleep(60, None)
        assert _sleepers(engine) == ["t3", "t2"]  # t1 left, waking no one
        assert t2.listener.wait(0.3) == []
        assert wake_one(engine, world["base"]) == "t3"
        # t3 stops with its row taken and the wake-up unused: it passes it on, to t2.
        t3.close()
        assert t2.listener.wait(5) == [(wake_channel("t2"), "")]
        assert _sleepers(engine) == []
        assert not remove_sleeper(engine, "t2")


def test_every_job_of_a_burst_runs_once_though_fewer_trainers_sleep(
    engine: Engine, world: dict[str, str], trainers: list[Trainer]
) -> None:
    """20 jobs queued at once wake the four sleepers; trainers that finish a job claim the next
    without a wake-up, so none is left queued."""
    ids = [
        create_validating_job(engine, world["tenant"], world["base"], world["file"])
        for _ in range(20)
    ]
    queue = JobQueue(engine)
    for job_id in ids:
        queue.mark_queued(job_id)
    _wait_for(lambda: all(_succeeded(engine, j) for j in ids), "the burst run")
    taken = [j for t in trainers for j in t.taken]
    assert sorted(taken) == sorted(ids)


@pytest.mark.parametrize("backoff", [0, 60])
def test_a_job_requeued_to_back_off_wakes_no_one_until_it_is_due(
    engine: Engine, database_url: str, world: dict[str, str], backoff: int
) -> None:
    queue = JobQueue(engine, retry_backoff_seconds=backoff)
    job_id = create_validating_job(engine, world["tenant"], world["base"], world["file"])
    queue.mark_queued(job_id)
    assert queue.claim("t1") is not None
    with WakeUps(engine, database_url, "t2") as t2:
        t2.sleep(60, None)
        failed = queue.fail(job_id, "t1", code="oom", message="out of memory")
        assert failed is not None and failed.status == "queued"
        if backoff:
            assert _sleepers(engine) == ["t2"]  # a claim now would find nothing
            assert t2.listener.wait(0.3) == []
        else:
            assert _sleepers(engine) == []
            assert t2.listener.wait(5) == [(wake_channel("t2"), world["base"])]


def _backed_off(engine: Engine, world: dict[str, str], backoff: float) -> str:
    """A job run once and failed: queued again, to run `backoff` seconds from now."""
    queue = JobQueue(engine, retry_backoff_seconds=backoff)
    job_id = create_validating_job(engine, world["tenant"], world["base"], world["file"])
    queue.mark_queued(job_id)
    assert queue.claim("earlier") is not None
    failed = queue.fail(job_id, "earlier", code="oom", message="out of memory")
    assert failed is not None and failed.status == "queued"
    return job_id


def _queue_unannounced(engine: Engine, job_id: str) -> None:
    """Queue the job, ready, without the wake-up that queueing it sends (a lost wake-up)."""
    with engine.begin() as conn:
        conn.execute(
            text("UPDATE jobs SET status = 'queued', run_after = now() WHERE id = :id"),
            {"id": job_id},
        )


def _due(engine: Engine, job_id: str) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text("SELECT run_after <= now() FROM jobs WHERE id = :id"), {"id": job_id}
            ).scalar_one()
        )


def test_a_job_that_backed_off_wakes_one_sleeper_once_it_is_due(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    # Due in 3 s: two listeners and two sleepers are set up before the pass that must find it
    # not due yet, on a busy machine too.
    job_id = _backed_off(engine, world, 3.0)
    with WakeUps(engine, database_url, "t2") as t2, WakeUps(engine, database_url, "t3") as t3:
        t2.sleep(60, None)
        t3.sleep(60, None)
        assert wake_due(engine) == 0  # not due yet, and no other job is queued
        assert _sleepers(engine) == ["t2", "t3"]
        assert t2.listener.wait(0.2) == []
        _wait_for(functools.partial(_due, engine, job_id), "the job due")
        assert wake_due(engine) == 1
        assert t2.listener.wait(5) == [(wake_channel("t2"), world["base"])]
        assert _sleepers(engine) == ["t3"]
        claimed = JobQueue(engine).claim("t2")
        assert claimed is not None and claimed.id == job_id
        # Announced once: the next pass's window starts after it, and nothing is queued.
        assert wake_due(engine) == 0
        assert t3.listener.wait(0.3) == []
        assert _sleepers(engine) == ["t3"]


def test_two_passes_at_once_announce_each_due_job_once(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    ids = [_backed_off(engine, world, 0.5) for _ in range(3)]
    for n in range(3):
        add_sleeper(engine, f"s{n}", None, 60)
    _wait_for(lambda: all(_due(engine, j) for j in ids), "the jobs due")
    second: list[int] = []
    with engine.begin() as conn:
        assert conn.execute(text("SELECT queue_wake_due()")).scalar_one() == 3
        waiting = threading.Thread(target=lambda: second.append(wake_due(engine)), daemon=True)
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive(), "a second pass ran while the first was uncommitted"
    waiting.join(10)
    # After the first committed, the second found its window empty (and every sleeper woken).
    assert second == [0]
    assert _sleepers(engine) == []


def test_a_pass_without_its_row_puts_it_back(engine: Engine, world: dict[str, str]) -> None:
    """A database restored without `queue_due_passes`' row: the first pass stamps a new one,
    and the next announces nothing again (with no one asleep, each announcement is the
    broadcast)."""
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM queue_due_passes"))
    job_id = _backed_off(engine, world, 0.2)
    _wait_for(functools.partial(_due, engine, job_id), "the job due")
    assert wake_due(engine) == 1
    assert wake_due(engine) == 0


def test_a_ready_job_no_wake_up_reached_wakes_one_sleeper_a_pass(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    """The safety net: a job queued without a wake-up (here, written directly) is announced to
    one sleeper a pass while it waits; with no sleeper or no such job, a pass wakes no one."""
    job_id = create_validating_job(engine, world["tenant"], world["base"], world["file"])
    _queue_unannounced(engine, job_id)
    assert wake_due(engine) == 0  # no sleeper
    with WakeUps(engine, database_url, "t1") as t1, WakeUps(engine, database_url, "t2") as t2:
        t1.sleep(60, None)
        t2.sleep(60, None)
        assert wake_due(engine) == 1
        assert t1.listener.wait(5) == [(wake_channel("t1"), world["base"])]
        assert wake_due(engine) == 1  # still queued: the next sleeper
        assert t2.listener.wait(5) == [(wake_channel("t2"), world["base"])]
        assert wake_due(engine) == 0
        claimed = JobQueue(engine).claim("t1")
        assert claimed is not None and claimed.id == job_id
        t1.took(claimed)
        t1.sleep(60, None)  # stands again
        assert wake_due(engine) == 0  # nothing queued
        assert _sleepers(engine) == ["t1"]


def test_the_net_wakes_no_one_for_a_job_waiting_for_its_tenants_limit(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    tenant = make_tenant(engine, "capped", max_running_jobs=1)
    file_id = make_file(engine, tenant.id).id
    queue = JobQueue(engine)
    first, second = (
        create_validating_job(engine, tenant.id, world["base"], file_id) for _ in range(2)
    )
    queue.mark_queued(first)
    assert queue.claim("busy") is not None
    _queue_unannounced(engine, second)  # behind its tenant's limit
    with WakeUps(engine, database_url, "t1") as t1:
        t1.sleep(60, None)
        assert wake_due(engine) == 0
        assert t1.listener.wait(0.3) == []
        # The running job ends, its trainer gone with it (it claims nothing after): the job
        # behind it is claimable now, and the next pass wakes a sleeper for it.
        assert queue.complete(first, "busy") is not None
        assert wake_due(engine) == 1
        assert t1.listener.wait(5) == [(wake_channel("t1"), world["base"])]


def test_a_trainer_polling_rarely_runs_a_retry_the_pass_announces(
    engine: Engine, database_url: str, world: dict[str, str]
) -> None:
    """A trainer asleep for 120 s between polls runs a job that backed off 3 s, within seconds
    of its being due: only the pass (as celery's beat runs it) can have woken it."""
    job_id = _backed_off(engine, world, 3.0)
    trainer = Trainer(engine, database_url, "rare", idle_wait=120)
    trainer.start()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.25):
            wake_due(engine)

    passes = threading.Thread(target=beat, daemon=True)
    try:
        _wait_for(lambda: _sleepers(engine) == ["rare"] and trainer.claims == 2, "asleep")
        assert not _due(engine, job_id)
        passes.start()
        _wait_for(functools.partial(_succeeded, engine, job_id), "the retry run", timeout=30)
        assert trainer.taken == [job_id]
        _wait_for(lambda: _sleepers(engine) == ["rare"] and trainer.claims == 5, "asleep again")
        time.sleep(0.6)  # passes go on: with nothing queued, they wake no one
        assert trainer.claims == 5
    finally:
        stop.set()
        passes.join(10)
        trainer.stop.set()
        wake_one(engine, None)
        trainer.join(10)
    assert not trainer.errors, trainer.errors


def test_beat_runs_the_pass_every_few_seconds() -> None:
    from loraforge.tasks import celery_app

    entry = next(
        e for e in celery_app.conf.beat_schedule.values() if e["task"] == "loraforge.wake_due_jobs"
    )
    assert entry["task"] in celery_app.tasks
    assert entry["schedule"] == WAKE_DUE_INTERVAL_S <= 5


@pytest.mark.faults
def test_a_listener_cut_off_from_the_database_tries_again_every_few_seconds_not_every_slice(
    engine: Engine, proxied_url: str, proxy: CuttableProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A sleeping trainer waits in 1 s slices (to see its stop); through an outage its lost
    LISTEN connection is reopened, and the loss logged, once every REOPEN_EVERY_S, not once a
    slice, and it hears its channel again once the database is back."""
    listener = QueueListener(proxied_url, channels=(wake_channel("cut"),))
    try:
        proxy.cut()
        with caplog.at_level("WARNING", logger="control_plane.queue"):
            started = time.monotonic()
            while time.monotonic() - started < REOPEN_EVERY_S - 1:
                assert listener.wait(0.5) == []
        lost = [r for r in caplog.records if "LISTEN connection lost" in r.getMessage()]
        assert len(lost) == 1, [r.getMessage() for r in lost]
        proxy.restore()
        # Its next reopen is due REOPEN_EVERY_S after the loss it logged, however late that came.
        time.sleep(max(lost[0].created + REOPEN_EVERY_S + 1 - time.time(), 0))
        assert listener.wait(0.1) == []  # reopened (listening again)
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_notify(:ch, 'back')"), {"ch": wake_channel("cut")})
        assert listener.wait(5) == [(wake_channel("cut"), "back")]
    finally:
        listener.close()
