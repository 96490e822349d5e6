"""Two tenants' RL loops, as the official SDK drives them, sample at once on one base: their
sample futures are decoded together by the real executor, eight calls a claim, and each answers
what the same request answers alone. Real PostgreSQL, the real executor on the tiny test base,
the `tinker` SDK over a real socket."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from tinker import types

from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import register_test_base
from tests.integration.test_interactive_joins import at_pass
from tests.tinker_harness import SEQUENCE, sdk_service, serving_executor, tinker_settings
from workers.interactive.runner import InteractiveRunner

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _pending(services: Services) -> int:
    with services.engine.connect() as conn:
        sql = "SELECT count(*) FROM interactive_calls WHERE kind = 'sample' AND status = 'pending'"
        return int(conn.execute(text(sql)).scalar_one())


def test_two_tenants_sample_futures_are_decoded_together_and_answer_as_alone(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, tmp_path: Path
) -> None:
    base = register_test_base(services.engine, "tiny-e2e")
    params = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
    prompts = [types.ModelInput.from_ints(SEQUENCE[k : k + 3 + k % 4]) for k in range(8)]
    with (
        sdk_service(live_url, tenant_a.member) as first,
        sdk_service(live_url, tenant_b.member) as second,
    ):
        with serving_executor(services, base.id, "executor-1", tmp_path / "e1"):
            # The SDK creates samplers in the background: waited for while the base is served.
            samplers = [
                s.create_sampling_client(base_model=base.name).result(timeout=120)
                for s in (first, second)
            ]
        # Asked while no executor runs, so that the next one finds all sixteen waiting (the SDK
        # sends them from its own thread: waited for until they are all in).
        futures = [sampler.sample(p, 1, params) for sampler in samplers for p in prompts]
        deadline = time.monotonic() + 30
        while _pending(services) < len(futures):
            assert time.monotonic() < deadline, "the SDK did not send its sixteen samples"
            time.sleep(0.05)
        with serving_executor(services, base.id, "executor-2", tmp_path / "e2"):
            together = [f.result(timeout=120).sequences[0].tokens for f in futures]
            alone = [
                sampler.sample(p, 1, params).result(timeout=120).sequences[0].tokens
                for sampler in samplers
                for p in prompts
            ]
    assert together == alone
    assert len({tuple(t) for t in together}) > 1  # the prompts sample differently
    with services.engine.connect() as conn:
        claims = conn.execute(
            text(
                "SELECT started_at, count(*), count(DISTINCT tenant_id) FROM interactive_calls "
                "WHERE kind = 'sample' GROUP BY started_at ORDER BY started_at"
            )
        ).all()
    # The sixteen asked at once: two claims of eight (LORAFORGE_INTERACTIVE_SAMPLE_BATCH_CALLS),
    # each taking both tenants' calls in turn; then the sixteen asked one by one.
    assert [(n, tenants) for _, n, tenants in claims[:2]] == [(8, 2), (8, 2)]
    assert [n for _, n, _ in claims[2:]] == [1] * 16


def test_a_tenants_sample_joins_another_tenants_running_batch(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, tmp_path: Path
) -> None:
    """The serving executor, woken by the NOTIFY the API sends as a call is asked, claims a
    tenant's sample between the passes of another tenant's long batch (held at its 20th pass
    until the short one is asked, so that it cannot end first): the short one is answered
    while the long one still decodes, and answers what it answers alone."""
    base = register_test_base(services.engine, "tiny-joins")
    runner = InteractiveRunner(services, "exec-serve", base.id, work_dir=tmp_path / "e")
    asked = threading.Event()

    def held() -> None:
        assert asked.wait(60), "the test did not ask its short sample"

    stop = threading.Event()
    thread = threading.Thread(target=runner.serve, args=(stop,), kwargs={"idle_wait": 0.5})
    thread.start()
    try:
        with (
            sdk_service(live_url, tenant_a.member) as first,
            sdk_service(live_url, tenant_b.member) as second,
        ):
            samplers = [
                s.create_sampling_client(base_model=base.name).result(timeout=120)
                for s in (first, second)
            ]
            prompt = types.ModelInput.from_ints(SEQUENCE[:6])
            long_params = types.SamplingParams(max_tokens=200, temperature=0.0, stop=[])
            short_params = types.SamplingParams(max_tokens=5, temperature=0.0, stop=[])
            with at_pass(runner, 20, held):
                long_future = samplers[0].sample(prompt, 1, long_params)
                _wait_for(services, "status = 'running'", 1)
                short_future = samplers[1].sample(prompt, 1, short_params)
                _wait_for(services, "true", 2)
                asked.set()
                short_tokens = short_future.result(timeout=120).sequences[0].tokens
                long_tokens = long_future.result(timeout=120).sequences[0].tokens
            alone = samplers[1].sample(prompt, 1, short_params).result(timeout=120)
    finally:
        stop.set()
        thread.join(60)
    assert short_tokens == alone.sequences[0].tokens and len(long_tokens) == 200
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT tenant_id, started_at, finished_at FROM interactive_calls "
                "WHERE kind = 'sample' ORDER BY created_at"
            )
        ).all()
    long_row, short_row = rows[0], rows[1]
    assert long_row.tenant_id != short_row.tenant_id
    assert long_row.started_at < short_row.started_at  # claimed after the long one began
    assert short_row.finished_at < long_row.finished_at  # and answered before it ended


def _wait_for(services: Services, condition: str, count: int) -> None:
    """Until `count` sample calls meet `condition` (SQL on `interactive_calls`)."""
    sql = f"SELECT count(*) FROM interactive_calls WHERE kind = 'sample' AND {condition}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with services.engine.connect() as conn:
            if conn.execute(text(sql)).scalar_one() >= count:
                return
        time.sleep(0.01)
    raise AssertionError(f"fewer than {count} sample calls where {condition}")
