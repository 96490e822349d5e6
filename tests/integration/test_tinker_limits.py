"""The cap on a tenant's loaded training models (`LORAFORGE_MAX_INTERACTIVE_MODELS_PER_TENANT`,
2 here, unless the tenant has its own): their weights and optimizer state live in executors'
memory, so a tenant past it is refused a new one (403 naming the cap and saying what to unload,
nothing written; the SDK raises it at once) until one is unloaded. Creations at once count each
other; another tenant, samplers and a resume sent again are not held back by it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import tinker
from sqlalchemy import Engine, text

from control_plane import trainers
from control_plane.services import Services
from control_plane.settings import Settings
from loraforge import Client, PlatformAdmin
from tests.api_harness import TenantKeys
from tests.factories import make_base
from tests.tinker_harness import sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return tinker_settings(tmp_path).model_copy(update={"max_interactive_models_per_tenant": 2})


@pytest.fixture
def base(services: Services) -> str:
    name = make_base(services.engine, "tiny-llama").name
    with services.engine.begin() as conn:
        trainers.report(
            conn,
            trainers.TrainerReport("exec-1", "h", 1, "cpu", resident_base=name, kind="interactive"),
        )
    return name


def _models(engine: Engine, tenant: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM interactive_models WHERE tenant_id = :t"), {"t": tenant}
            ).scalar_one()
        )


def _create(http: httpx.Client, key: str, session: str, base: str) -> httpx.Response:
    return http.post(
        "/create_model",
        json={
            "session_id": session,
            "model_seq_id": 0,
            "base_model": base,
            "lora_config": {"rank": 4},
        },
        headers={"X-API-Key": "tml-" + key},
    )


def _session(http: httpx.Client, key: str) -> str:
    made = http.post("/create_session", json={"tags": []}, headers={"X-API-Key": "tml-" + key})
    return str(made.json()["session_id"])


def test_a_tenant_at_its_cap_is_refused_a_model_until_it_unloads_one(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, base: str
) -> None:
    engine = services.engine
    key = {"X-API-Key": "tml-" + tenant_a.member}
    with httpx.Client(base_url=live_url + "/api/v1", timeout=30) as http:
        session = _session(http, tenant_a.member)
        # Four creations at once: exactly two are taken.
        answers: list[httpx.Response] = []
        lock = threading.Lock()

        def create() -> None:
            with httpx.Client(base_url=live_url + "/api/v1", timeout=30) as own:
                made = _create(own, tenant_a.member, session, base)
            with lock:
                answers.append(made)

        threads = [threading.Thread(target=create) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(a.status_code for a in answers) == [200, 200, 403, 403]
        refused = next(a for a in answers if a.status_code == 403).json()["error"]
        assert refused["code"] == "interactive_model_limit"
        assert "holds 2 loaded training models" in refused["message"]
        assert "unload" in refused["message"]
        assert _models(engine, tenant_a.tenant_id) == 2
        kept = [a.json()["model_id"] for a in answers if a.status_code == 200]

        # Another tenant is not held back, and samplers are not counted.
        assert (
            _create(http, tenant_b.member, _session(http, tenant_b.member), base).status_code == 200
        )
        sampler = http.post(
            "/create_sampling_session",
            json={"session_id": session, "sampling_session_seq_id": 0, "base_model": base},
            headers=key,
        )
        assert sampler.status_code == 200, sampler.text

        # The SDK raises the refusal at once (no retries), saying what to do.
        with (
            sdk_service(live_url, tenant_a.member) as service,
            pytest.raises(tinker.PermissionDeniedError, match="unload one"),
        ):
            service.create_lora_training_client(base_model=base, rank=4).result(timeout=30)

        # A resume is a new model too; one unloaded makes room.
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO interactive_checkpoints (id, model_id, tenant_id, kind, name, "
                    "path, storage_prefix) VALUES ('ck', :m, :t, 'state', 's', :p, 'x/')"
                ),
                {"m": kept[0], "t": tenant_a.tenant_id, "p": f"tinker://{kept[0]}/weights/s"},
            )
        resume: dict[str, Any] = {
            "session_id": session,
            "model_seq_id": 9,
            "path": f"tinker://{kept[0]}/weights/s",
            "optimizer": True,
        }
        assert http.post("/load_weights", json=resume, headers=key).status_code == 403
        assert (
            http.post("/unload_model", json={"model_id": kept[1]}, headers=key).status_code == 200
        )
        first = http.post("/load_weights", json=resume, headers=key)
        assert first.status_code == 200, first.text
        # At the cap again, the same resume sent again answers the same run and future.
        again = http.post("/load_weights", json=resume, headers=key)
        assert again.status_code == 200 and again.json() == first.json()
        assert _create(http, tenant_a.member, session, base).status_code == 403


def _refusal(answer: httpx.Response) -> str:
    """The message of a creation refused at the cap."""
    assert answer.status_code == 403, answer.text
    error = answer.json()["error"]
    assert error["code"] == "interactive_model_limit"
    return str(error["message"])


def test_a_tenants_own_cap_goes_before_the_platforms_and_null_returns_it_to_the_default(
    services: Services, live_url: str, tenant_a: TenantKeys, tenant_b: TenantKeys, base: str
) -> None:
    """The platform's operator gives tenant-a a cap of 1 and tenant-b one of 3 around the
    platform's 2 (`PATCH /v1/tenants/{name}`): each is refused past its own, the refusal naming
    that cap, nothing written; tenant-a's set back to null holds it to the platform's 2 again."""
    engine = services.engine
    operator = PlatformAdmin(Client(live_url, tenant_a.admin))
    for name, cap in (("tenant-a", 1), ("tenant-b", 3)):
        tenant = operator.set_limits(name, max_interactive_models=cap)
        assert (tenant["max_interactive_models"], tenant["effective_max_interactive_models"]) == (
            cap,
            cap,
        )
    own = "the limit the platform's operator set for it (max_interactive_models = {})"
    with httpx.Client(base_url=live_url + "/api/v1", timeout=30) as http:
        session_a = _session(http, tenant_a.member)
        assert _create(http, tenant_a.member, session_a, base).status_code == 200
        said = _refusal(_create(http, tenant_a.member, session_a, base))
        assert said.startswith(f"your tenant holds 1 loaded training model, {own.format(1)}: ")
        assert "unload one" in said
        assert _models(engine, tenant_a.tenant_id) == 1

        session_b = _session(http, tenant_b.member)
        for _ in range(3):  # one more than the platform's 2
            made = _create(http, tenant_b.member, session_b, base)
            assert made.status_code == 200, made.text
        said = _refusal(_create(http, tenant_b.member, session_b, base))
        assert f"holds 3 loaded training models, {own.format(3)}" in said
        assert _models(engine, tenant_b.tenant_id) == 3

        back = operator.set_limits("tenant-a", max_interactive_models=None)
        assert (back["max_interactive_models"], back["effective_max_interactive_models"]) == (
            None,
            2,
        )
        assert _create(http, tenant_a.member, session_a, base).status_code == 200
        said = _refusal(_create(http, tenant_a.member, session_a, base))
        assert (
            "holds 2 loaded training models, the platform's limit "
            "(LORAFORGE_MAX_INTERACTIVE_MODELS_PER_TENANT = 2)" in said
        )
        assert _models(engine, tenant_a.tenant_id) == 2
