"""Two tenants train at once on one base, as the official SDK drives them: their forward_backward
futures run together on the real executor, in one claim and one pass, and each answers what its
model answers alone. Real PostgreSQL, the real executor on the tiny test base (fp32), the
`tinker` SDK over a real socket."""

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
from tests.tinker_harness import SEQUENCE, pausable_executor, sdk_service, tinker_settings
from workers.interactive.runner import InteractiveRunner

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


def _forward_calls(services: Services, status: str) -> list[tuple[str, str, object]]:
    with services.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT kind, tenant_id, started_at FROM interactive_calls "
                "WHERE kind IN ('forward_backward', 'forward') AND status = :status "
                "ORDER BY seq"
            ),
            {"status": status},
        ).all()
    return [(r.kind, r.tenant_id, r.started_at) for r in rows]


def test_two_tenants_forward_backward_futures_run_together_and_answer_as_alone(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, tmp_path: Path
) -> None:
    base = register_test_base(services.engine, "tiny-e2e")
    runner = InteractiveRunner(
        services, "executor-1", base.id, work_dir=tmp_path / "e1", precision="fp32"
    )
    data = [
        [
            types.Datum(
                model_input=types.ModelInput.from_ints(SEQUENCE[k : k + 9 + 3 * i]),
                loss_fn_inputs={"target_tokens": SEQUENCE[k + 1 : k + 10 + 3 * i]},
            )
            for i in range(2)
        ]
        for k in (0, 5)
    ]
    with (
        sdk_service(live_url, tenant_a.member) as first,
        sdk_service(live_url, tenant_b.member) as second,
        pausable_executor(runner) as serving,
    ):
        serving.set()
        clients = [
            s.create_lora_training_client(base_model=base.name, rank=4, seed=seed).result(
                timeout=60
            )
            for s, seed in ((first, 1), (second, 2))
        ]
        serving.clear()
        time.sleep(0.2)  # a claim in flight finishes
        futures = [
            c.forward_backward(d, "cross_entropy") for c, d in zip(clients, data, strict=True)
        ]
        deadline = time.monotonic() + 30
        while len(_forward_calls(services, "pending")) < 2:  # the SDK sends from its thread
            assert time.monotonic() < deadline, "the SDK did not send its two calls"
            time.sleep(0.05)
        serving.set()
        together = [f.result(timeout=120) for f in futures]
        batched = _forward_calls(services, "completed")
        alone = [
            c.forward(d, "cross_entropy").result(timeout=120)
            for c, d in zip(clients, data, strict=True)
        ]
        steps = [
            c.optim_step(types.AdamParams(learning_rate=1e-3)).result(timeout=120) for c in clients
        ]
    # One claim took both tenants' calls: they started in one statement.
    assert sorted((kind, tenant) for kind, tenant, _ in batched) == sorted(
        ("forward_backward", keys.tenant_id) for keys in (tenant_a, tenant_b)
    )
    assert batched[0][2] == batched[1][2]
    for mine, theirs in zip(together, alone, strict=True):
        assert mine.metrics["loss:sum"] == pytest.approx(theirs.metrics["loss:sum"], rel=1e-5)
        for out, ref in zip(mine.loss_fn_outputs, theirs.loss_fn_outputs, strict=True):
            assert out["logprobs"].tolist() == pytest.approx(ref["logprobs"].tolist(), abs=1e-5)
    assert together[0].metrics["loss:sum"] != pytest.approx(together[1].metrics["loss:sum"])
    # Each model kept its own gradient from the shared pass for its optim_step.
    assert all(step.metrics["grad_norm:mean"] > 0 for step in steps)
