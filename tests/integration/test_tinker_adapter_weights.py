"""A fine-tuning job's adapter, named as Tinker weights (`tinker://adapters/name@ref`), read by
the official `tinker` SDK on the real executor: sampled and scored as peft applies it to the
base (its own rank, alpha and targets, not Tinker's), pinned to the version its reference
named, started from by a training run whose published checkpoint descends from it, and refused
with its reason where it cannot be read (another tenant's, a missing one, its optimizer state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
import torch
from sqlalchemy import text
from tinker import types

from control_plane import interactive_calls
from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.factories import ask_call, interactive_model, interactive_session, make_base
from tests.fixtures.testbase import TEST_BASE_PATH
from tests.tinker_harness import (
    DATUM,
    SEQUENCE,
    publish_adapter_version,
    sdk_service,
    tinker_settings,
)
from workers.training.device import resolve_precision, torch_dtype

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

PROMPT = types.ModelInput.from_ints(SEQUENCE)
STEP = types.AdamParams(learning_rate=1e-2)
# The executor runs the base in bf16 where the CPU has it: the reference then differs by its
# rounding, not by an adapter (which moves these logprobs by whole units).
TOLERANCE = 1e-3 if resolve_precision("auto") == "fp32" else 3e-2


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path)


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second job's adapter: another rank, alpha and targets, other weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH)
    config = LoraConfig(
        r=2, lora_alpha=16, target_modules=["k_proj", "o_proj"], init_lora_weights=False
    )
    out = tmp_path_factory.mktemp("other-adapter")
    get_peft_model(base, config).save_pretrained(out)
    return out


def _reference(adapter_dir: Path | None) -> list[float]:
    """SEQUENCE's logprobs (from its second token) through the base with the adapter applied
    by peft itself, in the executor's precision."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(resolve_precision("auto"))
    model: Any = AutoModelForCausalLM.from_pretrained(TEST_BASE_PATH, dtype=dtype)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    tokens = torch.tensor([SEQUENCE])
    with (
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32),
    ):
        logits = model(input_ids=tokens).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], dim=-1)
    return logprobs.gather(1, tokens[0, 1:, None]).squeeze(1).tolist()


def _scores(sampler: Any) -> list[float]:
    computed = sampler.compute_logprobs(PROMPT).result(timeout=120)
    assert computed[0] is None and len(computed) == len(SEQUENCE)
    return [float(x) for x in computed[1:]]


def _loss(training: Any) -> float:
    return float(training.forward([DATUM], "cross_entropy").result(timeout=120).metrics["loss:sum"])


def _put_alias(url: str, tenant: TenantKeys, version: int) -> None:
    moved = httpx.put(
        f"{url}/v1/adapters/bot/aliases/prod", json={"version": version}, headers=tenant.headers()
    )
    assert moved.status_code == 200, moved.text


def test_a_jobs_adapter_samples_as_peft_applies_it_pinned_to_the_version_its_reference_named(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    executor: str,
    peft_adapter: Path,
    other_adapter: Path,
) -> None:
    assert (
        publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4) == "bot@1"
    )
    _put_alias(live_url, tenant_a, 1)
    first, base = _reference(peft_adapter), _reference(None)
    assert sum(abs(a - b) for a, b in zip(first, base, strict=True)) > 1  # the adapter tells

    with sdk_service(live_url, tenant_a.member) as service:
        by_alias = service.create_sampling_client(model_path="tinker://adapters/bot@prod")
        by_alias = by_alias.result(timeout=120)
        assert _scores(by_alias) == pytest.approx(first, abs=TOLERANCE)
        # Sampling from it is the adapter's: greedy tokens the base alone does not give.
        greedy = types.SamplingParams(max_tokens=6, temperature=0.0)
        start = types.ModelInput.from_ints(SEQUENCE[:6])
        sampled = by_alias.sample(start, 1, greedy).result(timeout=120).sequences[0].tokens
        plain = service.create_sampling_client(base_model=executor)
        assert len(sampled) == 6
        assert sampled != plain.sample(start, 1, greedy).result(timeout=120).sequences[0].tokens

        # The alias moves to a second job's adapter (another rank, alpha and targets): the
        # sampler made before keeps version 1; one made now, and `latest`, read version 2.
        assert (
            publish_adapter_version(services, tenant_a.tenant_id, executor, other_adapter, 2)
            == "bot@2"
        )
        _put_alias(live_url, tenant_a, 2)
        second = _reference(other_adapter)
        assert _scores(by_alias) == pytest.approx(first, abs=TOLERANCE)
        for path in (
            "tinker://adapters/bot@prod",
            "tinker://adapters/bot",
            "tinker://adapters/bot@2",
        ):
            now = service.create_sampling_client(model_path=path).result(timeout=120)
            assert _scores(now) == pytest.approx(second, abs=TOLERANCE), path

        # What the SDK is told of it: its base and rank, the version it is pinned to.
        rest = service.create_rest_client()
        info = rest.get_weights_info_by_tinker_path("tinker://adapters/bot@prod").result()
        assert (info.base_model, info.lora_rank) == (executor, 2)
    with services.engine.connect() as conn:
        paths = (
            conn.execute(
                text(
                    "SELECT model_path FROM interactive_models WHERE kind = 'sampler' ORDER BY created_at"
                )
            )
            .scalars()
            .all()
        )
    assert "tinker://adapters/bot@1" in paths and "tinker://adapters/bot@prod" not in paths


def test_a_run_started_from_an_adapter_version_publishes_a_version_that_descends_from_it(
    services: Services, live_url: str, tenant_a: TenantKeys, executor: str, peft_adapter: Path
) -> None:
    publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)
    _put_alias(live_url, tenant_a, 1)
    publish = f"{live_url}/v1/adapters/bot/versions"
    with sdk_service(live_url, tenant_a.member) as service:
        # An RL run starts from the job's adapter: its first forward is the adapter's.
        run = service.create_training_client_from_state("tinker://adapters/bot@prod")
        run = run.result(timeout=120)
        with services.engine.connect() as conn:
            asked = conn.execute(
                text("SELECT request FROM interactive_calls WHERE model_id = :m AND seq = 0"),
                {"m": run.model_id},
            ).scalar_one()
        assert asked["path"] == "tinker://adapters/bot@1"  # the version the alias named then
        start = run.forward([DATUM], "cross_entropy").result(timeout=120)
        logprobs = start.loss_fn_outputs[0]["logprobs"].data
        assert logprobs == pytest.approx(_reference(peft_adapter), abs=TOLERANCE)
        assert run.get_info().lora_rank == 4
        for _ in range(2):
            run.forward_backward([DATUM], "cross_entropy").result(timeout=120)
            run.optim_step(STEP).result(timeout=120)
        trained = _loss(run)
        assert trained < float(start.metrics["loss:sum"])
        saved = run.save_weights_for_sampler("rl-2").result(timeout=120).path
        state = run.save_state("rl-2").result(timeout=120).path

        # Published, the RL run's weights are version 2, descending from version 1.
        answer = httpx.post(publish, json={"from_checkpoint": saved}, headers=tenant_a.headers())
        assert answer.status_code == 201, answer.text
        version = answer.json()
        assert (version["version"], version["parent"]) == (2, "bot@1"), version
        shown = httpx.get(f"{live_url}/v1/adapters/bot/versions/2", headers=tenant_a.headers())
        assert shown.json()["parent"] == "bot@1"

        # A fresh client's weights descend from no version; loaded into it (`load_state`), the
        # version's numbers again, whatever rank the client was made with; then the RL run's
        # own saved state, which descends from the version too; then a state of a run that
        # never loaded one: what it saves after that descends from none.
        other = service.create_lora_training_client(base_model=executor, rank=8, seed=0)
        other = other.result(timeout=120)
        fresh = other.save_state("fresh").result(timeout=120).path
        unrelated = other.save_weights_for_sampler("fresh").result(timeout=120).path
        other.load_state("tinker://adapters/bot@1").result(timeout=120)
        loaded = other.forward([DATUM], "cross_entropy").result(timeout=120)
        assert loaded.loss_fn_outputs[0]["logprobs"].data == pytest.approx(logprobs, abs=1e-4)
        again = other.save_weights_for_sampler("after-version").result(timeout=120).path
        other.load_state(state).result(timeout=120)
        assert _loss(other) == pytest.approx(trained, rel=1e-4)
        own = other.save_weights_for_sampler("after-state").result(timeout=120).path
        other.load_state(fresh).result(timeout=120)
        reset = other.save_weights_for_sampler("after-fresh").result(timeout=120).path
        for path, parent in ((unrelated, None), (again, "bot@1"), (own, "bot@1"), (reset, None)):
            answer = httpx.post(publish, json={"from_checkpoint": path}, headers=tenant_a.headers())
            assert answer.status_code == 201, answer.text
            assert answer.json()["parent"] == parent, (path, answer.json())


def test_an_adapter_version_that_cannot_be_read_is_refused_with_its_reason_and_nothing_made(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    executor: str,
    peft_adapter: Path,
) -> None:
    publish_adapter_version(services, tenant_a.tenant_id, executor, peft_adapter, 4)

    def models() -> int:
        with services.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM interactive_models")).scalar_one())

    with sdk_service(live_url, tenant_a.member) as service:
        before = models()
        for missing in (
            "tinker://adapters/bot@7",
            "tinker://adapters/bot@staging",
            "tinker://adapters/nobody",
            "tinker://adapters/Not a name",
        ):
            with pytest.raises(tinker.NotFoundError, match="adapter version"):
                service.create_sampling_client(model_path=missing).result(timeout=60)
            with pytest.raises(tinker.NotFoundError, match="adapter version"):
                service.create_training_client_from_state(missing).result(timeout=60)
        # A version holds no optimizer state: asked for, it is refused before anything is made.
        with pytest.raises(tinker.BadRequestError, match="no optimizer state"):
            service.create_training_client_from_state_with_optimizer(
                "tinker://adapters/bot@1"
            ).result(timeout=60)
        # Another base named beside it.
        with pytest.raises(tinker.BadRequestError, match="another base"):
            service.create_training_client_from_state(
                "tinker://adapters/bot@1", base_model="SmolLM2-135M-Instruct"
            ).result(timeout=60)
        assert models() == before
        # Publishing its path is not publishing a checkpoint: the version is one already.
        answer = httpx.post(
            f"{live_url}/v1/adapters/copy/versions",
            json={"from_checkpoint": "tinker://adapters/bot@1"},
            headers=tenant_a.headers(),
        )
        assert answer.status_code == 404, answer.text

    # Another tenant's adapter is the same not-found as a missing one.
    with sdk_service(live_url, tenant_b.member) as service_b:
        with pytest.raises(tinker.NotFoundError, match="adapter version"):
            service_b.create_sampling_client(model_path="tinker://adapters/bot@1").result(
                timeout=60
            )
        with pytest.raises(tinker.NotFoundError):
            service_b.create_rest_client().get_weights_info_by_tinker_path(
                "tinker://adapters/bot@1"
            ).result()


def test_a_load_whose_version_was_deleted_meanwhile_is_answered_and_records_no_version(
    services: Services, tenant_a: TenantKeys
) -> None:
    """The version read by the executor, deleted before the load's answer: the answer is
    recorded, the model descends from no version (its key would dangle), the executor lives."""
    engine = services.engine
    base = make_base(engine, "tiny-gone")
    session = interactive_session(engine, tenant_a.tenant_id, "sess-gone")
    model = interactive_model(engine, session, tenant_a.tenant_id, base.id, "sess-gone:train:0")
    ask_call(
        engine,
        model,
        tenant_a.tenant_id,
        base.id,
        "load_weights",
        0,
        {"path": "tinker://adapters/bot@1", "adapter_version_id": "adver-deleted"},
    )
    with engine.begin() as conn:
        taken = interactive_calls.claim_next(conn, "exec-1", base.id)
    assert taken is not None
    with engine.begin() as conn:
        assert interactive_calls.finish(conn, taken, "exec-1", {"type": "load_weights"})
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT m.weights_version_id, c.status FROM interactive_models m "
                "JOIN interactive_calls c ON c.model_id = m.id WHERE m.id = :m"
            ),
            {"m": model},
        ).one()
    assert (row.weights_version_id, row.status) == (None, "completed")
