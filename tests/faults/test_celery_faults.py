"""Celery through a database outage (its broker is the database in the embedded default and on
a cluster without Redis): a bounded log, no traceback storm, and work again without a restart."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from loraforge import broker
from tests.faults.harness import loraforge_child, platform_env, wait_for
from tests.faults.tcp_proxy import CuttableProxy

pytestmark = [pytest.mark.faults, pytest.mark.slow]

OUTAGE_S = 20
# What celery may write in OUTAGE_S seconds of outage: one "lost" warning and a few reconnect
# tries with backoff (about 600 bytes each); before loraforge.broker it wrote ~260 KB.
LOG_BOUND_BYTES = 6_000


@pytest.fixture
def celery_worker(proxied_url: str, tmp_path: Path) -> Iterator[Path]:
    """`loraforge celery worker` whose database (and so broker) is behind the proxy."""
    env = platform_env(tmp_path / "home", 0, LORAFORGE_DATABASE_URL=proxied_url)
    log_path = tmp_path / "celery.log"
    args = ["celery", "worker", "--pool=solo", "-l", "info"]
    with loraforge_child(args, env, log_path) as process:
        wait_for("celery connected", lambda: b"Connected to" in log_path.read_bytes(), 60)
        wait_for("celery ready", lambda: b"ready." in log_path.read_bytes(), 60)
        yield log_path
        assert process.poll() is None, "celery exited:\n" + log_path.read_text()


def _stale_trainer(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO trainers (id, host, pid, device, last_heartbeat_at) "
                "VALUES ('t-old', 'node', 1, 'cpu', now() - interval '2 days')"
            )
        )


def _trainer_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT id FROM trainers")).scalars())


def test_celery_logs_a_bounded_rate_through_a_database_outage_and_works_after_it(
    database_url: str, engine: Engine, proxy: CuttableProxy, celery_worker: Path
) -> None:
    before = os.path.getsize(celery_worker)
    proxy.cut()
    time.sleep(OUTAGE_S)
    during = celery_worker.read_bytes()[before:]
    proxy.restore()

    assert len(during) <= LOG_BOUND_BYTES, during.decode(errors="replace")
    assert b"Traceback" not in during and b"RestartFreqExceeded" not in during
    assert b"Trying again in" in during  # it says what it does: backing off, not dead

    # Back up: the same worker consumes again, with no restart.
    wait_for(
        "celery reconnected", lambda: celery_worker.read_bytes().count(b"Connected to") >= 2, 60
    )
    _stale_trainer(engine)
    broker.register()
    producer = Celery("probe", broker=f"{broker.SCHEME}+{database_url}")
    producer.send_task("loraforge.forget_gone_trainers")
    wait_for("the task run after the outage", lambda: "t-old" not in _trainer_ids(engine), 60)


@pytest.mark.parametrize(
    ("call", "cut_before"),
    [
        ("_get", "FROM kombu_message"),  # a poll between its two queries
        ("_get", "FROM kombu_queue"),
        ("_put", "FROM kombu_queue"),  # a publish (a task sent, a message handed back)
        ("_size", "FROM kombu_queue"),  # a queue's size (celery declaring its queue)
    ],
)
def test_a_call_cut_mid_way_is_a_connection_error_and_the_same_channel_works_after_it(
    proxied_url: str, proxy: CuttableProxy, call: str, cut_before: str
) -> None:
    """The database going away under one of the channel's calls. kombu's poll cut after it found
    its queue raised `PendingRollbackError` from its `finally: commit()`, which celery does not
    count as a lost connection, so the worker exited ("Unrecoverable error"); a call cut at its
    first query left the session failed, so the channel's next call raised it. It must be a
    connection error that celery reconnects after, and the same channel must work once the
    database is back, the cut call having changed nothing."""
    broker.register()
    connection = Connection(f"{broker.SCHEME}+{proxied_url}")
    channel = connection.default_channel
    channel._put("probe", {"n": 1})
    engine, _ = channel._open()
    armed = [True]

    def cut_before_the_query(*args: object) -> None:
        if armed[0] and cut_before in str(args[2]):
            armed[0] = False
            proxy.cut()

    event.listen(engine, "before_cursor_execute", cut_before_the_query)
    calls = {
        "_get": lambda: channel._get("probe"),
        "_put": lambda: channel._put("probe", {"n": 2}),
        "_size": lambda: channel._size("probe"),
    }
    try:
        with pytest.raises(connection.connection_errors):
            calls[call]()
        proxy.restore()
        assert channel._size("probe") == 1
        assert channel._get("probe") == {"n": 1}
    finally:
        event.remove(engine, "before_cursor_execute", cut_before_the_query)
        connection.release()
