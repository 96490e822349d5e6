"""Checkpoints their owners publish, through the official `tinker` SDK and CLI against the API
on a real socket and the real executor (tiny test base): once published (asked twice, as once), another tenant samples
from the weights, starts a run from the state, reads what they were trained on and downloads the
export, and gets the owner's very numbers; it cannot list, change, delete or unpublish them; the
owner's unpublishing, or a save over the name, makes them the owner's alone again; an encrypted export, a reader and a platform that lets nothing be published are refused
saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pyrage
import pytest
import tinker
from sqlalchemy import text
from tinker import types

from control_plane.services import Services
from control_plane.settings import Settings
from tests.api_harness import TenantKeys
from tests.tinker_harness import DATUM, SEQUENCE, sdk_service, tinker_settings

pytestmark = pytest.mark.usefixtures("tinker_sdk_env")

PROMPT = types.ModelInput.from_ints(SEQUENCE[:6])
# Seeded: the same weights sample the same tokens.
SEEDED = types.SamplingParams(max_tokens=8, temperature=1.0, seed=7)


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    publishing = getattr(request, "param", True)
    return tinker_settings(tmp_path).model_copy(update={"tinker_public_checkpoints": publishing})


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Contexts held to the end of a test (the owner's SDK, to save again at the end)."""
    with ExitStack() as held:
        yield held


def _rest(url: str, key: str) -> tinker.RestClient:
    return tinker.RestClient(base_url=url, api_key="tml-" + key)


def _public(services: Services) -> dict[str, bool]:
    with services.engine.connect() as conn:
        rows = conn.execute(text("SELECT path, public FROM interactive_checkpoints"))
        return {row.path: row.public for row in rows}


def _tokens(sampler: Any) -> list[int]:
    answer = sampler.sample(PROMPT, 1, SEEDED).result(timeout=120)
    return list(answer.sequences[0].tokens)


def _loss(training: Any) -> float:
    return float(training.forward([DATUM], "cross_entropy").result(timeout=120).metrics["loss:sum"])


def _cli(url: str, key: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The `tinker` CLI in a process of its own."""
    env = {
        **os.environ,
        "HOME": str(home),
        "TINKER_BASE_URL": url,
        "TINKER_API_KEY": "tml-" + key,
        "TINKER_TELEMETRY": "0",
    }
    return subprocess.run(
        [sys.executable, "-m", "tinker.cli", "checkpoint", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_published_checkpoint_is_every_tenants_to_read_and_its_owners_to_change(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    executor: str,
    tmp_path: Path,
    stack: ExitStack,
) -> None:
    owner, other = _rest(live_url, tenant_a.member), _rest(live_url, tenant_b.member)
    service = stack.enter_context(sdk_service(live_url, tenant_a.member))
    training = service.create_lora_training_client(base_model=executor, rank=4, seed=0).result(
        timeout=120
    )
    for _ in range(3):
        training.forward_backward([DATUM], "cross_entropy").result(timeout=120)
        training.optim_step(types.AdamParams(learning_rate=5e-2)).result(timeout=120)
    state = training.save_state("shared").result(timeout=120).path
    sampler = training.save_weights_for_sampler("shared").result(timeout=120).path
    export = training.save_weights_external("shared").result(timeout=120).path
    owners_tokens = _tokens(service.create_sampling_client(model_path=sampler))
    owners_loss = _loss(training)
    base_tokens = _tokens(service.create_sampling_client(base_model=executor))
    assert owners_tokens != base_tokens, "the trained weights must sample apart from the base"

    # Unpublished, the paths are the owner's alone.
    with sdk_service(live_url, tenant_b.member) as service_b, pytest.raises(tinker.NotFoundError):
        service_b.create_sampling_client(model_path=sampler).result(timeout=60)
    with pytest.raises(tinker.NotFoundError):
        other.get_weights_info_by_tinker_path(state).result(timeout=30)

    # Published: through the SDK, and through the CLI (`tinker checkpoint publish`).
    owner.publish_checkpoint_from_tinker_path(sampler).result(timeout=30)
    owner.publish_checkpoint_from_tinker_path(export).result(timeout=30)
    published = _cli(live_url, tenant_a.member, tmp_path, "publish", state)
    assert published.returncode == 0, published.stderr
    assert _public(services) == {state: True, sampler: True, export: True}
    listed = owner.list_checkpoints(training.model_id).result(timeout=30).checkpoints
    assert {c.tinker_path: c.public for c in listed} == {state: True, sampler: True, export: True}
    # Asked again (the SDK retries what it did not hear answered), it stays published.
    owner.publish_checkpoint_from_tinker_path(sampler).result(timeout=30)
    assert _public(services)[sampler] is True

    # Another tenant samples the owner's tokens, starts from the owner's state with the owner's
    # loss, reads what it was trained on, and downloads the export without a key.
    with sdk_service(live_url, tenant_b.member) as service_b:
        assert _tokens(service_b.create_sampling_client(model_path=sampler)) == owners_tokens
        resumed = service_b.create_training_client_from_state(state).result(timeout=120)
        assert _loss(resumed) == pytest.approx(owners_loss, rel=1e-4)
        resumed.forward_backward([DATUM], "cross_entropy").result(timeout=120)
    info = other.get_weights_info_by_tinker_path(state).result(timeout=30)
    assert (info.base_model, info.lora_rank) == (executor, 4)
    urls = other.get_external_weights_urls(export).result(timeout=30).urls
    assert urls and all(httpx.get(url).raise_for_status().content for url in urls.values())

    # It is not the other tenant's to list, change, delete or unpublish.
    assert other.list_user_checkpoints().result(timeout=30).checkpoints == []
    for refused in (
        lambda: other.delete_checkpoint_from_tinker_path(sampler),
        lambda: other.set_checkpoint_ttl_from_tinker_path(sampler, 7200),
        lambda: other.unpublish_checkpoint_from_tinker_path(sampler),
        lambda: other.publish_checkpoint_from_tinker_path(sampler),
    ):
        with pytest.raises(tinker.NotFoundError):
            refused().result(timeout=30)
    with services.engine.connect() as conn:
        kept = conn.execute(
            text("SELECT expires_at FROM interactive_checkpoints WHERE path = :p"), {"p": sampler}
        ).scalar_one()
    assert kept is None and _public(services)[sampler] is True
    # A reader of the owner's tenant may not publish either.
    with pytest.raises(tinker.PermissionDeniedError):
        _rest(live_url, tenant_a.reader).unpublish_checkpoint_from_tinker_path(state).result(
            timeout=30
        )

    # Unpublished (twice: as asked), it is the owner's alone again.
    for _ in range(2):
        owner.unpublish_checkpoint_from_tinker_path(sampler).result(timeout=30)
        assert _public(services)[sampler] is False
    with sdk_service(live_url, tenant_b.member) as service_b, pytest.raises(tinker.NotFoundError):
        service_b.create_sampling_client(model_path=sampler).result(timeout=60)
    assert _tokens(service.create_sampling_client(model_path=sampler)) == owners_tokens
    # A save over the export's name writes new weights: they are not published with it.
    age = pyrage.x25519.Identity.generate()
    sealed = training.save_weights_external(
        "shared", age_encryption_recipients=[str(age.to_public())]
    ).result(timeout=120)
    assert sealed.path == export and _public(services)[export] is False
    with pytest.raises(tinker.NotFoundError):
        other.get_external_weights_urls(export).result(timeout=30)
    # Encrypted, nobody but its recipients could read it: publishing it is refused.
    with pytest.raises(tinker.BadRequestError, match="encrypted to its age recipients"):
        owner.publish_checkpoint_from_tinker_path(export).result(timeout=30)
    assert _public(services)[export] is False


@pytest.mark.parametrize("settings", [False], indirect=True)
def test_a_platform_that_lets_nothing_be_published_refuses_and_shares_nothing(
    services: Services,
    live_url: str,
    tenant_a: TenantKeys,
    tenant_b: TenantKeys,
    executor: str,
) -> None:
    with sdk_service(live_url, tenant_a.member) as service:
        training = service.create_lora_training_client(base_model=executor, rank=4, seed=0).result(
            timeout=120
        )
        state = training.save_state("kept").result(timeout=120).path
    owner = _rest(live_url, tenant_a.member)
    with pytest.raises(tinker.PermissionDeniedError, match="does not let checkpoints be published"):
        owner.publish_checkpoint_from_tinker_path(state).result(timeout=30)
    assert _public(services) == {state: False}
    # One published while the platform allowed it is its owner's alone once it does not.
    with services.engine.begin() as conn:
        conn.execute(text("UPDATE interactive_checkpoints SET public = true"))
    with pytest.raises(tinker.NotFoundError):
        _rest(live_url, tenant_b.member).get_weights_info_by_tinker_path(state).result(timeout=30)
    assert owner.get_weights_info_by_tinker_path(state).result(timeout=30).base_model == executor
    # Its owner may still unpublish it.
    owner.unpublish_checkpoint_from_tinker_path(state).result(timeout=30)
    assert _public(services) == {state: False}
