"""An interactive executor killed mid-reply (a real `loraforge interactive` process, frozen with
SIGSTOP and then SIGKILLed: no clean-up, its samplers' rows still name it). A sampler's weights
are the base's or in the object store, so once its lease runs out the chat it was sampling
fails, saying so, and the chat waiting behind it on the same sampler is answered by another
executor of the base rather than failed with it (the official `openai` SDK)."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import register_test_base
from tests.faults.harness import loraforge_child, platform_env, wait_for
from tests.tinker_harness import (
    LONG_CHAT,
    SHORT_CHAT,
    openai_client,
    sample_calls,
    served_bases,
    serving_executor,
    tinker_settings,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.usefixtures("tinker_sdk_env")]

# The lease: the short chat is asked (and placed on the frozen executor's sampler, which still
# counts as alive) well within it.
LEASE_S = 8
LONG = {**LONG_CHAT, "max_completion_tokens": 900}
SHORT = SHORT_CHAT


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path).model_copy(update={"lease_seconds": LEASE_S})


@contextmanager
def executor_process(
    database_url: str, base_name: str, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`loraforge interactive --base BASE` in its own process, its text streamed every 50 ms."""
    env = platform_env(
        tmp_path / "executor-home",
        0,
        LORAFORGE_DATABASE_URL=database_url,
        LORAFORGE_CHAT_STREAM_EVERY_SECONDS="0.05",
    )
    env["LORAFORGE_LEASE_SECONDS"] = str(LEASE_S)
    log_path = tmp_path / "executor.log"
    with loraforge_child(["interactive", "--base", base_name], env, log_path) as process:
        yield process


def test_a_chat_waiting_on_a_killed_executors_sampler_is_answered_by_another_executor(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    database_url: str,
    tmp_path: Path,
) -> None:
    base = register_test_base(services.engine, "tiny-e2e")
    client = openai_client(live_url, tenant_a.member)
    streamed: list[str] = []
    raised: list[openai.APIError] = []
    short: dict[str, Any] = {}

    def long_chat() -> None:
        try:
            for chunk in client.chat.completions.create(model=base.name, stream=True, **LONG):
                streamed.extend(c.delta.content for c in chunk.choices if c.delta.content)
        except openai.APIError as exc:
            raised.append(exc)

    def short_chat() -> None:
        short["reply"] = client.chat.completions.create(model=base.name, **SHORT)

    with executor_process(database_url, base.name, tmp_path) as process:
        wait_for("the executor serving", lambda: base.name in served_bases(services), 120)
        long_thread = threading.Thread(target=long_chat)
        long_thread.start()
        wait_for("the long chat's first text", lambda: streamed, 60, every=0.01)
        process.send_signal(signal.SIGSTOP)  # frozen mid-reply: no token, no heartbeat more
        [long_call] = sample_calls(services)
        assert long_call.status == "running", long_call
        # The only executor is busy: the short chat joins its sampler, behind the long one.
        short_thread = threading.Thread(target=short_chat)
        short_thread.start()
        wait_for("the short chat asked", lambda: len(sample_calls(services)) == 2, 30, every=0.05)
        process.kill()
        process.wait()
        with serving_executor(services, base.id, "executor-2", tmp_path / "e2"):
            short_thread.join(120)
            long_thread.join(120)
            again = client.chat.completions.create(model=base.name, **SHORT)
    long_call, short_call, again_call = sample_calls(services)

    # The chat the killed executor was sampling fails once its lease is out, saying why.
    assert len(raised) == 1 and "stopped before it answered" in str(raised[0]), raised
    assert long_call.status == "failed" and long_call.error["category"] == "server"
    # The one waiting behind it on the same sampler is answered by the other executor, as the
    # same chat is asked again there: the sampler was freed, not unloaded.
    assert short_call.model_id == long_call.model_id
    assert (short_call.status, short_call.claimed_by) == ("completed", "executor-2")
    assert short["reply"].choices[0].message.content == again.choices[0].message.content
    assert again_call.model_id == short_call.model_id
