"""Two tenants' RL loops, as the official SDK drives them, sample at once on one base: their
sample futures are decoded together by the real executor, eight calls a claim, and each answers
what the same request answers alone. Real PostgreSQL, the real executor on the tiny test base,
the `tinker` SDK over a real socket."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import text
from tinker import types

from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import register_test_base
from tests.tinker_harness import SEQUENCE, sdk_service, serving_executor, tinker_settings

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
