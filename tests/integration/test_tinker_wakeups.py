"""A Tinker future's poll is answered when its call finishes, not at its next look: the call's
update notifies (revision 0033's trigger) and the API's listener (`call_wakeups`) wakes the polls
waiting on the call (`retrieve_future`) or on its sampler (`retrieve_futures`). Here the polls'
looks are 30 s apart and their holds 20 s, longer than the client waits (10 s): a poll answered
at all was woken. The listener's connection, cut, is opened again and wakes the polls after;
with `tinker_wake_on_finish` off nothing listens. Real PostgreSQL, the API on a real socket."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text

from control_plane.api import call_wakeups
from control_plane.api.routes import tinker_futures
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.integration.test_tinker_session_polls import _ask, _poll, _run_next, _scene
from tests.tinker_harness import tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def wake_on_finish() -> bool:
    return True


@pytest.fixture
def settings(tmp_path: Path, wake_on_finish: bool) -> Settings:
    return tinker_settings(tmp_path).model_copy(
        update={"tinker_retrieve_wait_seconds": 20.0, "tinker_wake_on_finish": wake_on_finish}
    )


@pytest.fixture(autouse=True)
def slow_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Looks 30 s apart: within a test, a poll looks once, then only when woken."""
    monkeypatch.setattr(tinker_futures, "FIRST_LOOK_AFTER_SECONDS", 30.0)
    monkeypatch.setattr(tinker_futures, "LOOK_AT_LEAST_EVERY_SECONDS", 30.0)
    monkeypatch.setattr(call_wakeups, "REOPEN_EVERY_S", 0.2)


def _listeners(engine: Engine) -> list[int]:
    """The backends listening for finished calls."""
    with engine.connect() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE query = 'LISTEN ' || :channel AND datname = current_database()"
                ),
                {"channel": call_wakeups.CHANNEL},
            ).scalars()
        )


def _until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + 15
    while not (found := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return found


def _readiness(url: str) -> str:
    """What `/readyz` says of this API's wake-ups."""
    return str(httpx.get(f"{url}/readyz", timeout=10).json()["wakeups"])


def _retrieve(url: str, keys: TenantKeys, future: str) -> Any:
    answered = httpx.post(
        f"{url}/api/v1/retrieve_future",
        json={"request_id": future},
        headers={"X-API-Key": "tml-" + keys.member},
        timeout=10,
    )
    assert answered.status_code == 200, answered.text
    return answered.json()


def _finished_while_polled(engine: Engine, base: str, poll: Future[Any]) -> Any:
    """Finish the next call once the poll has looked (and waits), then the poll's answer."""
    time.sleep(0.5)  # the poll's first look is done: it waits for its next
    assert not poll.done()
    assert _run_next(engine, base) is not None
    return poll.result(timeout=10)


def test_a_finished_call_wakes_its_poll_and_its_samplers_session_poll(
    live_url: str, services: Services, tenant_a: TenantKeys
) -> None:
    engine = services.engine
    base, sampler = _scene(services, tenant_a, "wake")
    _until(lambda: _listeners(engine), "the API listens")
    first = _ask(engine, tenant_a.tenant_id, sampler, 0, 0)
    second = _ask(engine, tenant_a.tenant_id, sampler, 0, 1)
    with ThreadPoolExecutor(1) as pool:
        polled = _finished_while_polled(
            engine, base, pool.submit(_poll, live_url, tenant_a, sampler, 0, timeout=20)
        )
        assert polled["completions"] == [{"state": "finished", "request_id": first}], polled
        answer = _finished_while_polled(
            engine, base, pool.submit(_retrieve, live_url, tenant_a, second)
        )
    assert answer == {"type": "sample"}, answer


def test_the_listener_opens_its_connection_again_once_cut_and_wakes_the_polls_after(
    live_url: str, services: Services, tenant_a: TenantKeys
) -> None:
    engine = services.engine
    base, sampler = _scene(services, tenant_a, "cut")
    [listener] = _until(lambda: _listeners(engine), "the API listens")
    assert _readiness(live_url) == "listening"
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": listener})
    [again] = _until(
        lambda: [pid for pid in _listeners(engine) if pid != listener], "the API listens again"
    )
    assert again != listener
    _until(lambda: _readiness(live_url) == "listening", "readiness says it listens again")
    future = _ask(engine, tenant_a.tenant_id, sampler, 0, 0)
    with ThreadPoolExecutor(1) as pool:
        answer = _finished_while_polled(
            engine, base, pool.submit(_retrieve, live_url, tenant_a, future)
        )
    assert answer == {"type": "sample"}, answer


@pytest.mark.parametrize("wake_on_finish", [False])
def test_with_wake_ups_off_nothing_listens_and_a_poll_answers_at_its_looks(
    live_url: str, services: Services, tenant_a: TenantKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = services.engine
    base, sampler = _scene(services, tenant_a, "off")
    future = _ask(engine, tenant_a.tenant_id, sampler, 0, 0)
    monkeypatch.setattr(tinker_futures, "FIRST_LOOK_AFTER_SECONDS", 0.2)
    with ThreadPoolExecutor(1) as pool:
        assert _finished_while_polled(
            engine, base, pool.submit(_retrieve, live_url, tenant_a, future)
        ) == {"type": "sample"}
    assert _listeners(engine) == []
    assert _readiness(live_url) == "off"
